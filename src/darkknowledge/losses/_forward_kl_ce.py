"""Forward KL at temperature T and cross-entropy at T = 1, per position, in one autograd.Function.

This is the default objective (``divergence="forward_kl"``, no standardisation, no DKD, a
temperature without gradient), and the one that runs at vocabulary scale, so it is worth doing
with as few full ``(..., C)`` passes and buffers as possible. Written from the logits ``s, t``
and ``s' = s / T``, ``t' = t / T``; -inf logits (masked classes) get probability 0:

    KL(p ‖ q) = Σ_c p_c (t'_c − s'_c) + lse(s') − lse(t')          (because Σ_c p_c = 1)
    CE(s, y)  = lse(s) − s_y
    ∂KL/∂s    = (q − p) / T,        ∂CE/∂s = softmax(s) − onehot(y)

Autograd on the plain formula keeps three full-size tensors for backward (two log-softmaxes and
exp(log p)); this keeps only the per-row log-sum-exps and recomputes p, q and softmax(s) from
the logits, which the caller holds anyway. The math runs in float32 (float64 for float64 input).
"""

from __future__ import annotations

import torch

from .divergences import NEG_LARGE
from .transforms import compute_dtype


def _scaled(
    logits: torch.Tensor, temperature: float | torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """A fresh ``(..., C)`` buffer with ``logits / T`` in ``dtype`` (-inf stays -inf)."""
    if not isinstance(temperature, torch.Tensor) and temperature == 1.0:
        return logits.to(dtype, copy=True)
    if logits.dtype == dtype:
        return logits / temperature  # one pass, and the copy we need anyway
    return logits.to(dtype).div_(temperature)


def _rows_per_chunk(logits: torch.Tensor) -> int:
    """Rows per block: the work runs block by block so that its temporaries stay bounded
    (2^25 elements, 128 MB in float32) whatever the batch size. Not smaller: on CPU every op
    ends in a barrier of the intra-op threads, and on a busy machine many small ops cost far
    more than they save (2^21 was 3x slower than 2^25 at 4096 x 32000 on 2 shared cores)."""
    return max(1, _CHUNK_ELEMENTS // max(logits.shape[-1], 1))


_CHUNK_ELEMENTS = 1 << 25


def _exp_in_place(scaled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn the ``(n, C)`` buffer ``x`` into ``exp(x − max x)`` in place; return
    ``(logsumexp(x), Σ exp(x − max x))``, both ``(n, 1)``.

    -inf entries become 0. A row of only -inf (or values below ``NEG_LARGE``) gets
    logsumexp ``NEG_LARGE`` and sum 1 instead of -inf and 0, so that nothing downstream is NaN.
    """
    top = scaled.amax(dim=-1, keepdim=True).clamp_min_(NEG_LARGE)
    # >= 1 whenever the row's max is above NEG_LARGE: its own entry is exp(0) = 1.
    total = scaled.sub_(top).exp_().sum(dim=-1, keepdim=True).clamp_min_(1.0)
    return top + total.log(), total


def _forward_block(student, teacher, labels, temperature, dtype):
    """KL, CE and the three log-sum-exps of a block of rows ``(n, C)``."""
    unit_temperature = not isinstance(temperature, torch.Tensor) and temperature == 1.0
    scaled_teacher = _scaled(teacher, temperature, dtype)  # t'
    scaled_student = _scaled(student, temperature, dtype)  # s'
    difference = scaled_student - scaled_teacher
    # -inf − -inf = NaN and x − -inf = inf sit where the teacher's p is 0: make them 0 so that
    # 0 · them is 0. Where only the student has -inf, -inf becomes NEG_LARGE: a huge but finite
    # KL (as in soften), and 0 rather than NaN if the teacher's p underflowed to 0 there.
    difference.nan_to_num_(nan=0.0, posinf=0.0, neginf=NEG_LARGE)
    lse_teacher, teacher_sum = _exp_in_place(scaled_teacher)  # now exp(t' − max t')
    lse_student, _ = _exp_in_place(scaled_student)
    # Σ p (s' − t') with p = exp(t' − max) / Σ exp(t' − max): one exp pass per side in all.
    weighted = difference.mul_(scaled_teacher).sum(-1, keepdim=True) / teacher_sum
    kl = (lse_student - lse_teacher - weighted).squeeze(-1)
    if labels is None:
        return kl, torch.zeros_like(kl), lse_student, lse_teacher, None
    if unit_temperature:
        lse_unit = lse_student
    else:
        # logsumexp handles -inf entries; a row of only -inf gives -inf, clamped as in soften.
        lse_unit = torch.logsumexp(student.to(dtype), dim=-1, keepdim=True).clamp_min(NEG_LARGE)
    picked = student.gather(-1, labels.unsqueeze(-1)).to(dtype).clamp_min(NEG_LARGE)
    return kl, (lse_unit - picked).squeeze(-1), lse_student, lse_teacher, lse_unit


def _backward_block(
    student,
    teacher,
    labels,
    temperature,
    lse_student,
    lse_teacher,
    lse_unit,
    grad_kl,
    grad_ce,
    dtype,
):
    """∂L/∂s of a block of rows: (q − p)/T · ∂L/∂kl + (softmax(s) − onehot(y)) · ∂L/∂ce."""
    grad = _scaled(student, temperature, dtype).sub_(lse_student).exp_()  # q
    buffer = _scaled(teacher, temperature, dtype).sub_(lse_teacher).exp_()  # p
    grad.sub_(buffer).mul_(grad_kl.unsqueeze(-1).to(dtype) / temperature)
    if labels is not None:
        index = labels.unsqueeze(-1)
        torch.sub(student, lse_unit, out=buffer).exp_()  # softmax(s), 0 at -inf
        buffer.scatter_add_(
            -1, index, torch.full(index.shape, -1.0, dtype=dtype, device=buffer.device)
        )
        grad.add_(buffer.mul_(grad_ce.unsqueeze(-1).to(dtype)))
    return grad


class ForwardKLAndCE(torch.autograd.Function):
    """``(student_logits, teacher_logits, labels, temperature) -> (kl, ce)``, both ``(...)``.

    ``temperature`` is a float or a tensor broadcastable to ``(..., 1)`` without gradient;
    ``labels`` ``(...)`` holds in-range class indices (ignored positions replaced by any valid
    index and masked by the caller), or is None (then ``ce`` is zeros). No gradient flows to
    the teacher. Rows are processed in blocks; nothing of size ``(..., C)`` is kept for backward
    beyond the logits themselves.
    """

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, labels, temperature):
        leading, num_classes = student_logits.shape[:-1], student_logits.shape[-1]
        dtype = compute_dtype(student_logits.dtype)
        student = student_logits.reshape(-1, num_classes)  # (N, C)
        teacher = teacher_logits.reshape(-1, num_classes)
        labels = None if labels is None else labels.reshape(-1)  # (N,)
        if isinstance(temperature, torch.Tensor):
            temperature = temperature.expand(*leading, 1).reshape(-1, 1)  # (N, 1)
        rows = _rows_per_chunk(student)
        parts = []
        for start in range(0, student.shape[0], rows):
            block = slice(start, start + rows)
            parts.append(
                _forward_block(
                    student[block],
                    teacher[block],
                    None if labels is None else labels[block],
                    temperature[block] if isinstance(temperature, torch.Tensor) else temperature,
                    dtype,
                )
            )
        if parts:
            kl, ce, lse_student, lse_teacher, lse_unit = (
                None if part[0] is None else torch.cat(part) for part in zip(*parts)
            )
        else:  # no rows at all
            kl = ce = student.new_zeros(0, dtype=dtype)
            lse_student = lse_teacher = lse_unit = student.new_zeros(0, 1, dtype=dtype)
        ctx.temperature = None if isinstance(temperature, torch.Tensor) else temperature
        ctx.leading = leading
        ctx.save_for_backward(
            student,
            teacher,
            labels,
            lse_student,
            lse_teacher,
            lse_unit,
            temperature if isinstance(temperature, torch.Tensor) else None,
        )
        return kl.reshape(leading), ce.reshape(leading)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_kl, grad_ce):
        student, teacher, labels, lse_student, lse_teacher, lse_unit, temperature = (
            ctx.saved_tensors
        )
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        if temperature is None:
            temperature = ctx.temperature
        dtype = compute_dtype(student.dtype)
        grad_kl, grad_ce = grad_kl.reshape(-1), grad_ce.reshape(-1)
        grad = torch.empty_like(student)  # (N, C), in the logits' dtype
        rows = _rows_per_chunk(student)
        for start in range(0, student.shape[0], rows):
            block = slice(start, start + rows)
            grad[block] = _backward_block(
                student[block],
                teacher[block],
                None if labels is None else labels[block],
                temperature[block] if isinstance(temperature, torch.Tensor) else temperature,
                lse_student[block],
                lse_teacher[block],
                None if lse_unit is None else lse_unit[block],
                grad_kl[block],
                grad_ce[block],
                dtype,
            )
        return grad.reshape(*ctx.leading, student.shape[-1]), None, None, None
