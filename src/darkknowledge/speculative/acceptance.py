"""How often a draft is accepted and what that buys (Leviathan et al., 2023, section 3).

With target distribution ``p`` and draft distribution ``q`` over the same vocabulary, one draft
token ``x ~ q`` is accepted with probability ``min(1, p(x)/q(x))``; on average

    alpha = Σ_x q(x) · min(1, p(x)/q(x)) = Σ_x min(p(x), q(x)) = 1 − TVD(p, q)

(the last step because Σ p = Σ q = 1). Drafting ``gamma`` tokens per call of the target, with
acceptances independent with rate ``alpha``, one target call yields on average

    E[tokens] = 1 + alpha + ... + alpha^gamma = (1 − alpha^(gamma+1)) / (1 − alpha)

tokens, and with one draft step costing ``c`` target calls the expected walltime improvement
factor over plain decoding of the target is (Theorem 3.8)

    speed-up = (1 − alpha^(gamma+1)) / ((1 − alpha)(gamma·c + 1)).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral, Real

import torch

from ..losses import _checks
from ..losses.reduction import reduce_positions


def acceptance_rate(
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Expected acceptance of one draft token, ``Σ_x min(p(x), q(x)) = 1 − TVD(p, q)``.

    Args:
        target_probs: ``p``, ``(..., V)`` probabilities (each row sums to 1).
        draft_probs: ``q``, the same shape.
        mask: ``(...)`` bool, True = the position counts (padding of held-out text: False).
        reduction: ``"mean"`` (over valid positions, the default), ``"sum"`` or ``"none"``.

    Returns a float32 (float64 for float64 input) tensor: ``()`` or, with ``"none"``, ``(...)``.
    Computed without decoding: on held-out text, pass the target's and the draft's
    distributions at every position (after the same temperature as decoding will use).

    >>> p = torch.tensor([[0.5, 0.3, 0.2], [1.0, 0.0, 0.0]])
    >>> q = torch.tensor([[0.2, 0.3, 0.5], [0.0, 1.0, 0.0]])
    >>> acceptance_rate(p, q, reduction="none")
    tensor([0.7000, 0.0000])
    >>> acceptance_rate(p, q)
    tensor(0.3500)
    """
    _check_probability_pair(target_probs, draft_probs)
    _checks.check_reduction(reduction)
    if mask is not None:
        _checks.check_mask(mask, target_probs.shape[:-1])
    dtype = torch.promote_types(target_probs.dtype, torch.float32)
    overlap = torch.minimum(target_probs.to(dtype), draft_probs.to(dtype)).sum(-1)  # (...)
    return reduce_positions(overlap, mask, reduction)


def expected_tokens_per_call(alpha: float | torch.Tensor, gamma: int) -> float:
    """Expected tokens one target call yields: ``(1 − alpha^(gamma+1)) / (1 − alpha)``.

    Computed as the finite geometric sum ``1 + alpha + ... + alpha^gamma``, which is the same
    number and is exact at ``alpha = 1`` (``gamma + 1``: every draft token is accepted and the
    target adds one more).

    >>> expected_tokens_per_call(0.5, 2)
    1.75
    >>> expected_tokens_per_call(1.0, 4)
    5.0
    """
    alpha = _check_alpha(alpha)
    check_gamma(gamma)
    return math.fsum(alpha**k for k in range(gamma + 1))


def chained_tokens_per_call(rates: Sequence[float] | torch.Tensor) -> float:
    """Tokens per target call when draft position ``k`` is accepted with probability ``a_k``
    once the earlier ones were: ``1 + a_1 + a_1 a_2 + ... + a_1 ⋯ a_n`` (with every
    ``a_k = alpha``, :func:`expected_tokens_per_call`).

    >>> round(chained_tokens_per_call([0.8, 0.5]), 6)           # 1 + 0.8 + 0.8 · 0.5
    2.2
    """
    tokens, reached = 1.0, 1.0
    for rate in rates:
        reached *= float(rate)
        tokens += reached
    return tokens


def expected_speedup(alpha: float | torch.Tensor, gamma: int, cost_ratio: float) -> float:
    """Expected walltime improvement over decoding with the target alone (Leviathan et al.,
    Theorem 3.8):

        (1 − alpha^(gamma+1)) / ((1 − alpha)(gamma·c + 1))

    Args:
        alpha: the acceptance rate in [0, 1] (see :func:`acceptance_rate`).
        gamma: draft tokens per target call, >= 1.
        cost_ratio: ``c``, the time of one draft step over the time of one target call, >= 0.

    At ``alpha = 1`` this is the limit ``(gamma + 1) / (gamma·c + 1)``. The model assumes
    acceptances independent with the same rate and a target call that costs the same for
    ``gamma + 1`` tokens as for one; measured speed-ups fall short of it where those fail.

    >>> round(expected_speedup(0.8, 4, 0.1), 6)   # 0.67232 / (0.2 · 1.4)
    2.401143
    >>> expected_speedup(1.0, 3, 0.5)             # 4 / 2.5
    1.6
    """
    tokens = expected_tokens_per_call(alpha, gamma)
    if isinstance(cost_ratio, bool) or not isinstance(cost_ratio, Real):
        raise TypeError(
            f"cost_ratio must be a float >= 0, got {type(cost_ratio).__name__} {cost_ratio!r}"
        )
    if not (math.isfinite(cost_ratio) and cost_ratio >= 0):
        raise ValueError(f"cost_ratio must be finite and >= 0, got cost_ratio={cost_ratio!r}")
    return tokens / (gamma * float(cost_ratio) + 1.0)


def _check_alpha(alpha: float | torch.Tensor) -> float:
    """A float in [0, 1]; a one-element tensor (what :func:`acceptance_rate` returns) is read."""
    if isinstance(alpha, torch.Tensor):
        if alpha.numel() != 1 or not alpha.is_floating_point():
            raise TypeError(
                f"alpha must be a float or a one-element floating tensor, got a tensor of shape "
                f"{tuple(alpha.shape)} and dtype {alpha.dtype}"
            )
        alpha = float(alpha)
    _checks.check_unit_interval(alpha, "alpha")
    return float(alpha)


def check_gamma(gamma: int, name: str = "gamma") -> None:
    if isinstance(gamma, bool) or not isinstance(gamma, Integral):
        raise TypeError(f"{name} must be an int >= 1, got {type(gamma).__name__} {gamma!r}")
    if gamma < 1:
        raise ValueError(f"{name} must be >= 1 (draft tokens per target call), got {gamma}")


def check_probabilities(probs: torch.Tensor, name: str) -> None:
    """``probs`` is a floating tensor ``(..., V)`` of finite values >= 0 whose rows sum to 1.

    The tolerance on the sum is 1e-3 (1e-2 for 16-bit floats, whose softmax rounds more)."""
    if not isinstance(probs, torch.Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor of probabilities, got {type(probs).__name__}"
        )
    if not probs.is_floating_point():
        raise TypeError(
            f"{name} must be a floating-point tensor of probabilities, got dtype {probs.dtype}"
        )
    if probs.dim() < 1 or probs.shape[-1] == 0:
        raise ValueError(f"{name} must have shape (..., V) with V >= 1, got {tuple(probs.shape)}")
    if probs.numel() == 0:
        return
    values = probs.detach()
    valid = (torch.isfinite(values) & (values >= 0)).all()
    off_by = (values.sum(-1, dtype=torch.float64) - 1.0).abs().max()
    valid, off_by = torch.stack([valid.to(torch.float64), off_by]).tolist()  # one host sync
    if not valid:
        raise ValueError(
            f"{name} must hold finite probabilities >= 0 (pass softmax(logits), not logits)"
        )
    tolerance = 1e-2 if torch.finfo(probs.dtype).bits <= 16 else 1e-3
    if off_by > tolerance:
        raise ValueError(
            f"{name} must sum to 1 over the last dimension (V={probs.shape[-1]}), but a row is off by "
            f"{off_by:.3g}; pass softmax(logits / temperature)"
        )


def _check_probability_pair(target_probs: torch.Tensor, draft_probs: torch.Tensor) -> None:
    check_probabilities(target_probs, "target_probs")
    check_probabilities(draft_probs, "draft_probs")
    if target_probs.shape != draft_probs.shape:
        raise ValueError(
            f"target_probs and draft_probs must have the same shape (..., V), got "
            f"{tuple(target_probs.shape)} and {tuple(draft_probs.shape)}"
        )
