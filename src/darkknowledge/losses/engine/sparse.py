"""Distillation from sparse teacher targets ``(ids, values)`` per position, in closed form.

Per row: the student's logits ``z`` ``(V,)`` (after scale and softcap), ``q = softmax(z)``; the
teacher gives ``k`` ids ``K`` with values (padding slots have ``kept = False``).

**topk** (values are the teacher's T = 1 log-probabilities ``log p_i``, kept mass
``m = Σ_K p_i``). The distributions compared are over *categories*: the kept ids, plus, with
``tail="bucket"``, one tail category holding everything else (teacher ``1 − m``, student
``1 − Σ_K q_i``). At temperature T each category's T = 1 log-probability is divided by T and
renormalised over the categories, on both sides:

    p'_j ∝ p_j^(1/T),   q'_j ∝ q_j^(1/T),   j ∈ K (∪ {tail}),      KL = Σ_j p'_j log(p'_j / q'_j)
    ∂KL/∂z_i = (q'_i − p'_i) / T   (i ∈ K),    ∂KL/∂z_v = (q'_tail − p'_tail) / T · q_v / q_tail  (v ∉ K)

With every token kept this is exactly forward KL at T (``p_i^(1/T)`` renormalised is
``softmax(t / T)``); the tail category is dropped where the row keeps every token. ``tail="none"``
drops the tail on both sides (both renormalised over ``K``).

**sampled** (values are counts ``c_i`` of ids drawn with replacement from the teacher's T = 1
distribution, ``S = Σ c_i``, ``p̂_i = c_i / S``): ``KL(p̂ ‖ q)``, whose gradient ``q − p̂`` is an
unbiased estimate of forward KL's ``q − p`` (``E[p̂] = p``); T must be 1.

The hard term is the cross-entropy at T = 1, as everywhere. One exponential pass over the
``(n, V)`` logits (``E = exp(z − max z)``) serves the cross-entropy, the tail sum (the kept
entries of ``E`` zeroed by a scatter, then a sum: exact, no ``Z − Σ_K E`` cancellation) and the
gradient, which is ``E`` times a per-row factor plus a scatter onto the kept ids.
"""

from __future__ import annotations

import torch

from ..divergences import NEG_LARGE
from ..reduction import reduce_positions
from .chunker import Chunk, ChunkResult
from .forward_kl import Buffers

Temperature = float | torch.Tensor  # a float, or per row (N, 1)


def _rows_of(value, rows: slice):
    return value[rows] if isinstance(value, torch.Tensor) and value.dim() else value


def category_kl(teacher_log, student_log, present, inverse_temperature):
    """KL between the tempered softmaxes of two sets of per-category log-weights ``(n, c)``
    over the ``present`` categories, and its gradient with respect to ``student_log``.

    Both sides are clamped to ``NEG_LARGE`` (a category of weight 0 has probability 0, no
    NaN); a row without any present category has KL 0 and gradient 0.
    """
    fill = teacher_log.new_full((), NEG_LARGE)
    a = torch.where(present, (teacher_log * inverse_temperature).clamp_min(NEG_LARGE), fill)
    b = torch.where(present, (student_log * inverse_temperature).clamp_min(NEG_LARGE), fill)
    log_p = a - torch.logsumexp(a, -1, keepdim=True)
    log_q = b - torch.logsumexp(b, -1, keepdim=True)
    p, q = log_p.exp() * present, log_q.exp() * present
    kl = torch.where(p > 0, p * (log_p - log_q), 0.0).sum(-1, keepdim=True)  # (n, 1)
    any_present = present.any(-1, keepdim=True)
    return kl * any_present, (q - p) * (inverse_temperature * any_present)


class SparseKD:
    """The chunk objective of the sparse losses (see the module docstring).

    Args:
        representation: ``"topk"`` or ``"sampled"``.
        tail: ``"bucket"`` or ``"none"`` (topk only).
        temperature: a float, or per row ``(N, 1)``; 1.0 for ``"sampled"``.
        alpha: the hard term's weight is ``1 − alpha``.
        soft_weight: ``alpha · soft_scale``: a float, or per row ``(N, 1)`` (T² per row).
        buffers: where the chunk's ``(n, V)`` values live (two buffers with a softcap, else one).
        student_scale, softcap: of the student's output layer.
    """

    def __init__(
        self,
        *,
        representation: str,
        tail: str,
        temperature: Temperature,
        alpha: float,
        soft_weight: float | torch.Tensor,
        buffers: Buffers,
        student_scale: float = 1.0,
        softcap: float | None = None,
    ) -> None:
        self.representation, self.bucket = representation, tail == "bucket"
        self.temperature, self.alpha, self.soft_weight = temperature, alpha, soft_weight
        self.buffers, self.student_scale, self.softcap = buffers, student_scale, softcap

    def __call__(self, chunk: Chunk) -> ChunkResult:
        n, buffer, teacher = chunk.size, self.buffers, chunk.teacher
        ids, kept = teacher.ids, teacher.kept  # (n, k)
        z = chunk.student.logits(self.student_scale, out=buffer(0, n))  # (n, V)
        if self.softcap is not None:  # z = c · tanh(u / c); keep tanh for the chain rule
            squashed = torch.div(z, self.softcap, out=buffer(1, n)).tanh_()
            z = torch.mul(squashed, self.softcap, out=z)
        z_kept = z.gather(-1, ids)  # (n, k)
        labels = None if chunk.labels is None else chunk.safe_labels()
        if labels is not None:
            picked = z.gather(-1, labels).clamp_min_(NEG_LARGE)
        top = z.amax(-1, keepdim=True).clamp_min_(NEG_LARGE)
        exps = z.sub_(top).exp_()  # E, in place
        exps_kept = (z_kept - top).exp()  # E at the kept ids, (n, k)
        kept_sum = (exps_kept * kept).sum(-1, keepdim=True)
        tail_sum = None
        if self.representation == "topk" and self.bucket:
            # Zero the kept entries: what remains sums to the tail exactly. Every slot of a row
            # writes the same value (padding points at a kept id of its row); a row without
            # kept ids writes its entries back unchanged.
            empty = ~kept.any(-1, keepdim=True)
            exps.scatter_(-1, ids, torch.where(empty, exps_kept, 0.0))
            tail_sum = exps.sum(-1, keepdim=True)
            z_sum = (tail_sum + kept_sum).clamp_min_(1.0)
        else:
            z_sum = exps.sum(-1, keepdim=True).clamp_min_(1.0)
        log_total = top + torch.log(z_sum)  # lse(z), (n, 1)
        temperature = _rows_of(self.temperature, chunk.rows)
        kl, grad_kept, dense = self._soft(
            teacher, z_kept, log_total, top, tail_sum, z_sum, temperature
        )
        ce = None if labels is None else log_total - picked
        parts = self._parts(chunk, kl, ce)
        if not chunk.need_logits_grad:
            return ChunkResult(parts)
        a = _rows_of(self.soft_weight, chunk.rows)  # the soft term's weight (per row or not)
        b = 0.0 if labels is None else 1.0 - self.alpha
        # grad = E · (b/Z + a · dense) + scatter onto K + (−b at y)
        row_factor = b / z_sum if dense is None else b / z_sum + a * dense
        grad = exps.mul_(row_factor)
        on_kept = a * grad_kept
        if tail_sum is not None:  # the kept entries were zeroed: their cross-entropy part too
            on_kept = on_kept + (b / z_sum) * exps_kept
        grad.scatter_add_(-1, ids, on_kept * kept)
        if labels is not None:
            grad.scatter_add_(-1, labels, torch.full_like(picked, -b))
        if self.softcap is not None:  # dz/du = 1 − tanh²
            grad.mul_(squashed.square_().neg_().add_(1.0))
        common = self.student_scale / chunk.normalizer
        if chunk.valid is not None:
            common = chunk.valid.unsqueeze(-1).to(grad.dtype) * common
        if not isinstance(common, torch.Tensor):
            common = torch.full_like(z_sum, common)
        return ChunkResult(parts, grad, common)

    def _soft(self, teacher, z_kept, log_total, top, tail_sum, z_sum, temperature):
        """KL ``(n, 1)`` and its gradient, as ``(kl, on_kept, dense)``: ``on_kept`` ``(n, k)``
        on the kept ids, ``dense`` ``(n, 1)`` the factor on the entries of ``E`` (the tail's, or
        all of them), None when the soft gradient has no dense part."""
        kept, values = teacher.kept, teacher.values
        if self.representation == "sampled":
            counts = torch.where(kept, values, 0.0)
            samples = counts.sum(-1, keepdim=True)
            p_hat = counts / samples.clamp_min(1.0)  # a row without samples: p̂ = 0, no soft term
            log_q = (z_kept - log_total).clamp_min(NEG_LARGE)
            log_p_hat = torch.where(p_hat > 0, p_hat, 1.0).log()
            kl = torch.where(p_hat > 0, p_hat * (log_p_hat - log_q), 0.0).sum(-1, keepdim=True)
            return kl, -p_hat, (samples > 0) / z_sum  # ∂KL/∂z = E / Z − p̂
        log_p = torch.where(kept, values, float("-inf"))
        inverse = 1.0 / temperature
        if not self.bucket:
            kl, grad = category_kl(log_p, z_kept, kept, inverse)
            return kl, grad, None
        vocab = self.buffers.shape[1]
        has_tail = kept.sum(-1, keepdim=True) < vocab  # a row keeping every token has no tail
        kept_log_mass = torch.logsumexp(log_p, -1, keepdim=True)
        teacher_tail = torch.where(has_tail, (-torch.expm1(kept_log_mass)).clamp_min(0.0), 0.0)
        tail_sum = tail_sum.clamp_min(torch.finfo(z_kept.dtype).tiny)
        student_tail = top + torch.log(tail_sum)  # log Σ_{v ∉ K} e^{z_v}
        kl, grad = category_kl(
            torch.cat([log_p, teacher_tail.log()], -1),
            torch.cat([z_kept, student_tail], -1),
            torch.cat([kept, has_tail], -1),
            inverse,
        )
        # The tail category's gradient spreads over the tail as e^{z_v} / Σ_tail e^{z}.
        return kl, grad[:, :-1], grad[:, -1:] / tail_sum

    def _parts(self, chunk: Chunk, kl: torch.Tensor, ce: torch.Tensor | None) -> torch.Tensor:
        valid, normalizer = chunk.valid, chunk.normalizer
        soft = reduce_positions(kl.squeeze(-1), valid, "mean", normalizer)
        hard = (
            torch.zeros_like(soft)
            if ce is None
            else reduce_positions(ce.squeeze(-1), valid, "mean", normalizer)
        )
        weight = _rows_of(self.soft_weight, chunk.rows)
        if isinstance(weight, torch.Tensor):  # T² per row: each row scaled before the sum
            weighted = reduce_positions((kl * weight).squeeze(-1), valid, "mean", normalizer)
        else:
            weighted = weight * soft
        total = (1.0 - self.alpha) * hard + weighted
        return torch.stack([total, soft, hard])
