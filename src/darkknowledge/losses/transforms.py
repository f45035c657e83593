"""Logit transforms that sit between raw logits and the softened distributions.

- ``soften``: upcast to float32, neutralise -inf, optionally z-score, divide by T, log_softmax.
- ``decoupled_kd``: the target-class / non-target split of DKD (Zhao et al., CVPR 2022).
"""

from __future__ import annotations

import torch

from .divergences import NEG_LARGE, kl


def standardize_logits(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Z-score each logit vector over its finite entries (Sun et al., CVPR 2024).

    ``(..., C) -> (..., C)``: ``(z - mean(z)) / (std(z) + eps)``, with the population standard
    deviation (1/C, as in the paper's formula; its code uses 1/(C-1), a factor sqrt(C/(C-1)) in
    T). -inf entries stay -inf and do not count in the mean or std. Teacher and
    student logits then differ only in shape, not scale, so the student is not asked to match
    the teacher's logit range, only its relative structure.
    """
    finite = torch.isfinite(logits)
    count = finite.sum(-1, keepdim=True).clamp_min(1)
    zeroed = torch.where(finite, logits, 0.0)
    mean = zeroed.sum(-1, keepdim=True) / count
    centred = torch.where(finite, logits - mean, 0.0)
    variance = centred.square().sum(-1, keepdim=True) / count
    # clamp: a constant row has variance 0, where sqrt's gradient is inf and 0 · inf = NaN.
    std = variance.clamp_min(torch.finfo(variance.dtype).tiny).sqrt()
    return torch.where(finite, centred / (std + eps), logits)


def upcast(logits: torch.Tensor) -> torch.Tensor:
    """Float32, or float64 when the input already is (so float64 references and gradcheck
    see float64 math)."""
    return logits if logits.dtype == torch.float64 else logits.float()


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the loss math runs in: float32, or float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


class _NeutraliseNegInf(torch.autograd.Function):
    """``clamp_min_(NEG_LARGE)`` in place on a buffer the caller owns, gradient passed through.

    An in-place ``clamp_min_`` makes autograd keep a full copy of its input; a clamped entry has
    probability exactly 0, so the gradient that reaches it is 0 anyway and passing it through
    changes nothing but the memory.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor) -> torch.Tensor:
        ctx.mark_dirty(logits)
        return logits.clamp_min_(NEG_LARGE)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


def soften(
    logits: torch.Tensor, temperature: float | torch.Tensor, *, standardize: bool = False
) -> torch.Tensor:
    """log softmax(z / T) in float32 (float64 for float64 input). ``(..., C) -> (..., C)``.

    ``temperature`` is a float or a tensor broadcastable to the leading shape ``(...)``
    (a per-sample temperature). Logits below -1e20, -inf included, become exactly zero
    probability with finite log-probability, so no NaN appears downstream.

    >>> soften(torch.tensor([0.0, float("-inf")]), 2.0)
    tensor([ 0.0000e+00, -5.0000e+19])
    """
    dtype = compute_dtype(logits.dtype)
    # A fresh buffer of our own (converted once), so that the clamp can work in place.
    z = standardize_logits(logits.to(dtype)) if standardize else logits.to(dtype, copy=True)
    # The clamp comes before the division so that z / T stays finite (and d/dT is 0, not
    # 0 · inf = NaN, for a learned temperature). clamp_min keeps NaN: bad input stays visible.
    z = _NeutraliseNegInf.apply(z)
    if isinstance(temperature, torch.Tensor):
        z = z / temperature.to(dtype).unsqueeze(-1)
    elif temperature != 1.0:
        z = z / temperature
    return torch.log_softmax(z, dim=-1)


def decoupled_kd(
    student_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    target: torch.Tensor,
    tckd_weight: float,
    nckd_weight: float,
) -> torch.Tensor:
    """DKD per position: ``tckd_weight · TCKD + nckd_weight · NCKD``. ``(..., C) -> (...)``.

    TCKD is the KL between the binary distributions (p_target, 1 − p_target) of teacher and
    student; NCKD is the KL between the distributions over non-target classes, renormalised.
    Plain KD equals TCKD + (1 − p_target)·NCKD, which couples NCKD to the teacher's confidence;
    DKD weights the two freely (the paper uses 1 and 8).

    ``target`` is ``(...)`` of class indices; positions with an invalid target must be
    given any in-range index and be masked by the caller.
    """
    index = target.unsqueeze(-1)
    is_target = torch.zeros_like(student_logprobs, dtype=torch.bool).scatter_(-1, index, True)

    def binary_and_rest(logprobs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_target = logprobs.gather(-1, index)  # (..., 1)
        rest = logprobs.masked_fill(is_target, NEG_LARGE)
        log_not_target = torch.logsumexp(rest, dim=-1, keepdim=True)  # log(1 - p_target)
        binary = torch.cat([log_target, log_not_target], dim=-1)  # (..., 2)
        return binary, rest - log_not_target  # renormalised over the non-target classes

    student_binary, student_rest = binary_and_rest(student_logprobs)
    teacher_binary, teacher_rest = binary_and_rest(teacher_logprobs)
    tckd = kl(teacher_binary, student_binary)
    # The target entry of *_rest stays ~NEG_LARGE, so it carries no mass in NCKD.
    nckd = kl(teacher_rest, student_rest)
    return tckd_weight * tckd + nckd_weight * nckd
