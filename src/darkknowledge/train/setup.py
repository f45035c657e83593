"""Construction of the Distiller's parts: argument checks, frozen teacher, optimizer."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from ..schedules import value_at

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


def validate_arguments(
    *,
    student: Any,
    teacher: Any,
    train_data: Any,
    eval_data: Any,
    task: Any,
    temperature: Any,
    alpha: Any,
    loss_options: dict,
    optimizer: Any,
    learning_rate: Any,
    max_steps: Any,
    grad_accum_steps: Any,
    log_every: Any,
    eval_every: Any,
    save_every: Any,
    keep_last: Any,
    max_grad_norm: Any,
    mixed_precision: Any,
    output_dir: Any,
) -> None:
    """Check the Distiller's arguments; errors name the argument, the value and what is allowed."""
    counts = (
        ("max_steps", max_steps),
        ("grad_accum_steps", grad_accum_steps),
        ("log_every", log_every),
    )
    for name, value in counts:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    for name, value in (("eval_every", eval_every), ("save_every", save_every)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0 (0 = never), got {value!r}")
    if keep_last is not None and (
        isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1
    ):
        raise ValueError(f"keep_last must be an int >= 1 or None (keep all), got {keep_last!r}")
    if mixed_precision not in MIXED_PRECISION:
        raise ValueError(
            f"mixed_precision must be one of {MIXED_PRECISION}, got {mixed_precision!r}"
        )
    if max_grad_norm is not None and (
        isinstance(max_grad_norm, bool)
        or not isinstance(max_grad_norm, int | float)
        or not max_grad_norm > 0
    ):
        raise ValueError(f"max_grad_norm must be a float > 0 or None, got {max_grad_norm!r}")
    for name, value in (("learning_rate", learning_rate), ("alpha", alpha)):
        if value is None and name == "learning_rate":
            continue  # a callable optimizer keeps its own learning rate
        if not callable(value) and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise TypeError(
                f"{name} must be a float or a schedule (step -> float), got {type(value).__name__}"
            )
    if isinstance(temperature, bool) or not (
        callable(temperature) or isinstance(temperature, int | float)
    ):
        raise TypeError(
            "temperature must be a float, a schedule or a LearnableTemperature, got "
            f"{type(temperature).__name__}"
        )
    if isinstance(optimizer, str) and optimizer not in OPTIMIZERS:
        raise ValueError(
            f"optimizer must be one of {sorted(OPTIMIZERS)} or a callable, got {optimizer!r}"
        )
    if save_every and output_dir is None:
        raise ValueError(f"save_every={save_every} needs output_dir, where checkpoints go")
    if eval_every and eval_data is None:
        raise ValueError(f"eval_every={eval_every} needs eval_data")
    reserved = sorted(set(loss_options) & set(_RESERVED_LOSS_OPTIONS))
    if reserved:
        raise ValueError(
            f"loss_options may not set {reserved}: pass temperature/alpha to the Distiller; the normaliser is its own"
        )
    task_ignore = getattr(task, "ignore_index", None)
    if "ignore_index" in loss_options and loss_options["ignore_index"] != task_ignore:
        raise ValueError(
            f"loss_options ignore_index={loss_options['ignore_index']!r} differs from the task's {task_ignore!r}; set it on the task"
        )
    check_batches(train_data, "train_data")
    if eval_data is not None:
        check_batches(eval_data, "eval_data")
    for name, model in (("student", student), ("teacher", teacher)):
        if model is not None and not isinstance(model, torch.nn.Module):
            raise TypeError(f"{name} must be a torch.nn.Module, got {type(model).__name__}")
    if teacher is not None:
        student_params = {id(p) for p in student.parameters()}
        if any(id(p) in student_params for p in teacher.parameters()):
            raise ValueError(
                "student and teacher share parameters; the teacher is frozen, pass a separate student"
            )


def check_batches(data: Any, name: str) -> None:
    """``data`` must be a re-iterable of batches (a DataLoader, a list of batches), not a
    dataset of single examples (``datasets.Dataset``, ``TensorDataset``) nor an iterator.

    >>> check_batches(torch.utils.data.TensorDataset(torch.zeros(4, 2)), "train_data")
    Traceback (most recent call last):
    ...
    TypeError: train_data is a dataset of single examples (TensorDataset); wrap it in a DataLoader ...
    """
    if _is_map_dataset(data):
        raise TypeError(
            f"{name} is a dataset of single examples ({type(data).__name__}); wrap it in a "
            f"DataLoader that makes batches, e.g. torch.utils.data.DataLoader({name}, "
            "batch_size=32, shuffle=True, collate_fn=...)"
        )
    if isinstance(data, Iterator) or not isinstance(data, Iterable):
        kind = "a one-shot iterator" if isinstance(data, Iterator) else "not iterable"
        raise TypeError(
            f"{name} must be re-iterable (a DataLoader or a list of batches), got "
            f"{type(data).__name__} ({kind})"
        )


def _is_map_dataset(data: Any) -> bool:
    """A map-style dataset (indexable examples): a torch ``Dataset`` that is not iterable-style,
    or a Hugging Face ``datasets.Dataset`` (recognised by its module, not imported)."""
    if isinstance(data, list | tuple | DataLoader | IterableDataset):
        return False
    if isinstance(data, Dataset):
        return True
    return type(data).__module__.split(".")[0] == "datasets" and hasattr(data, "__getitem__")


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
    """One optimizer for the student and the learnable temperature (without weight decay).

    A callable ``optimizer`` receives the parameter groups and keeps its own learning rate
    when ``learning_rate`` is None; otherwise the Distiller sets it before every step."""
    groups = [
        {
            "params": [p for p in student.parameters() if p.requires_grad],
            "weight_decay": weight_decay,
        }
    ]
    if temperature_module is not None:
        groups.append({"params": list(temperature_module.parameters()), "weight_decay": 0.0})
    if callable(optimizer):
        built = optimizer(groups)
        if not isinstance(built, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer callable must return a torch.optim.Optimizer, got {type(built).__name__}"
            )
        return built
    return OPTIMIZERS[optimizer](groups, lr=value_at(learning_rate, 0))


def student_config_dict(student: torch.nn.Module, given: dict | None) -> dict | None:
    if given is not None:
        return dict(given)
    config = getattr(student, "config", None)
    if config is None:
        return None
    if hasattr(config, "to_json_string"):  # Hugging Face: handles dtypes and nested configs
        return json.loads(config.to_json_string())
    return dict(config) if isinstance(config, dict) else None
