"""Divergences between a teacher distribution p and a student distribution q, per position.

All functions here take log-probabilities ``(..., C)`` in float32 (already softened by the
temperature) and return ``(...)``: the divergence summed over the class dimension.
Entries where a distribution is exactly zero contribute nothing (0 · log 0 = 0), which keeps
masked vocabulary entries (logits of -inf) from producing NaN in values or gradients.

| kind              | formula                                                            |
|-------------------|--------------------------------------------------------------------|
| forward_kl        | KL(p ‖ q) = Σ p (log p − log q)                                    |
| reverse_kl        | KL(q ‖ p)                                                          |
| jsd (beta)        | beta·KL(p ‖ m) + (1−beta)·KL(q ‖ m), m = beta·p + (1−beta)·q;      |
|                   | beta = 0 is forward KL and beta = 1 reverse KL (TRL's convention)  |
| skew_kl (lam)     | KL(p ‖ lam·p + (1−lam)·q)                                          |
| skew_reverse_kl   | KL(q ‖ lam·q + (1−lam)·p)                                          |
| tvd               | ½ Σ |p − q|                                                        |
"""

from __future__ import annotations

import math

import torch

# Logits below this are treated as "masked" (-inf). Finite, so that differences of
# log-probabilities never become inf - inf = NaN; exp() of it is exactly 0 in float32.
NEG_LARGE = -1e20


def kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a ‖ b) = Σ_c a_c (log a_c − log b_c), per position. ``(..., C) -> (...)``.

    Both inputs must be finite (see ``NEG_LARGE``); entries with a_c = 0 contribute 0.
    """
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def log_mixture(log_a: torch.Tensor, log_b: torch.Tensor, weight_a: float) -> torch.Tensor:
    """log(weight_a · a + (1 − weight_a) · b), elementwise and stable in log space."""
    if weight_a == 0.0:
        return log_b
    if weight_a == 1.0:
        return log_a
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))


def per_position_divergence(
    student_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    kind: str,
    *,
    beta: float = 0.5,
    lam: float = 0.1,
) -> torch.Tensor:
    """D(p, q) per position, from teacher log p and student log q. ``(..., C) -> (...)``."""
    log_q, log_p = student_logprobs, teacher_logprobs
    if kind == "forward_kl":
        return kl(log_p, log_q)
    if kind == "reverse_kl":
        return kl(log_q, log_p)
    if kind == "jsd":
        # The endpoints follow TRL's generalized_jsd_loss: beta=0 is KL(p‖q), beta=1 is KL(q‖p).
        # In between, JSD(beta) -> beta·KL(p‖q) as beta -> 0, so the endpoints are the limits of
        # JSD/beta and JSD/(1-beta), not of JSD itself.
        if beta == 0.0:
            return kl(log_p, log_q)
        if beta == 1.0:
            return kl(log_q, log_p)
        log_m = log_mixture(log_p, log_q, beta)
        return beta * kl(log_p, log_m) + (1.0 - beta) * kl(log_q, log_m)
    if kind == "skew_kl":
        return kl(log_p, log_mixture(log_p, log_q, lam))
    if kind == "skew_reverse_kl":
        return kl(log_q, log_mixture(log_q, log_p, lam))
    if kind == "tvd":
        return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)
    raise ValueError(f"unknown divergence {kind!r}")
