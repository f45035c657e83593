"""``dk cache-teacher CONFIG [key=value ...]``: run the config's teacher once over its training
data and store its sparse targets in ``teacher.cache`` (docs/cache.md).

The settings come from the config's ``cache`` section (representation, k or num_samples,
capture temperature, values dtype, shard size, batch size, seed). A rerun with the same
config continues an interrupted capture from its last complete shard (a finished one is
reported as is); under ``torchrun`` the processes capture the shards between them. ``dk
distill CONFIG`` then trains the student from the cache, without the teacher.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ..config import load_config
from ._run import add_config_arguments

# cache.k and cache.num_samples when the config leaves them null: top-32, or 12 draws (about
# full KD's held-out bits per byte on the dk demo llm setup, docs/cache.md).
DEFAULT_K, DEFAULT_NUM_SAMPLES = 32, 12


def add_arguments(parser) -> None:
    add_config_arguments(parser)


def run(args) -> int:
    config = load_config(args.config, args.overrides)
    _check(config)
    from ..cache import write_teacher_cache
    from ._build import build_parts

    parts = build_parts(config)
    teacher = parts.model(config.teacher, "teacher").eval()
    device = _device()
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    teacher = teacher.to(device=device, dtype=dtype.get(config.teacher.dtype))
    spec = config.cache
    if spec.representation == "topk":
        width = {"k": spec.k or DEFAULT_K}
    else:
        width = {"num_samples": spec.num_samples or DEFAULT_NUM_SAMPLES}
    main = os.environ.get("RANK", "0") == "0"
    if main:
        print(
            f"teacher cache: {spec.representation} ({', '.join(f'{k}={v}' for k, v in width.items())}) "
            f"of {len(parts.data.train)} training sequences -> {config.teacher.cache} "
            f"(a rerun continues an interrupted capture)",
            flush=True,
        )
    manifest = write_teacher_cache(
        teacher, parts.data.train, config.teacher.cache, representation=spec.representation,
        batch_size=spec.batch_size, temperature=spec.temperature, seed=spec.seed,
        shard_size=spec.shard_size, values_dtype=spec.values_dtype, progress=main, **width,
    )  # fmt: skip
    if main:
        size = manifest["bytes_per_token"]
        print(
            f"done: {config.teacher.cache} holds {manifest['dataset']['sequences']} sequences, "
            f"{manifest['dataset']['positions']} positions, {size['payload']} bytes/token of "
            f"targets ({size['on_disk']:.2f} on disk); train from it: dk distill {args.config}"
            + "".join(f" {override}" for override in args.overrides)
        )
    return 0


def _check(config: Any) -> None:
    """Refuse, before any work, a config this command cannot capture from."""
    if config.task != "causal_lm":
        raise ValueError(
            f"dk cache-teacher captures causal LMs: set task: causal_lm (got {config.task!r})"
        )
    teacher = config.teacher
    if teacher is None:
        raise ValueError("dk cache-teacher needs a `teacher` section: the model to capture")
    if teacher.cache is None:
        raise ValueError(
            "teacher.cache: missing; set the folder the cache goes to, e.g. teacher.cache=runs/cache"
        )
    if teacher.checkpoint is None and teacher.train_steps > 0:
        raise ValueError(
            f"teacher.checkpoint: missing, and teacher.train_steps={teacher.train_steps} says the "
            "teacher is trained first: capture a trained teacher (e.g. after dk distill, "
            "teacher.checkpoint=<output_dir>/teacher/model.safetensors)"
        )


def _device() -> torch.device:
    """This process's GPU under torchrun (LOCAL_RANK), else the first GPU, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")
