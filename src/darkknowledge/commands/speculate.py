"""``dk speculate CONFIG [key=value ...]``: speculative decoding of a config's trained models,
measured against plain decoding, beside the speed-up the acceptance rate predicts.

The config is a ``task: causal_lm`` run (``dk distill``/``dk train``), read with its
``speculate`` section:

- without an ``mtp`` section the **teacher is the target** and the **student the draft**
  (DistillSpec: the student distilled to be a good draft); their weights come from
  ``speculate.target_checkpoint`` / ``speculate.draft_checkpoint``, or else the teacher's
  ``checkpoint`` and the run's outputs (``<train.output_dir>/teacher``, ``.../student``, or
  ``.../baseline`` after ``dk train``);
- with an ``mtp`` section the student is a model with multi-token-prediction heads and
  **speculates on itself**: its model is the target, its heads the draft.

It prints the acceptance rate offline (on the config's eval data, without decoding) and in
decoding, tokens per target call, the cost ratio ``c`` and verification cost ``v``, the
measured speed-up and the predicted ones; ``<train.output_dir>/speculate.json`` keeps them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._files import write_json
from ..config import Config, load_config
from ._build import build_parts
from ._run import add_config_arguments


def add_arguments(parser) -> None:
    add_config_arguments(parser)


def run(args) -> int:
    config = load_config(args.config, args.overrides)
    speculate(config, log=lambda line: print(line, flush=True))
    return 0


def speculate(config: Config, *, log: Any = print) -> dict[str, Any]:
    """Build, load, score and time the config's target and draft; returns the report."""
    import darkknowledge as dk

    spec = config.speculate
    if config.task != "causal_lm":
        raise ValueError(
            f"dk speculate decodes causal LMs: set task: causal_lm (got {config.task!r})"
        )
    if config.student is None:
        raise ValueError("dk speculate needs a `student` section: the draft (or the MTP student)")
    torch.set_num_threads(spec.threads)
    parts = build_parts(config)
    sampling = {"temperature": spec.temperature, "greedy": spec.greedy}
    output_dir = config.train.output_dir
    if config.mtp is not None:
        student = parts.model(config.student, "student")
        _check_positions(student.model, spec.prompt_length + spec.max_new_tokens)
        source = _load(
            parts, student, spec.draft_checkpoint, output_dir, "draft", ("student", "baseline")
        )
        student.eval()
        target, draft = student.model, dk.mtp.MTPDrafter(student)
        rates = _depth_rates(dk, student, parts.data.eval, sampling)
        offline: float | list[float] = rates
        sources = {"student (MTP self-speculation)": source}
        gamma = min(spec.gamma, student.num_depths)
    else:
        if config.teacher is None:
            raise ValueError("dk speculate needs a `teacher` section: the target of the draft")
        target = parts.model(config.teacher, "teacher")
        _check_positions(target, spec.prompt_length + spec.max_new_tokens)
        target_source = _load(
            parts, target, spec.target_checkpoint or config.teacher.checkpoint, output_dir,
            "target", ("teacher",),
        )  # fmt: skip
        draft = parts.model(config.student, "student")
        draft_source = _load(
            parts, draft, spec.draft_checkpoint, output_dir, "draft", ("student", "baseline")
        )
        target.eval(), draft.eval()
        offline = dk.speculative.offline_acceptance_rate(
            target, draft, parts.data.eval, **sampling
        ).rate
        sources = {"target (teacher)": target_source, "draft (student)": draft_source}
        gamma = spec.gamma
    prompts = _prompts(parts.data.eval, spec.prompts, spec.prompt_length)
    log(f"speculative decoding: {spec.prompts} prompts of {spec.prompt_length} tokens from the eval "
        f"data, {spec.max_new_tokens} new tokens, gamma {gamma}, "
        + ("greedy" if spec.greedy else f"sampling at T = {spec.temperature:g}"))  # fmt: skip
    for role, source in sources.items():
        log(f"  {role}: {source}")
    measured = dk.speculative.measure_speedup(
        target, draft, prompts, max_new_tokens=spec.max_new_tokens, gamma=gamma,
        repeats=spec.repeats, seed=spec.seed, **sampling,
    )  # fmt: skip
    report = {
        **measured.as_dict(),
        "sources": sources,
        "offline_acceptance": offline,
        "predicted_speedup_offline": measured.predicted_speedup(offline),
        "predicted_speedup_offline_with_verification": measured.predicted_speedup(
            offline, verification_cost=True
        ),
    }
    for line in _summary(report, offline):
        log(line)
    if output_dir is not None:
        path = write_json(Path(output_dir) / "speculate.json", report)
        log(f"report: {path}")
    return report


def _load(parts, model: nn.Module, checkpoint, output_dir, role: str, stages) -> str:
    """Load ``model``'s weights from ``checkpoint``, or from the run's stage folder."""
    if checkpoint is not None:
        parts.load(model, checkpoint)
        return checkpoint
    for stage in stages:
        if output_dir is None:
            break
        folder = os.path.join(output_dir, stage, "model.safetensors")
        if os.path.isfile(folder):
            parts.load(model, folder)
            return folder
    looked = ", ".join(f"{output_dir}/{s}/model.safetensors" for s in stages) if output_dir else ""
    raise FileNotFoundError(
        f"no weights for the {role}: set speculate.{role}_checkpoint"
        + (
            f" (looked for {looked}; run dk distill first)"
            if looked
            else " (train.output_dir is null)"
        )
    )


def _depth_rates(dk, student, batches, sampling) -> list[float]:
    """Per-depth offline acceptance on the eval batches (each weighted by its rows)."""
    from ..llm.labels import shift_labels

    total, rows = None, 0
    for batch in batches:
        ids, mask = batch["input_ids"], batch.get("attention_mask")
        rates = dk.mtp.depth_acceptance_rates(
            student, ids, shift_labels(ids, mask), attention_mask=mask, **sampling
        )
        total = rates * ids.shape[0] if total is None else total + rates * ids.shape[0]
        rows += ids.shape[0]
    return (total / rows).tolist()


def _prompts(batches, count: int, length: int) -> list[torch.Tensor]:
    """The first ``length`` real tokens of the first ``count`` eval rows long enough."""
    prompts = []
    for batch in batches:
        ids, mask = batch["input_ids"], batch.get("attention_mask")
        for row in range(ids.shape[0]):
            tokens = ids[row] if mask is None else ids[row][mask[row].bool()]
            if tokens.numel() >= length:
                prompts.append(tokens[:length].reshape(1, -1).long())
            if len(prompts) == count:
                return prompts
    raise ValueError(
        f"speculate.prompts: the eval data hold {len(prompts)} rows of at least "
        f"speculate.prompt_length={length} tokens, fewer than the {count} asked for"
    )


def _check_positions(target: nn.Module, needed: int) -> None:
    config = getattr(target, "config", None)
    limit = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and needed > limit:
        raise ValueError(
            f"speculate.prompt_length + speculate.max_new_tokens = {needed} exceeds the target's "
            f"{limit} positions; shorten one of them"
        )


def _summary(report: dict[str, Any], offline) -> list[str]:
    rates = offline if isinstance(offline, list) else [offline]
    shown = " / ".join(f"{rate:.3f}" for rate in rates)
    return [
        f"acceptance rate: {shown} offline{' (per depth)' if len(rates) > 1 else ''}, "
        f"{report['acceptance_rate']:.3f} in decoding; {report['tokens_per_target_call']:.2f} "
        "tokens per target call",
        f"cost ratio c = {report['cost_ratio']:.3f} (draft step / plain step), verification cost "
        f"v = {report['verification_cost']:.2f} (round outside the draft / plain step)",
        f"speed-up over plain decoding with KV cache: {report['speedup']:.2f} measured "
        f"({report['plain_seconds']:.3f} s / {report['speculative_seconds']:.3f} s, median of "
        f"{report['repeats']}); predicted {report['predicted_speedup_offline']:.2f} "
        f"(expected_speedup from the offline rate and c), "
        f"{report['predicted_speedup_offline_with_verification']:.2f} with v",
    ]
