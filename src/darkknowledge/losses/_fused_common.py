"""What every fused loss does around the chunk engine, in one place.

The fused losses (:func:`~.fused.fused_linear_kd_loss`, :func:`~.hard.fused_linear_cross_entropy`,
:func:`~.sparse.fused_linear_sparse_kd_loss`) differ only in their objective and teacher side.
They share the checks of the student's hidden states and output layer, the autocast dtype, the
cut to a shared vocabulary and the normalizer; then they call the engine's
:func:`~.engine.chunker.run_fused_linear`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import _checks
from .engine.sides import Head
from .reduction import Normalizer
from .transforms import compute_dtype


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype in force on ``device_type``, or None when autocast is off."""
    try:
        enabled = torch.is_autocast_enabled(device_type)  # torch >= 2.4
        return torch.get_autocast_dtype(device_type) if enabled else None
    except (TypeError, AttributeError):
        if device_type == "cuda" and torch.is_autocast_enabled():
            return torch.get_autocast_gpu_dtype()
        if device_type == "cpu" and torch.is_autocast_cpu_enabled():
            return torch.get_autocast_cpu_dtype()
        return None


def cast_for_autocast(*tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """As ``nn.Linear`` under autocast: the products run in the autocast dtype (the loss math in
    float32 as always) and autograd casts the gradients back to the parameters' dtype."""
    first = next(t for t in tensors if isinstance(t, torch.Tensor))
    dtype = autocast_dtype(first.device.type)
    if dtype is None:
        return tensors
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) else t for t in tensors)


def check_tensor(value: object, name: str) -> None:
    _checks.check_logits(value, name, shape="(..., H)")


def check_weight(weight: object, name: str, hidden: torch.Tensor, hidden_name: str) -> None:
    check_tensor(weight, name)
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{name} must have shape (V, H) with H = {hidden_name}.shape[-1] = {hidden.shape[-1]}, "
            f"got {tuple(weight.shape)}"
        )
    if weight.dtype != hidden.dtype:
        raise TypeError(
            f"{name} and {hidden_name} must have the same dtype, got {weight.dtype} and {hidden.dtype}"
        )


def check_reduction(reduction: str) -> None:
    if reduction not in ("mean", "sum"):
        raise ValueError(
            f'reduction must be "mean" or "sum" for a fused loss, got {reduction!r}; per-position '
            'losses ("none") would need the per-position gradients, use the loss on logits'
        )


def head(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    side: str,
    vocab: int,
    scale: float,
    softcap: float | None,
) -> Head:
    """The output layer cut to ``vocab`` rows, checked; detached (the engine computes its
    gradients itself)."""
    if bias is not None:
        check_tensor(bias, f"{side}_bias")
        if bias.shape != weight.shape[:1] or bias.dtype != weight.dtype:
            raise ValueError(
                f"{side}_bias must have shape ({weight.shape[0]},) and dtype {weight.dtype} like "
                f"{side}_weight, got {tuple(bias.shape)} and {bias.dtype}"
            )
    scale = _checks.check_positive(scale, f"{side}_logit_scale", kind="a float > 0")
    if softcap is not None:
        softcap = _checks.check_positive(softcap, f"{side}_softcap", kind="a float > 0 or None")
    return Head(
        weight=weight[:vocab].detach(),
        bias=None if bias is None else bias[:vocab].detach(),
        scale=scale,
        softcap=softcap,
    )


def check_vocab_size(vocab_size: int | None, rows: int, name: str = "student_weight") -> int:
    """``vocab_size`` (or all ``rows`` of the output layer when None), in ``[1, rows]``."""
    if vocab_size is None:
        return rows
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise TypeError(f"vocab_size must be an int or None, got {type(vocab_size).__name__}")
    if not 1 <= vocab_size <= rows:
        raise ValueError(
            f"vocab_size must be in [1, {rows}] (the rows of {name}), got vocab_size={vocab_size}"
        )
    return vocab_size


def normalizer_for(
    reduction: str,
    normalizer: Normalizer,
    valid: torch.Tensor | None,
    num_rows: int,
    dtype: torch.dtype,
) -> float | torch.Tensor:
    """What the engine divides every chunk's sums by: 1 for a sum; for a mean ``normalizer``,
    or the count of valid rows over *all* chunks, so that the chunk sums add up to the mean (the
    clamp keeps an all-masked batch at 0, as ``reduce_positions`` does). No host sync."""
    if reduction == "sum":
        return 1.0
    if normalizer is None:
        return max(num_rows, 1) if valid is None else valid.sum().clamp_min(1).to(dtype)
    if isinstance(normalizer, torch.Tensor):
        return normalizer.to(dtype)
    if isinstance(normalizer, bool) or not isinstance(normalizer, int | float) or normalizer <= 0:
        raise ValueError(
            f"normalizer must be > 0 (a global count of valid positions), got {normalizer!r}"
        )
    return float(normalizer)


def math_dtype(hidden: torch.Tensor) -> torch.dtype:
    return compute_dtype(hidden.dtype)


class StudentInputs(NamedTuple):
    """The checked student side of a fused call."""

    hidden: torch.Tensor  # (N, H), in the autocast dtype if autocast is on
    weight: torch.Tensor  # (V_s, H): the tensor that receives the gradient, all its rows
    bias: torch.Tensor | None
    head: Head  # the layer the objective sees: cut to the vocabulary, scale, softcap
    leading_shape: torch.Size


def student_inputs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    chunk_size: int,
    vocab_size: int | None,
    logit_scale: float,
    softcap: float | None,
) -> StudentInputs:
    """Check and prepare the student of a fused loss with one output layer (the labels-only and
    the sparse-teacher losses): dtypes under autocast, shapes, chunk size, vocabulary cut."""
    check_tensor(hidden, "student_hidden")
    hidden, weight, bias = cast_for_autocast(hidden, weight, bias)
    check_weight(weight, "student_weight", hidden, "student_hidden")
    _checks.check_chunk_size(chunk_size)
    vocab = check_vocab_size(vocab_size, weight.shape[0])
    head_ = head(weight, bias, "student", vocab, logit_scale, softcap)
    flat = hidden.reshape(-1, hidden.shape[-1])  # (N, H)
    return StudentInputs(flat, weight, bias, head_, hidden.shape[:-1])
