"""The LLM demo: distil a byte-level GPT-2 on the Python standard library, offline.

1. Text: the standard library's own ``*.py`` files as bytes (held-out files for evaluation).
2. Teacher: a small GPT-2 trained from data, cached under ``--cache-dir`` (safetensors and
   config JSON, keyed by a hash of its config, training recipe and the corpus bytes), so a
   second run loads it instead of training it again.
3. Student: a smaller GPT-2 trained twice for the same steps on the same batches: distilled
   from the teacher (``Distiller`` + :class:`CausalLMTask`), and from the data alone.
4. Report: held-out loss, bits per byte and perplexity, training and evaluation tokens per
   second, parameter counts; ``results.json`` and ``val_loss.png`` (and :func:`format_table`).

The command line, ``dk demo llm``, lives in :mod:`darkknowledge.commands.demo_llm`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from .._files import save_figure, write_json
from ..models import count_parameters
from ..schedules import warmup_cosine
from ..train import Distiller
from .data import VOCAB_SIZE, RandomWindows, sequential_windows, stdlib_corpus
from .models import check_safetensors_folder
from .report_table import aligned_rows
from .task import CausalLMTask


@dataclass(frozen=True)
class Recipe:
    """Sizes of one demo run. ``quick`` is for tests: seconds, not minutes."""

    block_size: int = 64
    batch_size: int = 16
    teacher_layers: int = 3
    teacher_width: int = 128
    student_layers: int = 1
    student_width: int = 64
    teacher_steps: int = 400
    student_steps: int = 250
    learning_rate: float = 3e-3
    train_bytes: int = 2_000_000
    heldout_bytes: int = 32_768
    eval_every: int = 50
    temperature: float = 1.0
    alpha: float = 0.9
    seed: int = 0


QUICK = Recipe(
    block_size=32, batch_size=8, teacher_layers=1, teacher_width=32, student_layers=1, student_width=16,
    teacher_steps=8, student_steps=4, train_bytes=20_000, heldout_bytes=1_024, eval_every=2,
)  # fmt: skip

LABELS = {
    "teacher": "teacher",
    "distilled": "student, distilled",
    "data_only": "student, data only",
}


def run_demo(
    recipe: Recipe,
    *,
    cache_dir: Path,
    output_dir: Path,
    log: Callable[[str], None] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Train (or load) the teacher, then the distilled and the data-only student; write the report.

    ``log`` receives one line as each stage starts and ends (None: silent); ``progress`` shows
    the Distiller's progress bar during training (only when stderr is a terminal).
    """
    say = log if log is not None else (lambda message: None)
    started = time.perf_counter()
    corpus = stdlib_corpus(train_bytes=recipe.train_bytes, heldout_bytes=recipe.heldout_bytes)
    say(
        f"corpus: {corpus.train.numel():,} training bytes from {len(corpus.train_files)} standard "
        f"library files, {corpus.heldout.numel():,} held-out bytes from {len(corpus.heldout_files)} others"
    )
    eval_data = sequential_windows(
        corpus.heldout, block_size=recipe.block_size, batch_size=4 * recipe.batch_size
    )

    def train_data(steps: int, seed: int) -> RandomWindows:
        return RandomWindows(
            corpus.train,
            block_size=recipe.block_size,
            batch_size=recipe.batch_size,
            num_batches=steps,
            seed=seed,
        )

    def fit(student, teacher, steps: int, eval_every: int) -> dict[str, Any]:
        distiller = Distiller(
            student,
            teacher,
            train_data(steps, recipe.seed),
            task=CausalLMTask(),
            temperature=recipe.temperature,
            alpha=recipe.alpha,
            learning_rate=warmup_cosine(
                recipe.learning_rate, steps // 10, steps, end=recipe.learning_rate / 10
            ),
            max_steps=steps,
            max_grad_norm=1.0,
            eval_data=eval_data if eval_every else None,
            eval_every=eval_every,
            seed=recipe.seed,
            progress=progress,
        )
        began = time.perf_counter()
        result = distiller.fit()
        seconds = time.perf_counter() - began
        curve = [[r["step"], r["loss"]] for r in result.history if r["kind"] == "eval"]
        return {
            "train_seconds": seconds,
            "train_tokens_per_s": _train_tokens(recipe, steps) / seconds,
            "curve": curve,
        }

    teacher, teacher_info = cached_teacher(recipe, corpus.digest, cache_dir, fit, say)
    results: dict[str, Any] = {"teacher": {**teacher_info, **evaluate_heldout(teacher, eval_data)}}
    say(f"teacher: {results['teacher']['bits_per_byte']:.3f} held-out bits per byte")
    for name, use_teacher in (("distilled", True), ("data_only", False)):
        label = LABELS[name]
        student = build_gpt2(
            recipe.student_layers, recipe.student_width, recipe, seed=recipe.seed + 1
        )
        how = "distilled from the teacher" if use_teacher else "from the data alone"
        say(
            f"{label} ({recipe.student_layers} x {recipe.student_width}, {count_parameters(student):,} "
            f"parameters): {recipe.student_steps} steps {how}"
        )
        info = fit(
            student, teacher if use_teacher else None, recipe.student_steps, recipe.eval_every
        )
        results[name] = {
            **info,
            **evaluate_heldout(student, eval_data),
            "parameters": count_parameters(student),
        }
        say(
            f"{label}: {results[name]['bits_per_byte']:.3f} held-out bits per byte "
            f"({info['train_seconds']:.1f} s)"
        )
    report = {
        "recipe": asdict(recipe),
        "corpus": {
            "train_bytes": corpus.train.numel(),
            "heldout_bytes": corpus.heldout.numel(),
            "heldout_files": list(corpus.heldout_files),
            "digest": corpus.digest,
        },
        "threads": torch.get_num_threads(),
        "models": results,
        "total_seconds": time.perf_counter() - started,
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    write_json(output_dir / "results.json", report)
    _plot(report, output_dir / "val_loss.png")
    return report


def load_teacher(
    recipe: Recipe,
    digest: str,
    cache_dir: Path,
    *,
    say: Callable[[str], None] | None = None,
    train_if_missing: bool = True,
) -> tuple[Any, dict[str, Any]]:
    """The llm demo's teacher for ``recipe`` and the corpus of ``digest``, from ``cache_dir``,
    and its info (``cache_path``, ``parameters``, training time and curve).

    When it is not cached: trained and cached by :func:`run_demo` itself (with one-step
    students, discarded), so there is one way to train it; with ``train_if_missing=False``,
    a FileNotFoundError that names the folder. ``say`` gets the lines of that training.
    """
    say = say if say is not None else (lambda message: None)
    try:
        return cached_teacher(recipe, digest, cache_dir, _not_cached, lambda message: None)
    except _NotCached as missing:
        if not train_if_missing:
            raise FileNotFoundError(
                f"the llm demo's teacher is not cached in {cache_dir}: run `dk demo llm` first "
                "(`dk demo llm --quick` for the quick recipe) with the same --cache-dir"
            ) from missing
    say("the llm demo's teacher is not cached yet: training it first (dk demo llm's recipe)")
    with tempfile.TemporaryDirectory() as scratch:
        run_demo(
            replace(recipe, student_steps=1, eval_every=0),
            cache_dir=cache_dir,
            output_dir=Path(scratch),
            log=say,
        )
    return cached_teacher(recipe, digest, cache_dir, _not_cached, say)


class _NotCached(Exception):
    pass


def _not_cached(*_: Any) -> Any:
    raise _NotCached


def cached_teacher(
    recipe: Recipe,
    digest: str,
    cache_dir: Path,
    fit: Callable[[Any, Any, int, int], dict[str, Any]],
    say: Callable[[str], None],
) -> tuple[Any, dict[str, Any]]:
    """The teacher cached under ``cache_dir`` for ``recipe`` and the corpus ``digest`` (its key
    hashes both), loaded from safetensors; else a fresh one trained by
    ``fit(model, None, steps, eval_every)`` (which returns ``train_seconds``,
    ``train_tokens_per_s`` and ``curve``) and cached atomically. Returns it and its info."""
    import transformers

    teacher_recipe = {
        "config": _gpt2_config(recipe.teacher_layers, recipe.teacher_width, recipe).to_dict(),
        "steps": recipe.teacher_steps,
        "learning_rate": recipe.learning_rate,
        "batch_size": recipe.batch_size,
        "seed": recipe.seed,
        "corpus": digest,
    }
    key = hashlib.sha256(
        json.dumps(teacher_recipe, sort_keys=True, default=str).encode()
    ).hexdigest()[:16]
    path = cache_dir / f"llm-demo-teacher-{key}"
    if (path / "meta.json").is_file():
        say(f"teacher: loaded from the cache {path}")
        check_safetensors_folder(path, f"the cached teacher {path}")  # never a pickle
        teacher = transformers.GPT2LMHeadModel.from_pretrained(path, use_safetensors=True)
        meta = json.loads((path / "meta.json").read_text())
        return teacher, {
            **meta,
            "cached": True,
            "cache_path": str(path),
            "parameters": count_parameters(teacher),
        }
    teacher = build_gpt2(recipe.teacher_layers, recipe.teacher_width, recipe, seed=recipe.seed)
    say(
        f"teacher ({recipe.teacher_layers} x {recipe.teacher_width}, {count_parameters(teacher):,} "
        f"parameters): {recipe.teacher_steps} steps from the data (cached for later runs)"
    )
    info = fit(teacher, None, recipe.teacher_steps, 0)  # 0: evaluated once, below
    meta = {key: info[key] for key in ("train_seconds", "train_tokens_per_s", "curve")}
    _save_atomically(teacher, meta, path)
    say(f"teacher: trained in {info['train_seconds']:.1f} s, saved to {path}")
    return teacher, {
        **meta,
        "cached": False,
        "cache_path": str(path),
        "parameters": count_parameters(teacher),
    }


def _save_atomically(model, meta: dict, path: Path) -> None:
    """safetensors + config.json + meta.json in a temporary folder, renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        (tmp / "meta.json").write_text(json.dumps(meta))
        os.replace(tmp, path)  # a folder rename: readers see all of it or none of it
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (path / "meta.json").is_file():  # another run may have won the race
            raise


def _gpt2_config(layers: int, width: int, recipe: Recipe):
    import transformers

    return transformers.GPT2Config(
        vocab_size=VOCAB_SIZE,
        n_positions=recipe.block_size,
        n_embd=width,
        n_layer=layers,
        n_head=max(1, width // 32),
        bos_token_id=0,
        eos_token_id=0,
    )


def build_gpt2(layers: int, width: int, recipe: Recipe, *, seed: int) -> Any:
    """A freshly initialised byte-level GPT-2 (``layers`` blocks of ``width``, the recipe's
    block size) from ``torch.manual_seed(seed)``: the demos' teacher, students and drafts."""
    import transformers

    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(_gpt2_config(layers, width, recipe))


def evaluate_heldout(model: Any, eval_data: list) -> dict[str, float]:
    """Held-out ``eval_loss`` (nats per byte), ``bits_per_byte`` (= loss / ln 2),
    ``perplexity`` (= exp loss), next-byte ``accuracy`` and ``eval_tokens_per_s``, over the
    batches of ``eval_data`` (:func:`~darkknowledge.llm.data.sequential_windows`)."""
    task = CausalLMTask()
    was_training = model.training
    model.eval()
    began = time.perf_counter()
    sums: dict[str, float] = {}
    for batch in eval_data:
        for name, value in task.eval_sums(model, batch).items():
            sums[name] = sums.get(name, 0.0) + value
    seconds = time.perf_counter() - began
    model.train(was_training)
    loss = sums["loss"] / sums["count"]
    return {
        "eval_loss": loss,
        "bits_per_byte": loss / math.log(2),
        "perplexity": math.exp(loss),
        "accuracy": sums["correct"] / sums["count"],
        "eval_tokens_per_s": sum(b["input_ids"].numel() for b in eval_data) / seconds,
    }


def _train_tokens(recipe: Recipe, steps: int) -> int:
    return steps * recipe.batch_size * recipe.block_size


def format_table(report: dict[str, Any]) -> str:
    """The comparison as a plain-text table, one row per model, and a line on the held-out data."""
    rows = [("model", "params", "bits/byte", "perplexity", "accuracy", "train tok/s", "eval tok/s")]
    for name, label in LABELS.items():
        m = report["models"][name]
        train = "cached" if m.get("cached") else f"{m['train_tokens_per_s']:.0f}"
        rows.append(
            (label, f"{m['parameters']:,}", f"{m['bits_per_byte']:.3f}", f"{m['perplexity']:.2f}",
             f"{m['accuracy']:.3f}", train, f"{m['eval_tokens_per_s']:.0f}")
        )  # fmt: skip
    lines = aligned_rows(rows)
    lines.append(
        f"held-out: {report['corpus']['heldout_bytes']:,} bytes of {len(report['corpus']['heldout_files'])} unseen stdlib files; total {report['total_seconds']:.0f} s on {report['threads']} threads"
    )
    return "\n".join(lines)


def _plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for name in ("distilled", "data_only"):
        label = LABELS[name]
        steps, losses = (
            zip(*report["models"][name]["curve"]) if report["models"][name]["curve"] else ((), ())
        )
        axes.plot(
            steps, [loss / math.log(2) for loss in losses], marker="o", markersize=3, label=label
        )
    axes.axhline(
        report["models"]["teacher"]["bits_per_byte"], color="grey", linestyle="--", label="teacher"
    )
    axes.set_xlabel("step")
    axes.set_ylabel("held-out bits per byte")
    axes.set_title("dk demo llm: byte-level GPT-2 on the Python stdlib")
    axes.legend()
    figure.tight_layout()
    save_figure(figure, path, format="png", dpi=120)
    plt.close(figure)
