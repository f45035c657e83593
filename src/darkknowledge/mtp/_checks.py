"""Argument checks of :func:`darkknowledge.mtp.mtp_kd_loss`: errors that name the argument."""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Real
from typing import Any

import torch

from ..llm.heads import OutputLayer

DepthNormalizer = float | torch.Tensor | Sequence[float] | None


def check_states(depth_hidden: Any) -> list[torch.Tensor]:
    if isinstance(depth_hidden, torch.Tensor) or not isinstance(depth_hidden, Sequence):
        raise TypeError(
            "depth_hidden must be a list of (B, T, H) tensors, one per depth, got "
            f"{type(depth_hidden).__name__}"
        )
    states = list(depth_hidden)
    if not states or any(not isinstance(h, torch.Tensor) or h.dim() != 3 for h in states):
        shapes = [
            tuple(h.shape) if isinstance(h, torch.Tensor) else type(h).__name__ for h in states
        ]
        raise ValueError(
            f"depth_hidden must be a non-empty list of (B, T, H) tensors, got {shapes}"
        )
    if any(h.shape != states[0].shape for h in states):
        raise ValueError(
            f"every depth's states must have one shape, got {[tuple(h.shape) for h in states]}"
        )
    return states


def check_depths(depths: Sequence[int] | None, count: int) -> list[int]:
    if depths is None:
        return list(range(1, count + 1))
    values = list(depths)
    if (
        len(values) != count
        or any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in values)
        or len(set(values)) != count
    ):
        raise ValueError(
            f"depths must be {count} distinct ints >= 0, one per entry of depth_hidden, got {values}"
        )
    return values


def check_weights(depth_weights: Sequence[float] | None, count: int) -> list[float]:
    if depth_weights is None:
        return [1.0] * count
    values = list(depth_weights)
    if len(values) != count or any(
        isinstance(w, bool) or not isinstance(w, Real) or not math.isfinite(w) or w < 0
        for w in values
    ):
        raise ValueError(
            f"depth_weights must be {count} finite floats >= 0, one per depth, got {values}"
        )
    return [float(w) for w in values]


def check_token_tensor(value: Any, name: str, shape: tuple[int, int]) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a (B, T) tensor, got {type(value).__name__}")
    if tuple(value.shape) != shape or value.is_floating_point():
        raise ValueError(
            f"{name} must be an integer or bool tensor of shape (B, T) = {shape} like the states, "
            f"got shape {tuple(value.shape)} and dtype {value.dtype}"
        )


def as_layer(layer: Any, name: str) -> OutputLayer:
    if isinstance(layer, OutputLayer):
        return layer
    if isinstance(layer, torch.Tensor):
        return OutputLayer(layer, None)
    raise TypeError(
        f"{name} must be an OutputLayer (darkknowledge.llm.output_layer(model)) or a (V, H) "
        f"weight, got {type(layer).__name__}"
    )


def layer_to(layer: OutputLayer, device: torch.device) -> OutputLayer:
    bias = None if layer.bias is None else layer.bias.to(device)
    return layer._replace(weight=layer.weight.to(device), bias=bias)


def distils(
    teacher_hidden: Any, teacher_layer: Any, temperature: Any, alpha: Any, shape: tuple[int, int]
) -> bool:
    """Whether the loss has a soft term; checks the teacher arguments."""
    if (teacher_hidden is None) != (teacher_layer is None):
        raise ValueError("give teacher_hidden and teacher_layer together (or neither, labels only)")
    if teacher_hidden is None:
        if alpha not in (None, 0, 0.0):
            raise ValueError(
                f"alpha={alpha!r} weights a soft term, which needs a teacher: pass teacher_hidden "
                "and teacher_layer, or alpha=None for labels only"
            )
        return False
    if not isinstance(teacher_hidden, torch.Tensor) or tuple(teacher_hidden.shape[:2]) != shape:
        got = (
            tuple(teacher_hidden.shape)
            if isinstance(teacher_hidden, torch.Tensor)
            else teacher_hidden
        )
        raise ValueError(
            f"teacher_hidden must have shape (B, T, H_t) with (B, T) = {shape}, got {got}"
        )
    if alpha is None or temperature is None:
        raise ValueError(
            "with a teacher, pass alpha (the weight of the soft term, in [0, 1]) and temperature"
        )
    if isinstance(temperature, torch.Tensor) and temperature.dim() > 0:
        raise ValueError(
            "temperature must be a float or a 0-dim tensor for mtp_kd_loss (each depth reads "
            f"other positions), got shape {tuple(temperature.shape)}"
        )
    return alpha != 0


def normalizers(normalizer: DepthNormalizer, count: int) -> list[Any]:
    if (
        normalizer is None
        or isinstance(normalizer, Real)
        or (isinstance(normalizer, torch.Tensor) and normalizer.dim() == 0)
    ):
        return [normalizer] * count
    values = list(normalizer)
    if len(values) != count:
        raise ValueError(
            f"normalizer must be None, a number, or one number per depth ({count}), got {len(values)}"
        )
    # A depth without any valid row in the whole step sums to 0: any positive divisor keeps it
    # 0 (0/0 would be NaN). Done on the tensor, without a host sync.
    return [
        torch.where(value > 0, value, torch.ones_like(value))
        if isinstance(value, torch.Tensor)
        else (1.0 if value == 0 else value)
        for value in values
    ]
