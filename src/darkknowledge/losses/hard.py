"""The labels-only objective at vocabulary scale: the student's cross-entropy, chunk by chunk.

    L_hard = CE(z, y) = lse(z) − z_y,      z = scale · (h Wᵀ + b), then the optional softcap

For the baselines that train a language model on labels alone: no teacher projection and no
divergence, through the same chunk engine as the distillation losses (the closed form's
cross-entropy alone, ``ForwardKL(soft=False)``; ``hard_only_loss`` under autograd when a softcap
is given). ``hard_only_loss`` on logits is in ``kd.py``.
"""

from __future__ import annotations

import torch

from . import _checks
from . import _fused_common as common
from .engine.call import KDCall
from .engine.chunker import run_fused_linear
from .engine.forward_kl import Buffers, ForwardKL
from .fused import DEFAULT_CHUNK_SIZE
from .kd import KDLoss
from .kd_chunks import AutogradKD
from .reduction import Normalizer, valid_positions


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
    carries a gradient (to ``student_hidden``, ``student_weight`` and ``student_bias``).

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
    common.check_reduction(reduction)
    student = common.student_inputs(
        student_hidden, student_weight, student_bias, chunk_size=chunk_size,
        vocab_size=vocab_size, logit_scale=student_logit_scale, softcap=student_softcap,
    )  # fmt: skip
    hidden, head, leading_shape = student.hidden, student.head, student.leading_shape
    vocab = head.weight.shape[0]
    num_rows, dtype = hidden.shape[0], common.math_dtype(hidden)
    _checks.check_labels(labels, leading_shape, vocab, ignore_index)
    labels = labels.reshape(num_rows)
    valid = valid_positions(labels, None, ignore_index)

    def objective_for(_temperature, _need_temperature_grad: bool):
        if head.softcap is not None:  # tanh has no closed form here: autograd
            return AutogradKD(KDCall(alpha=0.0, ignore_index=ignore_index), 1.0)
        buffers = Buffers(min(chunk_size, max(num_rows, 1)), vocab, dtype, hidden.device)
        return ForwardKL(
            temperature=1.0, buffers=buffers, alpha=0.0, soft=False, student_scale=head.scale
        )

    normalizer = common.normalizer_for(reduction, normalizer, valid, num_rows, dtype)
    total, soft, hard = run_fused_linear(
        objective_for, hidden, student.weight, student.bias, head, None,
        labels=labels, valid=valid, normalizer=normalizer, chunk_size=chunk_size,
    )  # fmt: skip
    return KDLoss(total, soft, hard)
