"""Validation of user input for the loss functions.

Every check raises ``ValueError`` or ``TypeError`` naming the argument, the value received and
what is allowed, so that bad input never surfaces as a shape error deep inside PyTorch.
"""

from __future__ import annotations

import math
from numbers import Real

import torch

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd")
REDUCTIONS = ("mean", "sum", "none")


def check_positive(value: object, name: str, kind: str = "a number > 0") -> float:
    """A finite real number > 0 (not a bool), returned as a float. The one positive-number
    check of the package: temperatures, logit scales, softcaps, temperature ranges."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be {kind}, got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {name}={value!r}")
    return float(value)


def check_count(value: object, name: str, kind: str = "an integer >= 1") -> int:
    """An integer >= 1 (not a bool): a chunk size, a number of steps, a layer width. The one
    count check of the package; ``kind`` words the requirement in the message."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be {kind}, got {name}={value!r}")
    return value


def check_chunk_size(chunk_size: object) -> int:
    """Rows per chunk of a fused loss: an integer >= 1."""
    return check_count(chunk_size, "chunk_size")


def check_temperature(temperature: float | torch.Tensor, name: str = "temperature") -> None:
    """A temperature is a finite number > 0, or a tensor of them. A tensor's values are checked
    on CPU only: inspecting a GPU tensor's values would synchronise every step."""
    if isinstance(temperature, torch.Tensor):
        if not temperature.is_floating_point():
            raise TypeError(
                f"{name} must be a float or a floating-point tensor, got a tensor of dtype {temperature.dtype}"
            )
        if temperature.device.type == "cpu" and temperature.numel():
            values = temperature.detach()
            bad = ~(torch.isfinite(values) & (values > 0))
            if bool(bad.any()):
                raise ValueError(
                    f"{name} must be finite and > 0 everywhere, got a tensor holding {values[bad][0].item()!r}"
                )
        return
    check_positive(temperature, name, kind="a float > 0 or a tensor")


def temperature_for(
    temperature: float | torch.Tensor, leading_shape: torch.Size, name: str = "temperature"
) -> float | torch.Tensor:
    """A tensor temperature in the form the losses broadcast: 0-dim, or with as many
    dimensions as the logits' leading shape ``(...)``, each of size 1 or the leading size.

    ``(..., 1)`` (the logits' rank, a trailing 1) is accepted and squeezed: ``(B, 1)`` on
    ``(B, C)`` logits is one temperature per sample. A tensor of fewer dimensions than the
    leading shape is refused rather than broadcast from the right, where ``(B,)`` on
    ``(B, L, C)`` logits would silently become per position when B == L. A float stays a float.
    """
    check_temperature(temperature, name)
    if not isinstance(temperature, torch.Tensor) or temperature.dim() == 0:
        return temperature
    shape, rank = tuple(temperature.shape), len(leading_shape)
    if temperature.dim() == rank + 1 and shape[-1] == 1:
        temperature = temperature.squeeze(-1)
    if temperature.dim() == rank and all(
        size in (1, full) for size, full in zip(temperature.shape, leading_shape)
    ):
        return temperature
    per_sample = (leading_shape[0],) + (1,) * (rank - 1) if rank else ()
    raise ValueError(
        f"{name} of shape {shape} does not fit the logits' leading shape {tuple(leading_shape)}: "
        f"give a 0-dim tensor, one value per position {tuple(leading_shape)}, or per sample "
        f"{per_sample} (sizes of 1 broadcast; fewer dimensions are ambiguous and refused)"
    )


def check_unit_interval(value: float, name: str, *, closed_right: bool = True) -> None:
    """``value`` is a real number in [0, 1] (or [0, 1) when ``closed_right`` is False)."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a float in [0, 1], got {type(value).__name__} {value!r}")
    upper_ok = value <= 1 if closed_right else value < 1
    if not (math.isfinite(value) and value >= 0 and upper_ok):
        interval = "[0, 1]" if closed_right else "[0, 1)"
        raise ValueError(f"{name} must be in {interval}, got {name}={value!r}")


def check_divergence_name(kind: str, name: str = "divergence") -> None:
    if kind not in DIVERGENCES:
        raise ValueError(f"unknown {name} {kind!r}; valid names are: {', '.join(DIVERGENCES)}")


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(
            f"reduction must be one of {', '.join(map(repr, REDUCTIONS))}, got {reduction!r}"
        )


def check_logits(value: object, name: str, shape: str = "(..., C)") -> None:
    """A floating-point tensor of ``shape`` (at least one dimension)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    if value.dim() < 1:
        raise ValueError(
            f"{name} must have shape {shape} with at least one dimension, got a scalar"
        )


def check_logits_pair(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> None:
    """Student and teacher logits are floating tensors of the same shape ``(..., C)``."""
    check_logits(student_logits, "student_logits")
    check_logits(teacher_logits, "teacher_logits")
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError(
            f"student_logits and teacher_logits must have the same class dimension (last), got "
            f"{student_logits.shape[-1]} and {teacher_logits.shape[-1]}; if one vocabulary only adds "
            f"padding rows, slice both to the shared size first"
        )
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits and teacher_logits must have the same shape, got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )


def check_labels(
    labels: torch.Tensor, leading_shape: torch.Size, num_classes: int, ignore_index: int
) -> None:
    """Integer labels of shape ``leading_shape`` with values in [0, C) or ``ignore_index``.

    The values are checked on CPU only (as a tensor temperature's): on an accelerator the check
    would be a host sync per call, and an out-of-range label fails in the device's own gather."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(
            f"labels must be a torch.Tensor of class indices, got {type(labels).__name__}"
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise TypeError(
            f"labels must be an integer tensor of class indices, got dtype {labels.dtype}"
        )
    if labels.shape != leading_shape:
        raise ValueError(
            f"labels must have the logits' shape without the class dimension, {tuple(leading_shape)}, "
            f"got {tuple(labels.shape)}"
        )
    if labels.device.type != "cpu":
        return  # reading the values back would wait for the device at every call
    out_of_range = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
    if bool(out_of_range.any()):
        bad = labels[out_of_range][0].item()
        raise ValueError(
            f"labels must be in [0, {num_classes}) or ignore_index={ignore_index}, got a label {bad}"
        )


def check_mask(mask: torch.Tensor, leading_shape: torch.Size) -> None:
    """A boolean mask (True = keep) of shape ``leading_shape``."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a boolean torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a boolean tensor (True = keep), got dtype {mask.dtype}")
    if mask.shape != leading_shape:
        raise ValueError(
            f"mask must have the logits' shape without the class dimension, {tuple(leading_shape)}, "
            f"got {tuple(mask.shape)}"
        )


def check_labels_for_alpha(labels: torch.Tensor | None, alpha: float) -> None:
    """alpha < 1 weights a hard cross-entropy term, which needs labels."""
    if labels is None and alpha != 1.0:
        raise ValueError(
            f"labels=None with alpha={alpha!r}: alpha < 1 weights a hard cross-entropy term, "
            "which needs labels; pass labels, or alpha=1.0 for pure distillation"
        )
