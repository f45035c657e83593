"""The labels-only objective: cross-entropy of the student, no teacher, no soft term.

    L_hard = CE(z_s, y) = lse(z_s) − z_s[y],      reduced over valid positions

For the baselines that train on labels alone. It returns a :class:`KDLoss` like the
distillation losses (``total = hard``, ``soft = 0``), so a training loop reads one structure
either way, but it computes no teacher projection and no divergence.
"""

from __future__ import annotations

import torch

from .fused import DEFAULT_CHUNK_SIZE, fused_linear_kd_loss
from .kd import KDLoss, kd_loss
from .reduction import Normalizer


def hard_only_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    normalizer: Normalizer = None,
) -> KDLoss:
    """Cross-entropy of ``student_logits`` against ``labels``, as ``KDLoss(total, soft, hard)``.

    Args:
        student_logits: ``(..., C)`` any float dtype (math in float32; float64 stays float64).
        labels: ``(...)`` integer targets, ``ignore_index`` where a position does not count.
        ignore_index, mask, reduction, normalizer: as in :func:`darkknowledge.kd_loss`.

    Returns:
        ``KDLoss(total=hard, soft=0, hard)``; ``total`` and ``hard`` carry the gradient.

    >>> import torch
    >>> logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]], requires_grad=True)
    >>> loss = hard_only_loss(logits, torch.tensor([0, 2]))
    >>> round(float(loss.total.detach()), 4), float(loss.soft)  # (0.1698 + 1.0986) / 2
    (0.6342, 0.0)
    >>> loss.total.backward()
    """
    if not isinstance(student_logits, torch.Tensor):
        raise TypeError(
            f"student_logits must be a torch.Tensor, got {type(student_logits).__name__}"
        )
    if labels is None:
        raise ValueError("hard_only_loss needs labels: it is the cross-entropy against them")
    # The teacher argument is never read for its values: alpha = 0 weights the soft term 0.
    loss = kd_loss(
        student_logits, student_logits.detach(), labels, temperature=1.0, alpha=0.0,
        ignore_index=ignore_index, mask=mask, reduction=reduction, normalizer=normalizer,
    )  # fmt: skip
    return KDLoss(loss.total, torch.zeros_like(loss.soft), loss.hard)


def fused_linear_cross_entropy(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    student_bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    normalizer: Normalizer = None,
    reduction: str = "mean",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    student_logit_scale: float = 1.0,
    student_softcap: float | None = None,
    vocab_size: int | None = None,
) -> KDLoss:
    """Cross-entropy of ``z = scale · (h Wᵀ + b)`` (then the optional softcap) against
    ``labels``, chunk by chunk, never holding the ``(N, V)`` logits.

    The labels-only counterpart of :func:`darkknowledge.fused_linear_kd_loss`, with the same
    student-side arguments; ``vocab_size`` cuts the output layer to its first rows (padding
    rows get a zero gradient). Returns ``KDLoss(total=hard, soft=0, hard)``; only ``total``
    carries a gradient.

    >>> import torch
    >>> hidden, weight = torch.randn(6, 8, requires_grad=True), torch.randn(50, 8)
    >>> labels = torch.tensor([1, 2, 3, -100, 4, 5])
    >>> fused = fused_linear_cross_entropy(hidden, weight, labels, chunk_size=4)
    >>> plain = torch.nn.functional.cross_entropy(hidden @ weight.T, labels)
    >>> bool(torch.allclose(fused.total, plain))
    True
    """
    if labels is None:
        raise ValueError(
            "fused_linear_cross_entropy needs labels: it is the cross-entropy against them"
        )
    if not isinstance(student_hidden, torch.Tensor) or not isinstance(student_weight, torch.Tensor):
        raise TypeError("student_hidden and student_weight must be torch.Tensors")
    bias = None if student_bias is None else student_bias.detach()
    loss = fused_linear_kd_loss(
        student_hidden, student_weight, student_hidden.detach(), student_weight.detach(), labels,
        temperature=1.0, alpha=0.0, chunk_size=chunk_size, ignore_index=ignore_index,
        student_bias=student_bias, teacher_bias=bias, normalizer=normalizer, reduction=reduction,
        student_logit_scale=student_logit_scale, teacher_logit_scale=student_logit_scale,
        student_softcap=student_softcap, teacher_softcap=student_softcap, vocab_size=vocab_size,
    )  # fmt: skip
    return KDLoss(loss.total, torch.zeros_like(loss.soft), loss.hard)
