"""Construction of the Distiller's parts: argument checks, Accelerator, frozen teacher, optimizer."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DataLoaderConfiguration

MIXED_PRECISION = ("no", "fp16", "bf16")
OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adamw": torch.optim.AdamW,
    "adam": torch.optim.Adam,
    "sgd": lambda groups, lr: torch.optim.SGD(groups, lr=lr, momentum=0.9),
}
TEACHER_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}  # fmt: skip
_RESERVED_LOSS_OPTIONS = ("temperature", "alpha", "normalizer", "reduction")


def validate_arguments(args: dict[str, Any]) -> None:
    """Check the Distiller's arguments; errors name the argument, the value and what is allowed."""
    for name in ("max_steps", "grad_accum_steps", "log_every"):
        value = args[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    for name in ("eval_every", "save_every"):
        value = args[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0 (0 = never), got {value!r}")
    if args["mixed_precision"] not in MIXED_PRECISION:
        raise ValueError(
            f"mixed_precision must be one of {MIXED_PRECISION}, got {args['mixed_precision']!r}"
        )
    if args["max_grad_norm"] is not None and not (
        isinstance(args["max_grad_norm"], int | float) and args["max_grad_norm"] > 0
    ):
        raise ValueError(
            f"max_grad_norm must be a float > 0 or None, got {args['max_grad_norm']!r}"
        )
    for name in ("learning_rate", "alpha"):
        value = args[name]
        if not callable(value) and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise TypeError(
                f"{name} must be a float or a schedule (step -> float), got {type(value).__name__}"
            )
    temperature = args["temperature"]
    if not (callable(temperature) or isinstance(temperature, int | float)) or isinstance(
        temperature, bool
    ):
        raise TypeError(
            f"temperature must be a float, a schedule or a LearnableTemperature, got {type(temperature).__name__}"
        )
    if isinstance(args["optimizer"], str) and args["optimizer"] not in OPTIMIZERS:
        raise ValueError(
            f"optimizer must be one of {sorted(OPTIMIZERS)} or a callable, got {args['optimizer']!r}"
        )
    if args["save_every"] and args["output_dir"] is None:
        raise ValueError(f"save_every={args['save_every']} needs output_dir, where checkpoints go")
    if args["eval_every"] and args["eval_data"] is None:
        raise ValueError(f"eval_every={args['eval_every']} needs eval_data")
    reserved = sorted(set(args["loss_options"]) & set(_RESERVED_LOSS_OPTIONS))
    if reserved:
        raise ValueError(
            f"loss_options may not set {reserved}: pass temperature/alpha to the Distiller; the normaliser is its own"
        )
    task_ignore = getattr(args["task"], "ignore_index", None)
    if (
        "ignore_index" in args["loss_options"]
        and args["loss_options"]["ignore_index"] != task_ignore
    ):
        raise ValueError(
            f"loss_options ignore_index={args['loss_options']['ignore_index']!r} differs from the task's {task_ignore!r}; set it on the task"
        )
    if isinstance(args["train_data"], Iterator) or not isinstance(args["train_data"], Iterable):
        kind = "a one-shot iterator" if isinstance(args["train_data"], Iterator) else "not iterable"
        raise TypeError(
            "train_data must be re-iterable (a DataLoader or a list of batches), got "
            f"{type(args['train_data']).__name__} ({kind})"
        )
    for name in ("student", "teacher"):
        if args[name] is not None and not isinstance(args[name], torch.nn.Module):
            raise TypeError(f"{name} must be a torch.nn.Module, got {type(args[name]).__name__}")
    if args["teacher"] is not None:
        student_params = {id(p) for p in args["student"].parameters()}
        if any(id(p) in student_params for p in args["teacher"].parameters()):
            raise ValueError(
                "student and teacher share parameters; the teacher is frozen, pass a separate student"
            )


def make_accelerator(mixed_precision: str) -> Accelerator:
    # AcceleratorState is a process-wide singleton that refuses a new mixed_precision; a second
    # Distiller in the same process (notebooks, tests) with another setting resets it.
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") not in (None, mixed_precision):
        AcceleratorState._reset_state()
    # Several processes and no GPU: Accelerate only picks its CPU backend (gloo) when told so.
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    cpu_only = not torch.cuda.is_available() and not (
        hasattr(torch, "xpu") and torch.xpu.is_available()
    )
    # The seedable sampler reshuffles with (seed + epoch), so a resumed run sees the same batches.
    return Accelerator(
        cpu=cpu_only and world_size > 1,
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=1,  # the Distiller accumulates itself, normalising by global counts
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )


def freeze_teacher(
    teacher: torch.nn.Module, dtype: torch.dtype | str | None, device
) -> torch.nn.Module:
    """Eval mode, no gradients, on ``device`` in ``dtype`` (in place, as ``Module.to`` is)."""
    if isinstance(dtype, str):
        if dtype not in TEACHER_DTYPES:
            raise ValueError(
                f"teacher_dtype must be one of {sorted(TEACHER_DTYPES)} or a torch.dtype, got {dtype!r}"
            )
        dtype = TEACHER_DTYPES[dtype]
    teacher.eval()
    for param in teacher.parameters():
        param.requires_grad_(False)
    return (
        teacher.to(device=device, dtype=dtype) if dtype is not None else teacher.to(device=device)
    )


def build_optimizer(
    optimizer, student, temperature_module, learning_rate, weight_decay
) -> torch.optim.Optimizer:
    """One optimizer for the student and the learnable temperature (without weight decay)."""
    groups = [
        {
            "params": [p for p in student.parameters() if p.requires_grad],
            "weight_decay": weight_decay,
        }
    ]
    if temperature_module is not None:
        groups.append({"params": list(temperature_module.parameters()), "weight_decay": 0.0})
    lr = learning_rate(0) if callable(learning_rate) else learning_rate
    if callable(optimizer):
        built = optimizer(groups)
        if not isinstance(built, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer callable must return a torch.optim.Optimizer, got {type(built).__name__}"
            )
        return built
    return OPTIMIZERS[optimizer](groups, lr=lr)


def student_config_dict(student: torch.nn.Module, given: dict | None) -> dict | None:
    if given is not None:
        return dict(given)
    config = getattr(student, "config", None)
    if config is None:
        return None
    if hasattr(config, "to_json_string"):  # Hugging Face: handles dtypes and nested configs
        return json.loads(config.to_json_string())
    return dict(config) if isinstance(config, dict) else None
