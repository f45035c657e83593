"""The KL that holds an RLHF policy near its reference, with gradients that descend it.

Tokens ``x`` are sampled from the policy π; ``log r = log π_ref(x) − log π(x)`` per token.
Schulman's estimators of KL(π ‖ π_ref) (http://joschu.net/blog/kl-approx.html):

    k1 = −log r                  unbiased
    k2 = ½ (log r)²              biased (its mean is ½ E_π[(log r)²]), low variance
    k3 = (r − 1) − log r         unbiased (E_π[r] = 1), ≥ 0, low variance

Used as a loss, the formulas' gradients are not ∇KL(π ‖ π_ref): k1's is zero in expectation
and k3's descends KL(π_ref ‖ π), the other direction (OpenRLHF PR 1309; "A Comedy of
Estimators", 2025). With ``gradient="unbiased"`` (the default) the value is the chosen
estimator's but its gradient is that of the score-function surrogate
``sg(log π − log π_ref) · log π``, whose expectation is ∇KL(π ‖ π_ref) exactly:

    E_π[(log π − log π_ref) ∇log π] = Σ ∇π (log π − log π_ref) + Σ π ∇log π = ∇KL(π ‖ π_ref)

(the last sum is ∇Σ π = 0). ``gradient="estimator"`` differentiates the formula as written.

| estimator | E[value]              | gradient="estimator" | gradient="unbiased" |
|-----------|-----------------------|----------------------|---------------------|
| k1        | KL(π ‖ π_ref)         | 0                    | ∇KL(π ‖ π_ref)      |
| k2        | ½ E_π[(log r)²]       | ∇KL(π ‖ π_ref)       | ∇KL(π ‖ π_ref)      |
| k3        | KL(π ‖ π_ref)         | ∇KL(π_ref ‖ π)       | ∇KL(π ‖ π_ref)      |
| full      | KL(π ‖ π_ref), exact  | ∇KL(π ‖ π_ref), exact (both modes)         |

docs/rl.md derives every entry; tests/rl checks each by Monte Carlo.
"""

from __future__ import annotations

import torch

from .losses import _checks
from .losses.kd import divergence
from .losses.reduction import Normalizer, reduce_positions
from .losses.transforms import compute_dtype

ESTIMATORS = ("k1", "k2", "k3", "full")
GRADIENTS = ("unbiased", "estimator")

__all__ = ["ESTIMATORS", "GRADIENTS", "kl_penalty"]


def kl_penalty(
    logprobs: torch.Tensor | None,
    ref_logprobs: torch.Tensor | None,
    *,
    estimator: str = "k3",
    gradient: str = "unbiased",
    policy_logits: torch.Tensor | None = None,
    ref_logits: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    normalizer: Normalizer = None,
    importance_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """An estimate of KL(π ‖ π_ref) per sampled token, reduced over the valid tokens.

    Args:
        logprobs: ``(...)`` log π(x) of each sampled token under the policy, with gradient.
            May be None with ``estimator="full"``.
        ref_logprobs: ``(...)`` log π_ref(x) of the same tokens; never receives a gradient.
        estimator: ``"k1"``, ``"k2"``, ``"k3"`` (see the module docstring) or ``"full"``: the
            exact KL(π ‖ π_ref) per position from ``policy_logits`` and ``ref_logits``, through
            :func:`darkknowledge.divergence` (``kind="reverse_kl"``: the policy is the student).
        gradient: ``"unbiased"``: the gradient is an unbiased estimate of ∇KL(π ‖ π_ref)
            whatever the estimator; ``"estimator"``: the gradient of the formula as written.
        policy_logits, ref_logits: ``(..., V)``, only for ``estimator="full"``.
        mask: ``(...)`` bool, True = the token counts.
        reduction, normalizer: ``"mean"`` over valid tokens (or ``/ normalizer``), ``"sum"``,
            ``"none"``; see :func:`darkknowledge.reduce_positions`.
        importance_weights: ``(...)`` π(x) / π_old(x) per token when the tokens were sampled
            from an older policy π_old; detached here. Each token's value (and so its gradient)
            is multiplied by its weight, which makes both expectations those under π.

    Returns ``()``, or ``(...)`` with ``reduction="none"``; float32 (float64 for float64 input).

    >>> import torch
    >>> policy = torch.tensor([0.5, 0.2, 0.3]).log().requires_grad_()
    >>> reference = torch.tensor([0.4, 0.4, 0.2]).log()
    >>> tokens = torch.tensor([0, 0, 1, 2])
    >>> loss = kl_penalty(policy[tokens], reference[tokens], estimator="k1")
    >>> round(loss.item(), 4)  # mean of log(π/π_ref)(x): (2·log(5/4) + log(1/2) + log(3/2)) / 4
    0.0397
    >>> loss.backward()  # the surrogate's: Σ over tokens x of log(π/π_ref)(x) / 4 at log π(x)
    >>> [round(float(g), 4) for g in policy.grad]
    [0.1116, -0.1733, 0.1014]
    """
    _check_choice(estimator, ESTIMATORS, "estimator")
    _check_choice(gradient, GRADIENTS, "gradient")
    _checks.check_reduction(reduction)
    if estimator == "full":
        return _full(
            logprobs, ref_logprobs, policy_logits, ref_logits, importance_weights, mask,
            reduction, normalizer,
        )  # fmt: skip
    if policy_logits is not None or ref_logits is not None:
        raise ValueError(
            f"policy_logits and ref_logits are used only by estimator='full'; got them with "
            f"estimator={estimator!r}: drop them, or use estimator='full'"
        )
    _check_tokens(logprobs, ref_logprobs, importance_weights)
    if mask is not None:
        _checks.check_mask(mask, logprobs.shape)
    per_token = _sampled(logprobs, ref_logprobs, estimator, gradient, importance_weights, mask)
    return reduce_positions(per_token, mask, reduction, normalizer)


def _sampled(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    estimator: str,
    gradient: str,
    importance_weights: torch.Tensor | None,
    mask: torch.Tensor | None,
) -> torch.Tensor:
    """k1, k2 or k3 per token, with the gradient the mode asks for. ``(...) -> (...)``."""
    dtype = compute_dtype(torch.promote_types(logprobs.dtype, ref_logprobs.dtype))
    logprobs, ref_logprobs = logprobs.to(dtype), ref_logprobs.detach().to(dtype)
    if mask is not None:
        # Masked tokens may hold -inf (padding); zeroing them first keeps inf - inf and
        # 0 · inf out of the values and the gradients that reduce_positions discards.
        logprobs = torch.where(mask, logprobs, logprobs.new_zeros(()))
        ref_logprobs = torch.where(mask, ref_logprobs, ref_logprobs.new_zeros(()))
    log_ratio = ref_logprobs - logprobs  # log r, r = π_ref(x) / π(x)
    if estimator == "k1":
        value = -log_ratio
    elif estimator == "k2":
        value = 0.5 * log_ratio.square()
    else:
        value = torch.expm1(log_ratio) - log_ratio  # (r - 1) - log r; expm1 keeps r ≈ 1 exact
    if gradient == "unbiased":
        # Straight-through: the estimator's value, the score-function surrogate's gradient
        # sg(log π - log π_ref) · ∇log π, whose mean over x ~ π is ∇KL(π ‖ π_ref).
        surrogate = (-log_ratio).detach() * logprobs
        value = value.detach() + (surrogate - surrogate.detach())
    if importance_weights is not None:
        value = importance_weights.detach().to(dtype) * value
    return value


def _full(
    logprobs: torch.Tensor | None,
    ref_logprobs: torch.Tensor | None,
    policy_logits: torch.Tensor | None,
    ref_logits: torch.Tensor | None,
    importance_weights: torch.Tensor | None,
    mask: torch.Tensor | None,
    reduction: str,
    normalizer: Normalizer,
) -> torch.Tensor:
    """The exact KL(π ‖ π_ref) per position: ``dk.divergence(policy, ref, kind="reverse_kl")``."""
    if policy_logits is None or ref_logits is None:
        missing = [
            name
            for name, value in (("policy_logits", policy_logits), ("ref_logits", ref_logits))
            if value is None
        ]
        raise ValueError(
            f"estimator='full' computes the exact KL from the full distributions and needs "
            f"policy_logits and ref_logits of shape (..., V); missing: {', '.join(missing)}"
        )
    if importance_weights is not None:
        raise ValueError(
            "importance_weights correct the distribution of the sampled tokens, which "
            "estimator='full' does not use (it sums over the whole vocabulary); drop them"
        )
    _checks.check_logits_pair(policy_logits, ref_logits)
    leading = policy_logits.shape[:-1]
    for name, value in (("logprobs", logprobs), ("ref_logprobs", ref_logprobs)):
        if value is not None and (not isinstance(value, torch.Tensor) or value.shape != leading):
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(
                f"{name} must have the logits' shape without the vocabulary dimension, "
                f"{tuple(leading)}, got {got}"
            )
    # The reference is the "teacher" p and the policy the "student" q: reverse_kl = KL(q ‖ p).
    return divergence(
        policy_logits, ref_logits, kind="reverse_kl", temperature=1.0, mask=mask,
        reduction=reduction, normalizer=normalizer,
    )  # fmt: skip


def _check_choice(value: str, allowed: tuple[str, ...], name: str) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(map(repr, allowed))}")


def _check_tokens(
    logprobs: torch.Tensor | None,
    ref_logprobs: torch.Tensor | None,
    importance_weights: torch.Tensor | None,
) -> None:
    """Floating tensors of one shape; weights finite and >= 0 (checked on CPU only: looking at
    a GPU tensor's values would synchronise every step)."""
    tensors = {"logprobs": logprobs, "ref_logprobs": ref_logprobs}
    if importance_weights is not None:
        tensors["importance_weights"] = importance_weights
    for name, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"{name} must be a floating-point torch.Tensor of per-token values, got "
                f"{type(value).__name__}"
            )
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
        if value.shape != logprobs.shape:
            raise ValueError(
                f"{name} must have the shape of logprobs, {tuple(logprobs.shape)}, got "
                f"{tuple(value.shape)}"
            )
    if importance_weights is not None and importance_weights.device.type == "cpu":
        weights = importance_weights.detach()
        bad = ~(torch.isfinite(weights) & (weights >= 0))
        if bool(bad.any()):
            raise ValueError(
                f"importance_weights must be finite and >= 0 (ratios π/π_old), got a weight "
                f"{weights[bad][0].item()!r}"
            )
