"""Any objective of :func:`darkknowledge.kd_loss` as a chunk objective, by autograd.

The reference for everything the closed forms do not cover: the other five divergences, a
learned or per-position temperature, soft-capping, ``torch.compile``. The chunk's teacher
logits are computed without gradient, the student's pre-activation logits ``z`` are made a
float32 leaf, ``kd_loss`` itself computes the chunk's loss (so every divergence, the T² factor,
the hard term and the masking are the one implementation), and ``torch.autograd.grad`` gives
``∂total/∂z`` for the chunk engine. It lives beside ``kd.py``, outside ``engine/``, because it
calls ``kd_loss``, which itself runs on the engine.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .engine.call import KDCall
from .engine.chunker import Chunk, ChunkResult
from .kd import KDLoss, hard_only_loss, kd_loss
from .transforms import upcast


@dataclass(frozen=True)
class AutogradKD:
    """``kd_loss`` on each chunk's logits, differentiated by autograd.

    Args:
        call: the options of the call.
        temperature: a float, or a ``()`` or ``(N,)`` leaf tensor (per row), which gets its
            gradient when ``need_temperature_grad``.
        compile: run each chunk's loss through ``torch.compile`` (a backend name, or True for
            Inductor).
    """

    call: KDCall
    temperature: float | torch.Tensor
    need_temperature_grad: bool = False
    compile: bool | str = False

    def __call__(self, chunk: Chunk) -> ChunkResult:
        with torch.no_grad():
            teacher = chunk.teacher
            teacher_logits = None if teacher is None else teacher.finish(teacher.pre_logits())
            pre = chunk.student.pre_logits()  # (n, V) in the input dtype
        with torch.enable_grad():
            # The gradient is taken with respect to the pre-activation logits in float32: the
            # chunk engine turns it into the hidden, weight and bias gradients.
            pre = upcast(pre).requires_grad_(chunk.need_logits_grad)
            temperature = self.temperature  # sliced under grad mode: its gradient is a leaf's
            if isinstance(temperature, torch.Tensor) and temperature.dim() > 0:
                temperature = temperature[chunk.rows]
            loss = (_compiled_chunk_loss(self.compile) if self.compile else _chunk_loss)(
                chunk.student.finish, pre, teacher_logits, chunk.labels, chunk.valid,
                temperature, chunk.normalizer, self.call,
            )  # fmt: skip
            wanted = [
                tensor
                for tensor, need in (
                    (pre, chunk.need_logits_grad),
                    (self.temperature, self.need_temperature_grad),
                )
                if need
            ]
            grads = list(torch.autograd.grad(loss.total, wanted)) if wanted else []
        parts = torch.stack([part.detach() for part in loss])
        logits_grad = grads.pop(0) if chunk.need_logits_grad else None
        temperature_grad = grads.pop(0) if self.need_temperature_grad else None
        return ChunkResult(parts, logits_grad, temperature_grad=temperature_grad)


def _chunk_loss(
    finish: Callable[[torch.Tensor], torch.Tensor],
    pre: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor | None,
    valid: torch.Tensor | None,
    temperature: float | torch.Tensor,
    normalizer: float | torch.Tensor,
    call: KDCall,
) -> KDLoss:
    """kd_loss on one chunk of logits (the cross-entropy alone without a teacher): the step
    that ``compile=True`` hands to torch.compile."""
    if teacher_logits is None:
        return hard_only_loss(
            finish(pre), labels, ignore_index=call.ignore_index, mask=valid, normalizer=normalizer
        )
    return kd_loss(
        finish(pre),
        teacher_logits,
        labels,
        temperature=temperature,
        alpha=call.alpha,
        divergence=call.divergence,
        soft_scale=call.soft_scale,
        ignore_index=call.ignore_index,
        mask=valid,
        normalizer=normalizer,
        beta=call.beta,
        lam=call.lam,
    )


@functools.cache
def _compiled_chunk_loss(backend: bool | str):
    # One compiled function per backend: its graphs are cached per shape and option set.
    return torch.compile(_chunk_loss, backend="inductor" if backend is True else backend)
