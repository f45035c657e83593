"""The speculative-decoding demo: what distillation buys a draft, measured on a CPU.

The target is the ``dk demo llm`` teacher (a byte-level GPT-2 on the Python standard library,
from its cache). Drafts, all trained for the same steps on the same batch size:

- (a) ``data``: a small GPT-2 trained on the training text alone;
- (b) the same GPT-2 (same initialisation) distilled from the target on sequences the target
  generated (DistillSpec), pure distillation (``alpha = 1``, ``T = 1``), once per divergence;
  and distilled on its own completions of the same prompts (on-policy,
  :class:`~darkknowledge.llm.OnPolicyTask`, every step sampled);
- (c) multi-token-prediction heads on the frozen target (self-speculation: no second model),
  trained on the labels of the training text alone, and the same heads distilled towards the
  target's own distribution at ``i + k`` on its samples.

Each is scored offline (``offline_acceptance_rate`` / ``depth_acceptance_rates`` on held-out
target samples and held-out text, no decoding) and in decoding (``measure_speedup``: plain
decoding of the target with its KV cache against speculative decoding, same prompts,
interleaved, medians over repeats), beside the speed-up that ``expected_speedup`` predicts from
the acceptance rate and the measured cost ratio. Trained drafts are cached beside the teacher,
keyed by everything that determines them, so a second run only measures.

The command line, ``dk demo speculative``, lives in :mod:`darkknowledge.commands.demo_speculative`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._files import write_json
from ..models import count_parameters
from . import demo as llm_demo
from .data import RandomWindows, sequential_windows, stdlib_corpus
from .draft import SampleBatches, cached_teacher_samples
from .speculative_report import format_tables, plot_report
from .task import CausalLMTask

DIVERGENCES = ("tvd", "forward_kl", "reverse_kl", "jsd")


@dataclass(frozen=True)
class SpeculativeRecipe:
    """Sizes and settings of one run (the teacher's are the llm demo's ``teacher`` recipe)."""

    draft_layers: int = 1
    draft_width: int = 128
    draft_steps: int = 1000
    divergences: tuple[str, ...] = DIVERGENCES
    on_policy: tuple[str, ...] = ("tvd",)  # divergences of drafts distilled on their own samples
    samples: int = 4096  # target samples to distil on (prompt: sample_prompt_length bytes)
    sample_prompt_length: int = 8
    heldout_samples: int = 256
    mtp_kind: str = "sequential"
    mtp_depths: int = 3
    mtp_steps: int = 1000
    gamma: int = 3
    max_new_tokens: int = 48
    prompts: int = 32
    prompt_length: int = 16
    repeats: int = 5
    temperature: float = 1.0
    greedy: bool = False
    learning_rate: float = 3e-3
    seed: int = 0
    teacher: llm_demo.Recipe = field(default_factory=llm_demo.Recipe)


QUICK = SpeculativeRecipe(
    draft_layers=1, draft_width=16, draft_steps=4, divergences=("tvd",), on_policy=("jsd",),
    samples=32,
    heldout_samples=16, mtp_depths=2, mtp_steps=4, gamma=2, max_new_tokens=8, prompts=2,
    prompt_length=8, repeats=1, teacher=llm_demo.QUICK,
)  # fmt: skip

# Settings that change what is trained, per kind of draft (the rest only changes the measurement).
_SHARED_FIELDS = ("samples", "sample_prompt_length", "learning_rate", "seed")
_DRAFT_FIELDS = ("draft_layers", "draft_width", "draft_steps", *_SHARED_FIELDS)
_MTP_FIELDS = ("mtp_kind", "mtp_depths", "mtp_steps", *_SHARED_FIELDS)


def run_speculative_demo(
    recipe: SpeculativeRecipe,
    *,
    cache_dir: Path,
    output_dir: Path,
    log: Callable[[str], None] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Train (or load) the drafts and heads, score and time each, write the report."""
    import darkknowledge as dk

    say = log if log is not None else (lambda message: None)
    started = time.perf_counter()
    block = recipe.teacher.block_size
    corpus = stdlib_corpus(
        train_bytes=recipe.teacher.train_bytes, heldout_bytes=recipe.teacher.heldout_bytes
    )
    # The llm demo's cached teacher, trained by the llm demo if missing.
    target, teacher_info = llm_demo.load_teacher(recipe.teacher, corpus.digest, cache_dir, say=say)
    target.eval()
    key = {
        "teacher": Path(teacher_info["cache_path"]).name, "corpus": corpus.digest,
        "sampler": "GenerateSampler",
    }  # fmt: skip
    say(
        f"target: the llm demo's teacher ({count_parameters(target):,} parameters), from "
        f"{teacher_info['cache_path']}"
    )

    def samples(text: torch.Tensor, count: int, seed: int, name: str) -> torch.Tensor:
        return cached_teacher_samples(
            target, text, count=count, prompt_length=recipe.sample_prompt_length, length=block,
            cache_path=cache_dir / f"speculative-demo-{name}.safetensors", key=key, seed=seed,
        )  # fmt: skip

    say(f"target samples: {recipe.samples:,} training and {recipe.heldout_samples} held-out")
    train_samples = samples(corpus.train, recipe.samples, recipe.seed, "train-samples")
    heldout_samples = samples(corpus.heldout, recipe.heldout_samples, recipe.seed + 1, "heldout")
    # Only the sampled tokens count: decoding drafts after a prompt, never inside it.
    heldout_batches = [
        {
            "input_ids": rows,
            "prompt_lengths": torch.full((rows.shape[0],), recipe.sample_prompt_length),
        }
        for rows in heldout_samples.split(64)
    ]
    heldout_text = sequential_windows(corpus.heldout, block_size=block, batch_size=64)
    prompts = _prompts(corpus.heldout, recipe)
    store = _DraftStore(cache_dir, recipe, key)
    rows: dict[str, dict[str, Any]] = {}

    def text_batches(steps: int) -> RandomWindows:
        return RandomWindows(
            corpus.train, block_size=block, batch_size=recipe.teacher.batch_size,
            num_batches=steps, seed=recipe.seed,
        )  # fmt: skip

    def sample_batches(steps: int, prompt_length: int = 0) -> SampleBatches:
        return SampleBatches(
            train_samples, batch_size=recipe.teacher.batch_size, num_batches=steps,
            seed=recipe.seed, prompt_length=prompt_length,
        )  # fmt: skip

    # (name, divergence, data): the text, the target's samples, or the draft's own completions
    # of the samples' prompts (on-policy: OnPolicyTask samples them at every step).
    drafts = [("data", None, "text")]
    drafts += [(name, name, "samples") for name in recipe.divergences]
    drafts += [(f"on_policy_{name}", name, "own") for name in recipe.on_policy]
    for name, divergence, data in drafts:
        draft = llm_demo.build_gpt2(
            recipe.draft_layers, recipe.draft_width, recipe.teacher, seed=recipe.seed + 1
        )
        how = {
            "text": "data alone",
            "samples": f"distilled ({divergence}) on target samples",
            "own": f"distilled ({divergence}) on its own samples (on-policy)",
        }[data]
        seconds = store.load_or_train(
            f"draft-{name}", _DRAFT_FIELDS, draft, say, f"draft {name}: {how}",
            lambda model, d=divergence, data=data: _train(
                model, target if d else None, _draft_data(data, text_batches, sample_batches,
                recipe), recipe, recipe.draft_steps, _draft_task(data, recipe), d or "forward_kl",
                progress,
            ),
        )  # fmt: skip
        draft.eval()
        rows[name] = _score_draft(dk, target, draft, recipe, heldout_batches, heldout_text, prompts)
        rows[name].update(train_seconds=seconds, parameters=count_parameters(draft))
        say(_summary(name, rows[name]))
    for name, distil in (("mtp_labels", False), ("mtp_distilled", True)):
        student = dk.mtp.MTPStudent.from_model(
            copy.deepcopy(target), recipe.mtp_kind, recipe.mtp_depths, freeze_model=True
        )
        how = "distilled (forward_kl) on target samples" if distil else "labels of the text"
        seconds = store.load_or_train(
            name, _MTP_FIELDS, student.heads, say, f"MTP heads ({recipe.mtp_kind}, {recipe.mtp_depths}): {how}",
            lambda heads, distil=distil, student=student: _train(
                student, target if distil else None,
                sample_batches(recipe.mtp_steps) if distil else text_batches(recipe.mtp_steps),
                recipe, recipe.mtp_steps,
                dk.mtp.MTPTask(main_weight=0.0, depth_weights=[1.0] * recipe.mtp_depths),
                "forward_kl", progress,
            ),
        )  # fmt: skip
        student.eval()
        rows[name] = _score_mtp(dk, student, recipe, heldout_batches, heldout_text, prompts)
        rows[name].update(train_seconds=seconds, parameters=_count(student.heads.parameters()))
        say(_summary(name, rows[name]))
    report = {
        "recipe": asdict(recipe),
        "target": {**teacher_info, "parameters": count_parameters(target)},
        "threads": torch.get_num_threads(),
        "rows": rows,
        "total_seconds": time.perf_counter() - started,
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    write_json(output_dir / "results.json", report)
    plot_report(report, output_dir / "speculative.png")
    return report


def _draft_data(kind: str, text_batches, sample_batches, recipe: SpeculativeRecipe):
    steps = recipe.draft_steps
    if kind == "text":
        return text_batches(steps)
    if kind == "samples":
        return sample_batches(steps)
    return sample_batches(steps, recipe.sample_prompt_length)  # only the prompts are read


def _draft_task(kind: str, recipe: SpeculativeRecipe):
    if kind != "own":
        return CausalLMTask()
    from .on_policy import OnPolicyTask

    return OnPolicyTask(fraction=1.0, seed=recipe.seed)


def _train(student, teacher, data, recipe, steps, task, divergence, progress) -> None:
    """The llm demo's optimisation (AdamW, warm-up then cosine, clipping), pure distillation."""
    import darkknowledge as dk

    rate = recipe.learning_rate
    dk.Distiller(
        student, teacher, data, task=task, temperature=1.0, alpha=1.0,
        loss_options={"divergence": divergence},
        learning_rate=dk.schedules.warmup_cosine(rate, steps // 10, steps, end=rate / 10),
        max_steps=steps, max_grad_norm=1.0, seed=recipe.seed, progress=progress,
    ).fit()  # fmt: skip


def _score_draft(dk, target, draft, recipe, heldout_batches, heldout_text, prompts) -> dict:
    sampling = {"temperature": recipe.temperature, "greedy": recipe.greedy}
    alpha_samples = dk.speculative.offline_acceptance_rate(
        target, draft, heldout_batches, **sampling
    )
    alpha_text = dk.speculative.offline_acceptance_rate(target, draft, heldout_text, **sampling)
    measured = dk.speculative.measure_speedup(
        target, draft, prompts, max_new_tokens=recipe.max_new_tokens, gamma=recipe.gamma,
        repeats=recipe.repeats, seed=recipe.seed, **sampling,
    )  # fmt: skip
    return _row(measured, alpha_samples.rate, alpha_text.rate, None)


def _score_mtp(dk, student, recipe, heldout_batches, heldout_text, prompts) -> dict:
    sampling = {"temperature": recipe.temperature, "greedy": recipe.greedy}
    rates_samples = _depth_rates(dk, student, heldout_batches, sampling)
    rates_text = _depth_rates(dk, student, heldout_text, sampling)
    drafter = dk.mtp.MTPDrafter(student)
    measured = dk.speculative.measure_speedup(
        student.model, drafter, prompts, max_new_tokens=recipe.max_new_tokens,
        gamma=min(recipe.gamma, recipe.mtp_depths), repeats=recipe.repeats, seed=recipe.seed,
        **sampling,
    )  # fmt: skip
    return _row(measured, _mean_rate(rates_samples), _mean_rate(rates_text), rates_samples)


def _depth_rates(dk, student, batches, sampling) -> list[float]:
    """Per-depth offline acceptance over the batches (each weighted by its rows)."""
    from .labels import shift_labels

    total, rows = None, 0
    for batch in batches:
        ids = batch["input_ids"]
        labels = shift_labels(ids, prompt_lengths=batch.get("prompt_lengths"))
        rates = dk.mtp.depth_acceptance_rates(student, ids, labels, **sampling)
        total = rates * ids.shape[0] if total is None else total + rates * ids.shape[0]
        rows += ids.shape[0]
    return (total / rows).tolist()


def _mean_rate(rates: list[float]) -> float:
    return sum(rates) / len(rates)


def _row(measured, alpha_samples: float, alpha_text: float, depth_rates) -> dict[str, Any]:
    predicted_offline = measured.predicted_speedup(depth_rates or alpha_samples)
    return {
        **measured.as_dict(),
        "alpha_offline_samples": alpha_samples,
        "alpha_offline_text": alpha_text,
        "depth_rates_offline": depth_rates,
        "predicted_speedup_offline": predicted_offline,
        "predicted_speedup_offline_with_verification": measured.predicted_speedup(
            depth_rates or alpha_samples, verification_cost=True
        ),
    }


def _summary(name: str, row: dict[str, Any]) -> str:
    return (
        f"{name}: acceptance {row['acceptance_rate']:.3f} in decoding, "
        f"{row['alpha_offline_samples']:.3f} offline; speed-up {row['speedup']:.2f} measured, "
        f"{row['predicted_speedup_offline']:.2f} predicted (c = {row['cost_ratio']:.3f}), "
        f"{row['predicted_speedup_offline_with_verification']:.2f} with the verification cost "
        f"(v = {row['verification_cost']:.2f})"
    )


def _prompts(heldout: torch.Tensor, recipe: SpeculativeRecipe) -> list[torch.Tensor]:
    """``prompts`` held-out windows of ``prompt_length`` bytes, evenly spaced."""
    if recipe.prompt_length + recipe.max_new_tokens > recipe.teacher.block_size:
        raise ValueError(
            f"prompt_length + max_new_tokens must fit the models' {recipe.teacher.block_size} "
            f"positions, got {recipe.prompt_length} + {recipe.max_new_tokens}"
        )
    stride = (heldout.numel() - recipe.prompt_length) // recipe.prompts
    return [
        heldout[i * stride : i * stride + recipe.prompt_length].long().reshape(1, -1)
        for i in range(recipe.prompts)
    ]


def _count(parameters) -> int:
    return sum(p.numel() for p in parameters)


class _DraftStore:
    """Trained drafts and heads as safetensors under ``cache_dir``, in a folder keyed by the
    recipe's fields that determine them, the teacher and the corpus."""

    def __init__(self, cache_dir: Path, recipe: SpeculativeRecipe, key: dict[str, str]) -> None:
        self.cache_dir, self.recipe, self.key = cache_dir, recipe, key

    def folder(self, fields: tuple[str, ...]) -> Path:
        settings = {name: getattr(self.recipe, name) for name in fields}
        settings.update(self.key, teacher_recipe=asdict(self.recipe.teacher))
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
        return self.cache_dir / f"speculative-demo-drafts-{digest}"

    def load_or_train(
        self, name: str, fields: tuple[str, ...], module: nn.Module, say, what: str, train
    ) -> float | None:
        """Load ``module``'s weights, or ``train(module)`` and store them; the training time."""
        from safetensors.torch import load_file, save_file

        from .._files import atomic_path

        path = self.folder(fields) / f"{name}.safetensors"
        if path.is_file():
            module.load_state_dict(load_file(str(path)), strict=False)
            say(f"{what}: loaded from {path}")
            return None
        say(f"{what}: training")
        began = time.perf_counter()
        train(module)
        seconds = time.perf_counter() - began
        tensors = _untied({n: t.detach().contiguous() for n, t in module.state_dict().items()})
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as temporary:
            save_file(tensors, str(temporary))
        return seconds


def _untied(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses shared storage: keep one name per tensor (GPT-2 ties lm_head to wte;
    ``load_state_dict(strict=False)`` fills the tie back)."""
    seen, kept = set(), {}
    for name, tensor in tensors.items():
        pointer = tensor.data_ptr()
        if pointer not in seen:
            seen.add(pointer)
            kept[name] = tensor
    return kept


def with_overrides(recipe: SpeculativeRecipe, **overrides: Any) -> SpeculativeRecipe:
    """``recipe`` with the given fields replaced (None values ignored)."""
    return replace(recipe, **{k: v for k, v in overrides.items() if v is not None})


__all__ = ["QUICK", "SpeculativeRecipe", "format_tables", "run_speculative_demo", "with_overrides"]
