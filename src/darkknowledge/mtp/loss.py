"""The multi-token-prediction distillation loss, on the fused (chunked) loss of each depth.

Depth ``d`` row ``i`` predicts token ``i + d + 1`` and is matched to the teacher's distribution
at position ``i + d`` (teacher forcing: the teacher there predicts that same token). With the
library's shifted labels (``labels[:, t] = input_ids[:, t + 1]``, :func:`~darkknowledge.llm.
shift_labels`), depth ``d`` pairs

    student row i   <->   teacher row i + d   <->   labels[:, i + d]      for i < T − d

and the loss is

    L = Σ_d w_d · L_d,    L_d = (1/N_d) Σ_{valid i} (1 − alpha) CE(z^d_i, y_{i+d})
                                                 + alpha · T² · D(p_{i+d}, q^d_i)

a row counting when ``labels[:, i + d] != ignore_index`` and position ``i`` is a real token
(``attention_mask``). Each ``L_d`` is :func:`darkknowledge.fused_linear_kd_loss` (or
:func:`darkknowledge.losses.fused_linear_cross_entropy` without a teacher) on the shifted rows,
so no depth's ``(tokens, vocab)`` logits ever exist.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from ..llm.heads import OutputLayer
from ..losses import KDLoss, fused_linear_cross_entropy
from ..losses.fused import DEFAULT_CHUNK_SIZE, fused_linear_kd_loss
from . import _checks
from ._checks import DepthNormalizer


class MTPLoss(NamedTuple):
    """``total`` (differentiable), ``soft`` and ``hard`` (detached: ``Σ_d w_d · part_d``) and
    each depth's unweighted, detached ``KDLoss`` in ``per_depth`` (keyed by depth)."""

    total: torch.Tensor
    soft: torch.Tensor
    hard: torch.Tensor
    per_depth: dict[int, KDLoss]

    def as_kd_loss(self) -> KDLoss:
        """``KDLoss(total, soft, hard)``, what a Distiller task returns."""
        return KDLoss(self.total, self.soft, self.hard)

    def log_values(self) -> dict[str, torch.Tensor]:
        """``{"depth{d}/total": ..., "depth{d}/soft": ..., "depth{d}/hard": ...}`` for logging."""
        return {
            f"depth{depth}/{name}": value
            for depth, part in self.per_depth.items()
            for name, value in part._asdict().items()
        }


def depth_labels(
    labels: torch.Tensor,
    depth: int,
    attention_mask: torch.Tensor | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """The targets of depth ``depth``'s rows ``0 .. T − depth − 1``: ``(B, T) -> (B, T − depth)``.

    ``labels[:, depth:]``, with ``ignore_index`` where the predicting position ``i`` is padding.

    >>> labels = torch.tensor([[5, 6, 7, -100]])      # shifted: position t predicts token t + 1
    >>> depth_labels(labels, 1)                       # depth 1: row i predicts token i + 2
    tensor([[   6,    7, -100]])
    """
    length = labels.shape[1]
    rows = max(length - depth, 0)
    targets = labels[:, depth:]
    if attention_mask is not None:
        targets = targets.masked_fill(attention_mask[:, :rows] == 0, ignore_index)
    return targets


def count_valid_per_depth(
    labels: torch.Tensor,
    depths: Sequence[int],
    attention_mask: torch.Tensor | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """``(len(depths),)`` int64: the rows that count at each depth (sum them over the
    micro-batches of a step and pass them as ``normalizer`` for exact per-depth means)."""
    return torch.stack(
        [
            (depth_labels(labels, d, attention_mask, ignore_index) != ignore_index).sum()
            for d in depths
        ]
    )


def mtp_kd_loss(
    depth_hidden: Sequence[torch.Tensor],
    student_layer: OutputLayer | torch.Tensor,
    labels: torch.Tensor,
    *,
    teacher_hidden: torch.Tensor | None = None,
    teacher_layer: OutputLayer | torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    depths: Sequence[int] | None = None,
    depth_weights: Sequence[float] | None = None,
    temperature: float | torch.Tensor | None = None,
    alpha: float | None = None,
    divergence: str = "forward_kl",
    normalizer: DepthNormalizer = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    ignore_index: int = -100,
    vocab_size: int | None = None,
    beta: float = 0.5,
    lam: float = 0.1,
    soft_scale: str | float = "T2",
) -> MTPLoss:
    """``Σ_d w_d · L_d`` over the depths' states, each ``L_d`` a fused KD loss on shifted rows.

    Args:
        depth_hidden: one ``(B, T, H)`` state per depth (all the same shape), e.g.
            ``MTPStudent(...).depth_hidden``; entry ``j`` is depth ``depths[j]``.
        student_layer: the shared output layer (:func:`darkknowledge.llm.output_layer`), or its
            ``(V, H)`` weight alone.
        labels: ``(B, T)`` shifted labels (:func:`darkknowledge.llm.shift_labels`):
            ``labels[:, t]`` is token ``t + 1``, ``ignore_index`` where it does not count. Needed
            also at ``alpha = 1``: they say which targets exist.
        teacher_hidden: ``(B, T, H_t)`` the teacher's last hidden states on the same tokens
            (never differentiated), or None to train on labels alone.
        teacher_layer: the teacher's output layer (or ``(V, H_t)`` weight); with teacher_hidden.
        attention_mask: ``(B, T)``, 0 at padding: padding rows never count (needed with left
            padding, where ``labels[:, i + d]`` can be a real token while ``i`` is padding).
        depths: the depth of each entry (default ``1..len(depth_hidden)``; include 0 for the
            model's own next-token states).
        depth_weights: ``w_d >= 0`` per entry (default 1.0 each); DeepSeek-V3's ``λ/D`` is
            ``[λ / D] * D``. A depth of weight 0 is computed without gradient, for logging.
        temperature, alpha, divergence, beta, lam, soft_scale: as in
            :func:`darkknowledge.fused_linear_kd_loss` (``temperature`` a float or a 0-dim
            tensor). Required with a teacher; without one ``alpha`` must be None or 0 and the
            loss is the cross-entropy of every depth. ``alpha = 0`` with a teacher skips it.
        normalizer: None: each depth is a mean over its own valid rows. A number (or 0-dim
            tensor): every depth is divided by it (the Distiller's global count of next-token
            targets, under gradient accumulation or DDP). A sequence of one number per depth:
            per-depth global counts (:func:`count_valid_per_depth` summed over the step).
        chunk_size, ignore_index, vocab_size: as in :func:`darkknowledge.fused_linear_kd_loss`.

    Returns:
        :class:`MTPLoss`; only ``total`` carries a gradient (to the states, the student's output
        layer and through them to the heads and the trunk).

    >>> import torch
    >>> h = [torch.randn(2, 6, 8, requires_grad=True) for _ in range(2)]     # depths 1, 2
    >>> weight, labels = torch.randn(30, 8), torch.randint(30, (2, 6))
    >>> labels[:, -1] = -100                                                # shifted labels
    >>> loss = mtp_kd_loss(h, weight, labels, depth_weights=[1.0, 0.5])      # labels only
    >>> sorted(loss.per_depth), bool(loss.total > 0)
    ([1, 2], True)
    >>> loss.total.backward()
    """
    depth_hidden = _checks.check_states(depth_hidden)
    batch, length = depth_hidden[0].shape[:2]
    depths = _checks.check_depths(depths, len(depth_hidden))
    weights = _checks.check_weights(depth_weights, len(depth_hidden))
    _checks.check_token_tensor(labels, "labels", (batch, length))
    if labels.dtype == torch.bool:
        raise TypeError("labels must be integer token ids, got a bool tensor")
    if attention_mask is not None:
        _checks.check_token_tensor(attention_mask, "attention_mask", (batch, length))
    student_layer = _checks.as_layer(student_layer, "student_layer")
    distil = _checks.distils(teacher_hidden, teacher_layer, temperature, alpha, (batch, length))
    if distil:
        teacher_layer = _checks.as_layer(teacher_layer, "teacher_layer")
    normalizers = _checks.normalizers(normalizer, len(depth_hidden))
    total: torch.Tensor | None = None
    soft_sum = hard_sum = depth_hidden[0].new_zeros((), dtype=torch.float32)
    per_depth: dict[int, KDLoss] = {}
    for hidden, depth, weight, depth_normalizer in zip(depth_hidden, depths, weights, normalizers):
        rows = length - depth
        targets = depth_labels(labels, depth, attention_mask, ignore_index)  # (B, rows)
        if rows <= 0:  # the sequence is too short for this depth: nothing to predict
            zero = hidden.new_zeros((), dtype=torch.float32)
            per_depth[depth] = KDLoss(zero, zero, zero)
            continue
        student_rows = hidden[:, :rows]  # (B, rows, H): row i predicts token i + depth + 1
        common = {
            "student_bias": student_layer.bias, "student_logit_scale": student_layer.logit_scale,
            "student_softcap": student_layer.softcap, "chunk_size": chunk_size,
            "ignore_index": ignore_index, "normalizer": depth_normalizer, "vocab_size": vocab_size,
        }  # fmt: skip
        with contextlib.nullcontext() if weight > 0 else torch.no_grad():
            if distil:
                part = fused_linear_kd_loss(
                    student_rows, student_layer.weight,
                    teacher_hidden[:, depth:],  # (B, rows, H_t): the teacher at i + depth
                    teacher_layer.weight, targets,
                    temperature=temperature, alpha=alpha, divergence=divergence,
                    teacher_bias=teacher_layer.bias, teacher_logit_scale=teacher_layer.logit_scale,
                    teacher_softcap=teacher_layer.softcap, beta=beta, lam=lam,
                    soft_scale=soft_scale, **common,
                )  # fmt: skip
            else:
                part = fused_linear_cross_entropy(
                    student_rows, student_layer.weight, targets, **common
                )
        per_depth[depth] = KDLoss(part.total.detach(), part.soft, part.hard)
        if weight > 0:
            total = weight * part.total if total is None else total + weight * part.total
            soft_sum = soft_sum + weight * part.soft.float()
            hard_sum = hard_sum + weight * part.hard.float()
    if total is None:  # no depth with a weight and a row: a zero that still has a graph
        total = sum((h.sum() * 0.0 for h in depth_hidden), start=depth_hidden[0].new_zeros(()))
    return MTPLoss(total, soft_sum.detach(), hard_sum.detach(), per_depth)


def mtp_batch_loss(
    student: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    teacher_hidden: torch.Tensor | None = None,
    teacher_layer: OutputLayer | None = None,
    main_weight: float = 1.0,
    depth_weights: Sequence[float] | None = None,
    **options: Any,
) -> MTPLoss:
    """The whole objective of an :class:`~darkknowledge.mtp.MTPStudent` on one batch: the
    model's own next-token loss (depth 0, weight ``main_weight``) plus every depth's.

    ``student`` is the MTPStudent or its DDP/Accelerate wrapper: it is called as a whole, so
    gradient synchronisation and autocast happen. ``labels`` are the shifted labels,
    ``teacher_hidden``/``teacher_layer`` the teacher's last hidden states and output layer
    (``CausalLMTask.teacher_outputs``), None for labels only; ``options`` go to
    :func:`mtp_kd_loss` (``temperature``, ``alpha``, ``divergence``, ``normalizer``, ...).
    ``per_depth`` then holds depth 0 (the next token) and depths ``1..D``.
    """
    from .student import as_mtp_student

    inner = as_mtp_student(student)
    output = student(input_ids=input_ids, attention_mask=attention_mask)
    if depth_weights is None:
        depth_weights = [1.0] * inner.num_depths
    if len(depth_weights) != inner.num_depths:
        raise ValueError(
            f"depth_weights must have one weight per depth ({inner.num_depths}), got "
            f"{len(depth_weights)}: {list(depth_weights)}"
        )
    device = output.hidden.device
    return mtp_kd_loss(
        [output.hidden, *output.depth_hidden],
        inner.output_layer(),
        labels.to(device),
        teacher_hidden=None if teacher_hidden is None else teacher_hidden.to(device),
        teacher_layer=None if teacher_layer is None else _checks.layer_to(teacher_layer, device),
        attention_mask=None if attention_mask is None else attention_mask.to(device),
        depths=range(inner.num_depths + 1),
        depth_weights=[main_weight, *depth_weights],
        **options,
    )
