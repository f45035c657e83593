"""Checks that tie fields to the config's ``task``: classifiers and causal LMs take different
models, data and loss options. Each problem names its field and what to write instead."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from ..llm.data import VOCAB_SIZE
from ..llm.models import BUILTIN_LLM_MODELS
from ..llm.vocab import is_padding
from ..models import BUILTIN_MODELS
from .schema import Config, ModelConfig


def task_problems(config: Any) -> list[str]:
    """Every problem of a (possibly partial) config whose fields do not suit its ``task``."""
    if not isinstance(config, Config):
        return []
    if config.task == "causal_lm":
        return (
            _causal_lm_problems(config)
            + _cache_problems(config)
            + _on_policy_problems(config)
            + _mtp_problems(config)
        )
    problems = _cache_problems(config) + [
        f"{path}.name: {spec.name!r} is a causal language model; set task: causal_lm"
        for path, spec in _models(config)
        if spec.name in BUILTIN_LLM_MODELS
    ]
    if config.data.name == "stdlib_bytes":
        problems.append("data.name: stdlib_bytes is text for causal LMs; set task: causal_lm")
    if config.distill.on_policy is not None:
        problems.append("distill.on_policy: samples text from the student; set task: causal_lm")
    if config.mtp is not None:
        problems.append("mtp: heads that predict tokens ahead; set task: causal_lm")
    return problems


def _causal_lm_problems(config: Config) -> list[str]:
    problems = []
    data = config.data
    user_data = data.name not in ("stdlib_bytes", "digits")
    for path, spec in _models(config):
        if spec.name in BUILTIN_MODELS:
            problems.append(
                f"{path}.name: {spec.name!r} is a classifier; task causal_lm takes hf_causal_lm "
                "or 'package.module:callable'"
            )
            continue
        if spec.hidden or spec.dropout:
            field = "hidden" if spec.hidden else "dropout"
            problems.append(
                f"{path}.{field}: not used by causal LMs; give the sizes in {path}.args "
                "(e.g. {model_type: gpt2, n_layer: 2, n_embd: 64, resid_pdrop: 0.1})"
            )
        if spec.name != "hf_causal_lm":
            continue
        if "model_type" not in spec.args and spec.checkpoint is None:
            problems.append(
                f"{path}.args.model_type: missing; hf_causal_lm builds a model from a config "
                f"(e.g. model_type: gpt2), or loads a save_pretrained folder given as {path}.checkpoint"
            )
        needs_vocab = "model_type" in spec.args and "vocab_size" not in spec.args
        if needs_vocab and user_data and data.vocab_size is None:
            problems.append(
                f"{path}.args.vocab_size: missing, and user data gives none; set it (your "
                "tokenizer's vocabulary size) here or once as data.vocab_size"
            )
    problems += _vocabulary_problems(config)
    if data.name == "digits":
        problems.append(
            "data.name: digits are images for classifiers; task causal_lm takes stdlib_bytes or "
            "'package.module:callable'"
        )
    if data.name == "stdlib_bytes":
        if data.prompt_length >= data.block_size:
            problems.append(
                f"data.prompt_length: must be smaller than data.block_size={data.block_size} "
                f"(a window needs a completion), got {data.prompt_length}"
            )
        if data.vocab_size is not None and data.vocab_size < VOCAB_SIZE:
            problems.append(
                f"data.vocab_size: stdlib_bytes has {VOCAB_SIZE} byte values, got {data.vocab_size}"
            )
    distill = config.distill
    refused = {
        "standardize": distill.standardize,
        "dkd_weights": distill.dkd_weights is not None,
        "learnable_temperature.per_sample": (
            distill.learnable_temperature is not None and distill.learnable_temperature.per_sample
        ),
    }
    problems += [
        f"distill.{name}: not available for task causal_lm (the fused loss never builds the "
        "full logits it needs)"
        for name, on in refused.items()
        if on
    ]
    if distill.unlabelled != "skip":
        problems.append(
            "distill.unlabelled: for classifiers; a causal LM's batch marks the tokens that count "
            "itself (labels -100, prompt_lengths, completion_mask)"
        )
    return problems


def _on_policy_problems(config: Config) -> list[str]:
    """On-policy distillation needs prompts to sample from, and its sampled reverse KL a
    reverse-KL divergence at a fixed temperature."""
    on_policy, distill, data = config.distill.on_policy, config.distill, config.data
    if on_policy is None:
        return []
    problems = []
    if data.name == "stdlib_bytes" and data.prompt_length == 0:
        problems.append(
            "data.prompt_length: distill.on_policy samples completions of prompts; set the "
            "prompt's length in bytes (e.g. half of data.block_size)"
        )
    if on_policy.objective == "sampled_reverse_kl":
        if distill.divergence != "reverse_kl":
            problems.append(
                "distill.divergence: distill.on_policy.objective sampled_reverse_kl estimates "
                "reverse KL (and uses it exactly on the data's steps): set divergence: "
                f"reverse_kl, got {distill.divergence!r}"
            )
        if distill.learnable_temperature is not None:
            problems.append(
                "distill.learnable_temperature: sampled_reverse_kl needs a fixed temperature"
            )
    if on_policy.sampler == "generate" and on_policy.sampler_args:
        problems.append(
            "distill.on_policy.sampler_args: for a package.module:callable sampler; the built-in "
            "generate sampler takes the fields of distill.on_policy"
        )
    return problems


def _mtp_problems(config: Config) -> list[str]:
    """MTP heads go on the one student, trained by their own task."""
    mtp = config.mtp
    if mtp is None:
        return []
    problems = []
    if mtp.depth_weights is not None and len(mtp.depth_weights) != mtp.num_depths:
        problems.append(
            f"mtp.depth_weights: one weight per depth (mtp.num_depths={mtp.num_depths}), got "
            f"{len(mtp.depth_weights)}: {list(mtp.depth_weights)}"
        )
    if config.stages:
        problems.append("mtp: heads go on one `student`, not on a `stages` chain")
    if config.distill.on_policy is not None:
        problems.append("mtp: not with distill.on_policy (the MTP task reads the data's text)")
    if config.teacher is not None and config.teacher.cache is not None:
        problems.append("mtp: not with teacher.cache (each depth reads the live teacher's states)")
    return problems


def _vocabulary_problems(config: Config) -> list[str]:
    """Models whose ``args.vocab_size`` differs from the teacher's by more than padding: two
    tokenizers, which distillation (token id by token id) cannot compare."""
    teacher = config.teacher.args.get("vocab_size") if config.teacher is not None else None
    if not isinstance(teacher, int) or isinstance(teacher, bool):
        return []
    problems = []
    for path, spec in _models(config):
        size = spec.args.get("vocab_size")
        if path == "teacher" or not isinstance(size, int) or isinstance(size, bool):
            continue
        if size != teacher and not is_padding(min(size, teacher), max(size, teacher)):
            problems.append(
                f"{path}.args.vocab_size: {size}, and teacher.args.vocab_size is {teacher}: not "
                "one vocabulary, nor one padded to a multiple of a power of two (e.g. 50257 -> "
                "50304); distillation needs the teacher's tokenizer"
            )
    return problems


def _models(config: Config) -> Iterator[tuple[str, ModelConfig]]:
    if config.teacher is not None:
        yield "teacher", config.teacher
    if config.student is not None:
        yield "student", config.student
    for index, spec in enumerate(config.stages):
        yield f"stages.{index}", spec


def causal_lm_checkpoint_problems(spec: ModelConfig, path: str) -> list[str]:
    """What ``dk`` would meet loading ``spec.checkpoint`` of a causal LM: a safetensors file, a
    folder holding weights, or (without ``args.model_type``) a ``save_pretrained`` folder."""
    import os

    from ..llm.models import WEIGHT_FILES, check_safetensors_folder

    checkpoint = spec.checkpoint
    where = os.path.abspath(checkpoint)
    if not os.path.isdir(checkpoint):
        if os.path.isfile(checkpoint):
            return []
        return [f"{path}.checkpoint: no file or folder {checkpoint!r} (looked for {where})"]
    if spec.name == "hf_causal_lm" and "model_type" not in spec.args:
        if os.path.isfile(os.path.join(checkpoint, "config.json")):
            try:  # safetensors weights only: a pytorch_model.bin is a pickle, never loaded
                check_safetensors_folder(checkpoint, f"{path}.checkpoint")
            except ValueError as error:
                return [str(error)]
            return []
        return [
            f"{path}.checkpoint: the folder {where} has no config.json (not a save_pretrained "
            f"folder); give {path}.args.model_type and the sizes to build the model instead"
        ]
    if any(os.path.isfile(os.path.join(checkpoint, name)) for name in WEIGHT_FILES):
        return []
    return [f"{path}.checkpoint: the folder {where} holds neither {' nor '.join(WEIGHT_FILES)}"]


def _cache_problems(config: Config) -> list[str]:
    """``teacher.cache`` (training from a teacher cache): one causal-LM student, forward KL;
    the ``cache`` section's width field of the other representation is refused, not ignored."""
    spec, problems = config.cache, []
    unused, used = (
        ("k", "num_samples") if spec.representation == "sampled" else ("num_samples", "k")
    )
    if getattr(spec, unused) is not None:
        problems.append(
            f"cache.{unused}: not used by cache.representation {spec.representation!r} (it takes "
            f"cache.{used}); remove it, or set the representation that uses it"
        )
    if config.teacher is None or config.teacher.cache is None:
        return problems
    if config.task != "causal_lm":
        return [
            *problems,
            "teacher.cache: a teacher cache holds next-token targets; set task: causal_lm",
        ]
    distill = config.distill
    if config.stages:
        problems.append(
            "teacher.cache: not with `stages` (each assistant teaches the next one live); "
            "give one `student`"
        )
    if distill.divergence != "forward_kl":
        problems.append(
            f"distill.divergence: training from teacher.cache is forward KL (the sparse loss), "
            f"got {distill.divergence!r}"
        )
    if distill.learnable_temperature is not None:
        problems.append(
            "distill.learnable_temperature: not with teacher.cache (the sparse loss has no "
            "gradient for T); give distill.temperature"
        )
    if getattr(distill, "on_policy", None):
        problems.append("distill.on_policy: samples need the live teacher; remove teacher.cache")
    return problems
