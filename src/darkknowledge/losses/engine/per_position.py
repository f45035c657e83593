"""``kd_loss``'s default objective on full logits, per position, through the chunk engine.

``kd_loss`` returns per-position values that callers weight as they like (a mean, a sum, the
hard term alone for a gradient meter), so its gradient cannot be computed ahead of the backward
pass as the fused losses do. The forward pass runs :class:`~.forward_kl.ForwardKL` over row
chunks for the values and keeps only three log-sum-exps per position; the backward pass runs
:class:`~.forward_kl.ForwardKLGradient` over the same chunks with the incoming per-position
gradients. Nothing of size ``(..., C)`` is kept beyond the logits themselves, where autograd on
the textbook formula keeps three (two log-softmaxes and ``exp(log p)``).
"""

from __future__ import annotations

import torch

from ..transforms import compute_dtype
from .chunker import run_chunks
from .forward_kl import Buffers, ForwardKL, ForwardKLGradient
from .sides import LogitsStudent, LogitsTeacher

# Rows per chunk: 2^25 elements (128 MB in float32) whatever the batch. Not smaller: on CPU every
# op ends in a barrier of the intra-op threads, and on a busy machine many small ops cost far
# more than they save (2^21 was 3x slower than 2^25 at 4096 x 32000 on 2 shared cores).
CHUNK_ELEMENTS = 1 << 25


def rows_per_chunk(num_classes: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(num_classes, 1))


class ForwardKLAndCE(torch.autograd.Function):
    """``(student_logits, teacher_logits, labels, temperature) -> (kl, ce)``, both ``(...)``.

    ``teacher_logits`` ``(..., C)`` or None (then ``kl`` is zeros and only the cross-entropy is
    computed); ``temperature`` a float or a tensor broadcastable to ``(..., 1)`` without
    gradient; ``labels`` ``(...)`` in-range class indices (ignored positions replaced by any
    valid index and masked by the caller), or None (then ``ce`` is zeros). No gradient flows
    to the teacher. Math in float32 (float64 for float64 input); the gradient comes back in the
    logits' dtype.
    """

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, labels, temperature):
        leading, num_classes = student_logits.shape[:-1], student_logits.shape[-1]
        dtype = compute_dtype(student_logits.dtype)
        student = student_logits.reshape(-1, num_classes)  # (N, C)
        teacher = None if teacher_logits is None else teacher_logits.reshape(-1, num_classes)
        labels = None if labels is None else labels.reshape(-1)  # (N,)
        if isinstance(temperature, torch.Tensor):
            temperature = temperature.to(dtype).expand(*leading, 1).reshape(-1, 1)  # (N, 1)
        chunk_size = rows_per_chunk(num_classes)
        objective = ForwardKL(
            temperature=temperature,
            buffers=_buffers(student, chunk_size, dtype),
            soft=teacher is not None,
            per_row=True,
        )
        out = run_chunks(
            objective,
            LogitsStudent(student),
            None if teacher is None else LogitsTeacher(teacher),
            labels=labels,
            chunk_size=chunk_size,
        )
        if out.per_row is None:  # no rows at all
            kl = ce = student.new_zeros(0, dtype=dtype)
            normalisers = (student.new_zeros(0, 1, dtype=dtype),) * 3
        else:
            kl, ce, *normalisers = out.per_row
        ctx.temperature = None if isinstance(temperature, torch.Tensor) else temperature
        ctx.leading = leading
        ctx.save_for_backward(
            student,
            teacher,
            labels,
            *normalisers,
            temperature if isinstance(temperature, torch.Tensor) else None,
        )
        return kl.reshape(leading), ce.reshape(leading)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_kl, grad_ce):
        student, teacher, labels, lse_t, lse_q, lse_s, temperature = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        if temperature is None:
            temperature = ctx.temperature
        dtype = compute_dtype(student.dtype)
        chunk_size = rows_per_chunk(student.shape[-1])
        objective = ForwardKLGradient(
            temperature=temperature,
            buffers=_buffers(student, chunk_size, dtype),
            normalisers=(lse_t, lse_q, lse_s),
            grad_kl=grad_kl.reshape(-1, 1).to(dtype),
            grad_ce=grad_ce.reshape(-1, 1).to(dtype),
            soft=teacher is not None,
        )
        side = LogitsStudent(student, need_grad=True)
        run_chunks(
            objective,
            side,
            None if teacher is None else LogitsTeacher(teacher),
            labels=labels,
            chunk_size=chunk_size,
        )
        return side.grad.reshape(*ctx.leading, student.shape[-1]), None, None, None


def _buffers(student: torch.Tensor, chunk_size: int, dtype: torch.dtype) -> Buffers:
    rows = min(chunk_size, max(student.shape[0], 1))
    return Buffers(rows, student.shape[-1], dtype, student.device)
