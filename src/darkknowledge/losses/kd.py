"""The distillation objective of Hinton et al. (2015):

    L_total = (1 - alpha) · L_hard + alpha · scale · L_soft,    scale = T^2 by default

``L_soft = D(p, q)`` with ``p = softmax(z_t / T)``, ``q = softmax(z_s / T)``; ``L_hard`` is the
cross-entropy of the *unscaled* student logits against the labels. Both are summed over the
class dimension and averaged over valid positions, never over classes.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import _checks
from .divergences import per_position_divergence
from .engine.call import SoftScale, resolve_soft_scale
from .engine.per_position import ForwardKLAndCE
from .reduction import Normalizer, reduce_positions, valid_positions
from .transforms import compute_dtype, decoupled_kd, soften


class KDLoss(NamedTuple):
    """The named parts of the objective.

    ``total`` is what you backpropagate. ``soft`` is the reduced divergence D(p, q) *before*
    the ``soft_scale`` factor; ``hard`` the reduced cross-entropy (0 when no labels are given).
    With a scalar temperature, ``total = (1 - alpha)·hard + alpha·scale·soft`` exactly.
    """

    total: torch.Tensor
    soft: torch.Tensor
    hard: torch.Tensor


def divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    kind: str = "forward_kl",
    temperature: float | torch.Tensor = 1.0,
    beta: float = 0.5,
    lam: float = 0.1,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    normalizer: Normalizer = None,
    standardize: bool = False,
) -> torch.Tensor:
    """D(p, q) between softened teacher and student distributions, without any T^2 factor.

    Args:
        student_logits, teacher_logits: ``(..., C)``, any float dtype; math in float32.
        kind: one of ``forward_kl, reverse_kl, jsd, skew_kl, skew_reverse_kl, tvd``.
        temperature: T > 0, a float or a tensor: 0-dim, per position ``(...)``, or per sample
            (``(B, 1, ...)``, sizes of 1 broadcast); a trailing 1 (``(B, 1)`` on ``(B, C)``)
            is accepted. Fewer dimensions than ``(...)`` are refused as ambiguous.
        beta: the JSD mixture weight (0 = forward KL, 1 = reverse KL).
        lam: the skew of ``skew_kl`` / ``skew_reverse_kl``, in [0, 1).
        mask: ``(...)`` bool, True = keep.
        reduction, normalizer: see :func:`darkknowledge.losses.reduction.reduce_positions`.
        standardize: z-score both logit vectors before the temperature.

    Returns ``()`` or, with ``reduction="none"``, ``(...)``.

    >>> student, teacher = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([[0.0, 2.0, -1.0]])
    >>> round(float(divergence(student, teacher, kind="forward_kl", temperature=2.0)), 4)
    0.3973
    >>> round(float(divergence(student, student, kind="jsd")), 6)  # identical: 0 up to rounding
    0.0
    """
    _checks.check_logits_pair(student_logits, teacher_logits)
    _checks.check_divergence_name(kind, "kind")
    temperature = _checks.temperature_for(temperature, student_logits.shape[:-1])
    _checks.check_unit_interval(beta, "beta")
    _checks.check_unit_interval(lam, "lam", closed_right=False)
    _checks.check_reduction(reduction)
    if mask is not None:
        _checks.check_mask(mask, student_logits.shape[:-1])
    log_q = soften(student_logits, temperature, standardize=standardize)
    log_p = soften(teacher_logits.detach(), temperature, standardize=standardize)
    per_position = per_position_divergence(log_q, log_p, kind, beta=beta, lam=lam)
    return reduce_positions(per_position, mask, reduction, normalizer)


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    temperature: float | torch.Tensor,
    alpha: float,
    divergence: str = "forward_kl",
    soft_scale: SoftScale = "T2",
    ignore_index: int = -100,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    normalizer: Normalizer = None,
    beta: float = 0.5,
    lam: float = 0.1,
    standardize: bool = False,
    dkd_weights: tuple[float, float] | None = None,
) -> KDLoss:
    """``(1 - alpha)·CE(z_s, y) + alpha·scale·D(softmax(z_t/T), softmax(z_s/T))``.

    Args:
        student_logits: ``(..., C)`` student logits, any float dtype (math in float32).
        teacher_logits: ``(..., C)`` teacher logits; no gradient flows into them.
        labels: ``(...)`` integer targets, or None for pure distillation (then alpha must be 1).
        temperature: T > 0; a float, or a tensor as in :func:`divergence` (per-sample T,
            from :class:`darkknowledge.LearnableTemperature`).
        alpha: weight of the soft term in [0, 1]. Note: torchdistill uses the opposite meaning.
        divergence: ``forward_kl`` (Hinton KD), ``reverse_kl``, ``jsd``, ``skew_kl``,
            ``skew_reverse_kl``, ``tvd``.
        soft_scale: ``"T2"`` (default; keeps the soft gradient's size independent of T),
            ``"none"``, or a float. Applied per position, so a per-sample T scales its own row.
        ignore_index: label value of positions that do not count (for both terms).
        mask: ``(...)`` bool, True = keep; combined with ``labels != ignore_index``.
        reduction: ``"mean"`` over valid positions, ``"sum"``, or ``"none"`` (per position).
        normalizer: with ``"mean"``, the global count of valid positions to divide by (see
            :func:`darkknowledge.count_valid`), for gradient accumulation and several processes.
        beta, lam: parameters of ``jsd`` and the skew divergences.
        standardize: logit standardisation (Sun et al., CVPR 2024) before the temperature.
        dkd_weights: ``(tckd_weight, nckd_weight)`` to replace the soft term by decoupled KD
            (Zhao et al., CVPR 2022); needs labels and ``divergence="forward_kl"``.

    Returns:
        ``KDLoss(total, soft, hard)``, each ``()`` (or ``(...)`` with ``reduction="none"``).

    >>> import torch, darkknowledge as dk
    >>> student, teacher = torch.randn(4, 10, requires_grad=True), torch.randn(4, 10)
    >>> labels = torch.tensor([1, 2, 3, 4])
    >>> loss = dk.kd_loss(student, teacher, labels, temperature=4.0, alpha=0.9)
    >>> loss.total.backward()
    >>> bool(torch.isclose(loss.total, 0.1 * loss.hard + 0.9 * 16 * loss.soft))
    True
    """
    _checks.check_logits_pair(student_logits, teacher_logits)
    _checks.check_divergence_name(divergence)
    temperature = _checks.temperature_for(temperature, student_logits.shape[:-1])
    if isinstance(temperature, torch.Tensor):  # T and T^2 in the loss's precision, not bf16's
        temperature = temperature.to(compute_dtype(student_logits.dtype))
    _checks.check_unit_interval(alpha, "alpha")
    _checks.check_unit_interval(beta, "beta")
    _checks.check_unit_interval(lam, "lam", closed_right=False)
    _checks.check_reduction(reduction)
    leading_shape, num_classes = student_logits.shape[:-1], student_logits.shape[-1]
    if mask is not None:
        _checks.check_mask(mask, leading_shape)
    if labels is not None:
        _checks.check_labels(labels, leading_shape, num_classes, ignore_index)
    _checks.check_labels_for_alpha(labels, alpha)
    if labels is None and dkd_weights is not None:
        raise ValueError(
            "labels=None with dkd_weights: decoupled KD splits on the target class, which needs "
            "labels; pass labels, or dkd_weights=None"
        )
    if dkd_weights is not None:
        if divergence != "forward_kl":
            raise ValueError(
                f'dkd_weights decouples the forward KL; got divergence={divergence!r}, use "forward_kl"'
            )
        _check_dkd_weights(dkd_weights)
    scale = resolve_soft_scale(soft_scale, temperature)
    valid = valid_positions(labels, mask, ignore_index)
    # Ignored positions get class 0 (any valid index would do); reduce_positions masks them out.
    safe_labels = None if labels is None else labels.masked_fill(labels == ignore_index, 0)

    if _fast_path(divergence, standardize, dkd_weights, temperature):
        # The default objective in closed form on the chunk engine: no (..., C) tensor is kept
        # for backward.
        fast_temperature = temperature
        if isinstance(temperature, torch.Tensor):
            fast_temperature = temperature.to(compute_dtype(student_logits.dtype)).unsqueeze(-1)
        soft_pos, hard_pos = ForwardKLAndCE.apply(
            student_logits, teacher_logits.detach(), safe_labels, fast_temperature
        )
    else:
        log_q = soften(student_logits, temperature, standardize=standardize)
        log_p = soften(teacher_logits.detach(), temperature, standardize=standardize)
        if dkd_weights is not None:
            soft_pos = decoupled_kd(log_q, log_p, safe_labels, *dkd_weights)
        else:
            soft_pos = per_position_divergence(log_q, log_p, divergence, beta=beta, lam=lam)
        if labels is None:
            hard_pos = torch.zeros_like(soft_pos)
        else:
            # The hard term always sees the unscaled logits (T = 1, no standardisation).
            plain_unit = not standardize and _is_unit(temperature)
            log_probs = log_q if plain_unit else soften(student_logits, 1.0)
            hard_pos = -log_probs.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)

    soft = reduce_positions(soft_pos, valid, reduction, normalizer)
    hard = reduce_positions(hard_pos, valid, reduction, normalizer)
    if isinstance(scale, torch.Tensor) and scale.dim():
        # A per-position temperature scales each position by its own T^2, before the reduction.
        scaled_soft = reduce_positions(
            soft_pos * scale.expand_as(soft_pos), valid, reduction, normalizer
        )
    else:
        scaled_soft = scale * soft
    total = (1.0 - alpha) * hard + alpha * scaled_soft
    return KDLoss(total, soft, hard)


def _is_unit(temperature: float | torch.Tensor) -> bool:
    return not isinstance(temperature, torch.Tensor) and temperature == 1.0


def _fast_path(divergence: str, standardize: bool, dkd_weights, temperature) -> bool:
    """Whether :class:`ForwardKLAndCE` computes this objective (it has no gradient for T)."""
    learned_t = isinstance(temperature, torch.Tensor) and temperature.requires_grad
    return divergence == "forward_kl" and not standardize and dkd_weights is None and not learned_t


def _check_dkd_weights(dkd_weights) -> None:
    if (
        not isinstance(dkd_weights, tuple | list)
        or len(dkd_weights) != 2
        or not all(isinstance(w, int | float) and not isinstance(w, bool) for w in dkd_weights)
    ):
        raise TypeError(
            f"dkd_weights must be a pair of floats (tckd_weight, nckd_weight), e.g. (1.0, 8.0), "
            f"got {dkd_weights!r}"
        )


def hard_only_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    normalizer: Normalizer = None,
) -> KDLoss:
    """Cross-entropy of ``student_logits`` against ``labels``: the labels-only objective.

    ``L_hard = lse(z) − z_y`` per position, reduced like :func:`kd_loss` (which it equals with
    ``alpha=0``, bit for bit), without a teacher or a soft term. For the baselines that train on
    labels alone, so that they read the same ``KDLoss`` as distillation runs.

    Args:
        student_logits: ``(..., C)`` any float dtype (math in float32; float64 stays float64).
        labels: ``(...)`` integer targets, ``ignore_index`` where a position does not count.
        ignore_index, mask, reduction, normalizer: as in :func:`kd_loss`.

    Returns:
        ``KDLoss(total=hard, soft=0, hard)``; ``total`` and ``hard`` carry the gradient.

    >>> logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]], requires_grad=True)
    >>> loss = hard_only_loss(logits, torch.tensor([0, 2]))
    >>> round(float(loss.total.detach()), 4), float(loss.soft)  # (0.1698 + 1.0986) / 2
    (0.6342, 0.0)
    >>> loss.total.backward()
    """
    if labels is None:
        raise ValueError("hard_only_loss needs labels: it is the cross-entropy against them")
    _checks.check_logits(student_logits, "student_logits")
    _checks.check_reduction(reduction)
    leading_shape = student_logits.shape[:-1]
    _checks.check_labels(labels, leading_shape, student_logits.shape[-1], ignore_index)
    if mask is not None:
        _checks.check_mask(mask, leading_shape)
    valid = valid_positions(labels, mask, ignore_index)
    safe_labels = labels.masked_fill(labels == ignore_index, 0)
    _, hard_pos = ForwardKLAndCE.apply(student_logits, None, safe_labels, 1.0)
    hard = reduce_positions(hard_pos, valid, reduction, normalizer)
    return KDLoss(hard, torch.zeros_like(hard), hard)
