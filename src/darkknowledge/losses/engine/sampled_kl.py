"""Reverse KL estimated from the student's own samples: the teacher side is one number per row.

Per row, ``x`` is a token sampled from the student, ``z`` the student's logits (after their
scale and softcap), ``q = softmax(z / T)``, and the teacher gives ``log p(x)``, its own
tempered log-probability of ``x``. With ``a = log q(x) − log p(x)``:

    value       a                          E_{x~q}[a] = KL(q ‖ p)          (Schulman's k1)
    surrogate   sg(a) · log q(x)           E_{x~q}[a · ∇log q(x)] = ∇KL(q ‖ p)
    ∂/∂z        a · (onehot(x) − q) / T    (the surrogate's gradient)

The value is the estimate and the gradient the surrogate's, as ``dk.rl.kl_penalty(estimator=
"k1", gradient="unbiased")`` (the score-function estimator; ``E_q[∇log q] = 0`` makes the
second half of ``∇KL = Σ ∇q (log q − log p) + Σ q ∇log q`` vanish). It is unbiased when ``x``
is drawn from ``q`` itself, at the same temperature; a sampling temperature ≠ T or a truncated
(top-k / top-p) sample weighs the tokens by another distribution.

:class:`SampledReverseKL` is the student's objective (one exponential pass over the chunk's
``(n, V)`` logits serves the log-normaliser and the gradient); :class:`TokenLogProb` gives
``log softmax(z / T)[x]`` per row without a gradient, which is how the teacher's side is made
from its hidden states and output layer. :class:`TokenLogProbs` is that side: ``(N,)`` values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..divergences import NEG_LARGE
from ..reduction import reduce_positions
from .chunker import Chunk, ChunkResult
from .forward_kl import Buffers, _shifted_exp


@dataclass(frozen=True)
class TokenLogProbs:
    """The teacher side of :class:`SampledReverseKL`: ``log p(x)`` ``(N,)`` per row."""

    values: torch.Tensor

    def rows(self, rows: slice) -> torch.Tensor:
        return self.values[rows]


def _tempered_logits(
    chunk: Chunk, buffers: Buffers, scale: float, softcap: float | None, temperature: float
):
    """``z / T`` of the chunk ``(n, V)`` in ``buffers(0)``, and ``tanh`` of the softcap (for the
    chain rule) in ``buffers(1)``, or None."""
    z = chunk.student.logits(scale, out=buffers(0, chunk.size))  # scale · (h Wᵀ + b)
    squashed = None
    if softcap is not None:  # z = c · tanh(u / c)
        squashed = torch.div(z, softcap, out=buffers(1, chunk.size)).tanh_()
        z = torch.mul(squashed, softcap, out=z)
    return (z if temperature == 1.0 else z.div_(temperature)), squashed


def _log_prob_of(logits: torch.Tensor, tokens: torch.Tensor):
    """``log softmax(logits)[tokens]`` ``(n, 1)``, and ``(E, Z)`` of the shifted exponentials
    (``logits`` is overwritten by ``E``)."""
    picked = logits.gather(-1, tokens)  # (n, 1), before the in-place exponential
    exps, top, total = _shifted_exp(logits)
    return (picked - top - total.log()).clamp_min_(NEG_LARGE), exps, total


class SampledReverseKL:
    """The chunk objective of the sampled reverse KL (see the module docstring).

    Args:
        temperature: T of ``q = softmax(z / T)`` (and of the teacher's log-probabilities).
        soft_weight: the factor on the estimate, e.g. ``alpha · T²``.
        buffers: room for the chunk's ``(n, V)`` values (two with a softcap, else one).
        scale, softcap: of the student's output layer.
    """

    def __init__(
        self,
        *,
        temperature: float,
        soft_weight: float,
        buffers: Buffers,
        scale: float = 1.0,
        softcap: float | None = None,
    ) -> None:
        self.temperature, self.soft_weight = float(temperature), float(soft_weight)
        self.buffers, self.scale, self.softcap = buffers, scale, softcap

    def __call__(self, chunk: Chunk) -> ChunkResult:
        tokens = chunk.safe_labels()  # (n, 1)
        logits, squashed = _tempered_logits(
            chunk, self.buffers, self.scale, self.softcap, self.temperature
        )
        log_q, exps, total = _log_prob_of(logits, tokens)
        teacher = chunk.teacher.unsqueeze(-1).to(log_q.dtype).clamp_min(NEG_LARGE)  # (n, 1)
        advantage = log_q - teacher  # a, (n, 1)
        if chunk.valid is not None:
            advantage = advantage * chunk.valid.unsqueeze(-1)
        soft = reduce_positions(advantage.squeeze(-1), chunk.valid, "mean", chunk.normalizer)
        parts = torch.stack([self.soft_weight * soft, soft, torch.zeros_like(soft)])
        if not chunk.need_logits_grad:
            return ChunkResult(parts)
        grad = exps.div_(total).neg_()  # −q, in place of E
        grad.scatter_add_(-1, tokens, torch.ones_like(advantage))  # onehot(x) − q
        if squashed is not None:  # dz/du = 1 − tanh²
            grad.mul_(squashed.square_().neg_().add_(1.0))
        # a · w · scale / (T · N) per row: on the small side of the engine's products.
        row_scale = (
            advantage * (self.soft_weight * self.scale / self.temperature) / chunk.normalizer
        )
        return ChunkResult(parts, grad, row_scale)


class TokenLogProb:
    """``log softmax(z / T)[x]`` per row, as ``ChunkResult.per_row`` (no loss, no gradient):
    run over the teacher's hidden states and output layer, it makes :class:`TokenLogProbs`."""

    def __init__(
        self,
        *,
        temperature: float,
        buffers: Buffers,
        scale: float = 1.0,
        softcap: float | None = None,
    ) -> None:
        self.temperature, self.buffers = float(temperature), buffers
        self.scale, self.softcap = scale, softcap

    def __call__(self, chunk: Chunk) -> ChunkResult:
        logits, _ = _tempered_logits(
            chunk, self.buffers, self.scale, self.softcap, self.temperature
        )
        log_p, _, _ = _log_prob_of(logits, chunk.safe_labels())
        return ChunkResult(per_row=(log_p.squeeze(-1),))
