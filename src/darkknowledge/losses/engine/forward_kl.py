"""The closed form of the default objective: forward KL at temperature T plus cross-entropy.

Per row, with student logits ``s`` and teacher logits ``t`` (after their logit scales),
``s' = s / T``, ``t' = t / T``, ``p = softmax(t')``, ``q = softmax(s')``:

    KL(p ‖ q) = Σ_v p_v (t'_v − s'_v) + lse(s') − lse(t')
    CE(s, y)  = lse(s) − s_y                                             (T = 1)
    ∂/∂s [a·KL + b·CE] = a/T · (q − p) + b · (softmax(s) − onehot(y))

Written with the shifted exponentials ``E = exp(x − max x)`` and their row sums ``Z``:
``Σ p (t' − s') = Σ E_t (t'' − s'') / Z_t`` and ``lse(s') − lse(t') = log Z_q − log Z_t`` once the
maxima cancel (``x'' = x' − max x'``). One exponential per logit and side (two for the student
when T ≠ 1 and there are labels), in float32 buffers allocated on the first chunk and reused.

**-inf** (a masked vocabulary entry) means probability 0, without NaN: the maxima and the sums
are clamped (a row of only -inf has max ``NEG_LARGE`` and sum 1), ``t'' − s''`` goes through
one ``nan_to_num`` pass that is made only where -inf can occur (logits given by the caller, or
an output layer with a bias): both -inf gives 0, a teacher -inf gives 0 (``p = 0`` there), a
student -inf where ``p > 0`` gives ``-NEG_LARGE``: a huge but finite KL, as in ``soften``.

:class:`ForwardKL` is the objective of the chunk engine: loss parts and gradient in one sweep
(the fused losses), or per-row values and log-normalisers without a gradient (the forward pass
of ``kd_loss``). :class:`ForwardKLGradient` is the gradient from those saved log-normalisers and
per-row upstream gradients (the backward pass of ``kd_loss``). ``soft=False`` is the
cross-entropy alone (the labels-only losses): no teacher, no KL.
"""

from __future__ import annotations

import torch

from ..divergences import NEG_LARGE
from ..reduction import reduce_positions
from .chunker import Chunk, ChunkResult

Temperature = float | torch.Tensor  # a float, or per row (N, 1), without gradient


class Buffers:
    """``(rows, V)`` buffers of the math dtype, made on first use and reused by every chunk: a
    fresh 128 MB tensor per chunk would cost its page faults every time."""

    def __init__(self, rows: int, vocab: int, dtype: torch.dtype, device: torch.device) -> None:
        self.shape, self.dtype, self.device = (rows, vocab), dtype, device
        self._buffers: list[torch.Tensor] = []

    def __call__(self, index: int, rows: int) -> torch.Tensor:
        while len(self._buffers) <= index:
            self._buffers.append(torch.empty(self.shape, dtype=self.dtype, device=self.device))
        return self._buffers[index][:rows]


def _rows_of(temperature: Temperature, rows: slice) -> Temperature:
    return temperature[rows] if isinstance(temperature, torch.Tensor) else temperature


def _shifted_exp(logits: torch.Tensor, out: torch.Tensor | None = None):
    """``E = exp(x − max x)`` (into ``out``, else in place); returns ``(E, max, Z)``, the last two
    ``(n, 1)``. The clamps only act on rows of -inf: max ``NEG_LARGE``, sum 1, so no NaN."""
    top = logits.amax(-1, keepdim=True).clamp_min_(NEG_LARGE)
    shifted = logits.sub_(top)
    exps = shifted.exp_() if out is None else torch.exp(shifted, out=out)
    return exps, top, exps.sum(-1, keepdim=True).clamp_min_(1.0)


class ForwardKL:
    """``(1 − alpha)·CE + soft_weight·KL`` per chunk, in closed form (see the module docstring).

    Args:
        temperature: a float, or a per-row ``(N, 1)`` tensor without gradient.
        alpha: the hard term's weight is ``1 − alpha`` (its gradient only with labels).
        soft_weight: the soft term's weight, ``alpha · soft_scale``.
        soft: False for the cross-entropy alone (no teacher is read).
        student_scale, teacher_scale: factors on the logits, applied on the hidden side.
        buffers: where the chunk's ``(n, V)`` values live.
        per_row: return per-row ``(kl, ce, lse_t, lse_q, lse_s)`` and no parts or gradient.
    """

    def __init__(
        self,
        *,
        temperature: Temperature,
        buffers: Buffers,
        alpha: float = 1.0,
        soft_weight: float = 0.0,
        soft: bool = True,
        student_scale: float = 1.0,
        teacher_scale: float = 1.0,
        per_row: bool = False,
    ) -> None:
        self.temperature, self.buffers = temperature, buffers
        self.unit = not isinstance(temperature, torch.Tensor) and temperature == 1.0
        self.alpha, self.soft_weight, self.soft = alpha, soft_weight, soft
        self.student_scale, self.teacher_scale = student_scale, teacher_scale
        self.per_row = per_row

    def __call__(self, chunk: Chunk) -> ChunkResult:
        temperature = _rows_of(self.temperature, chunk.rows)
        labels = None if chunk.labels is None else chunk.safe_labels()  # (n, 1)
        kl, ce, exps, normalisers = self._values(chunk, temperature, labels)
        if self.per_row:
            kl, ce = (
                torch.zeros(chunk.size, dtype=self.buffers.dtype, device=self.buffers.device)
                if value is None
                else value.squeeze(-1)
                for value in (kl, ce)
            )
            return ChunkResult(per_row=(kl, ce, *normalisers))
        parts = self._parts(chunk, kl, ce)
        if not chunk.need_logits_grad:
            return ChunkResult(parts)
        grad, row_scale = self._gradient(chunk, temperature, labels, *exps)
        return ChunkResult(parts, grad, row_scale)

    def _values(self, chunk: Chunk, temperature: Temperature, labels: torch.Tensor | None):
        """KL and CE ``(n, 1)`` (None when not asked), the exponentials and their sums, and the
        log-normalisers ``lse(t'), lse(s'), lse(s)`` (each ``(n, 1)``) for a backward pass."""
        n, buffer, unit = chunk.size, self.buffers, self.unit
        kl = ce = e_t = z_t = t_max = e_q = z_q = e_s = z_s = None
        if self.soft:
            # A: t' (the factor scale/T is folded into the projection), then t''; B: E_t.
            teacher = chunk.teacher.logits(self.teacher_scale / temperature, out=buffer(0, n))
            e_t, t_max, z_t = _shifted_exp(teacher, out=buffer(1, n))
        # C: s, then s − max s, later E_s.   D: s'' = (s − max s) / T, later E_q; at T = 1, C.
        student = chunk.student.logits(self.student_scale, out=buffer(2, n))
        if labels is not None:
            picked = student.gather(-1, labels).clamp_min_(NEG_LARGE)  # s_y, (n, 1)
        s_max = student.amax(-1, keepdim=True).clamp_min_(NEG_LARGE)
        shifted = student.sub_(s_max)
        if self.soft:
            inverse = 1.0 / temperature
            scaled = shifted if unit else torch.mul(shifted, inverse, out=buffer(3, n))
            gap = teacher.sub_(scaled)  # t'' − s'', in A
            if chunk.student.may_be_infinite or chunk.teacher.may_be_infinite:
                gap.nan_to_num_(nan=0.0, posinf=-NEG_LARGE, neginf=0.0)
            weighted_gap = gap.mul_(e_t).sum(-1, keepdim=True)  # Σ E_t (t'' − s'')
            e_q = scaled.exp_()
            z_q = e_q.sum(-1, keepdim=True).clamp_min_(1.0)
            kl = weighted_gap / z_t + torch.log(z_q / z_t)
        if labels is not None:
            if self.soft and unit:
                e_s, z_s = e_q, z_q
            else:
                e_s = shifted.exp_()
                z_s = e_s.sum(-1, keepdim=True).clamp_min_(1.0)
            ce = s_max + torch.log(z_s) - picked
        normalisers = ()
        if self.per_row:  # lse(t'), lse(s'), lse(s); a missing one stands in (it is not read)
            lse_s = None if z_s is None else s_max + torch.log(z_s)
            lse_q = lse_s if z_q is None else s_max * (1.0 / temperature) + torch.log(z_q)
            lse_t = lse_q if z_t is None else t_max + torch.log(z_t)
            normalisers = (lse_t, lse_q, lse_s if lse_s is not None else lse_q)
        return kl, ce, (e_t, z_t, e_q, z_q, e_s, z_s), normalisers

    def _parts(self, chunk: Chunk, kl, ce) -> torch.Tensor:
        """``(total, soft, hard)`` of this chunk, each a sum over valid rows / normalizer."""
        normalizer = chunk.normalizer
        reference = kl if kl is not None else ce
        soft = (
            reference.new_zeros(())
            if kl is None
            else reduce_positions(kl.squeeze(-1), chunk.valid, "mean", normalizer)
        )
        hard = (
            reference.new_zeros(())
            if ce is None
            else reduce_positions(ce.squeeze(-1), chunk.valid, "mean", normalizer)
        )
        total = (1.0 - self.alpha) * hard + self.soft_weight * soft
        return torch.stack([total, soft, hard])

    def _gradient(self, chunk: Chunk, temperature: float, labels, e_t, z_t, e_q, z_q, e_s, z_s):
        """The gradient as ``buffer · row_scale``: combined in place, the row factors kept out.

        ``grad = common · [a (q − p) + b (softmax(s) − onehot(y))]``, ``common = valid · scale /
        normalizer``, ``a = soft_weight / T``, ``b = 1 − alpha`` (0 without labels).
        """
        a = self.soft_weight / temperature if self.soft else 0.0
        b = 0.0 if labels is None else 1.0 - self.alpha
        common = self.student_scale / chunk.normalizer
        if chunk.valid is not None:
            common = chunk.valid.unsqueeze(-1).to(e_s.dtype if e_q is None else e_q.dtype) * common
        # a, b >= 0 (soft_scale is checked): a + b = 0 only when both are, the last case below.
        if (
            e_s is e_q and a + b
        ):  # T = 1: softmax(s) = q, the gradient is (a + b) q − a p − b onehot
            weight = a + b
            grad, row_scale = e_q, common * weight / z_q
            if a:
                grad.addcmul_(e_t, z_q / z_t, value=-a / weight)
            if b:
                grad.scatter_add_(-1, labels, (-b / weight) * z_q)
            return grad, row_scale
        if a:  # q is the base: grad = (a / Z_q) · [E_q − (Z_q/Z_t) E_t + (b/a)(Z_q/Z_s) E_s − ...]
            grad, row_scale = e_q, common * a / z_q
            grad.addcmul_(e_t, z_q / z_t, value=-1.0)
            if b:
                grad.addcmul_(e_s, z_q / z_s, value=b / a)
                grad.scatter_add_(-1, labels, (-b / a) * z_q)
            return grad, row_scale
        if b:  # alpha·soft_scale = 0: only the hard term has a gradient
            grad, row_scale = e_s, common * b / z_s
            grad.scatter_add_(-1, labels, -z_s)
            return grad, row_scale
        base = e_q if e_q is not None else self.buffers(2, chunk.size)
        return base.zero_(), torch.zeros(chunk.size, 1, dtype=base.dtype, device=base.device)


class ForwardKLGradient:
    """``∂/∂s Σ_rows (g_kl · KL + g_ce · CE)`` for per-row upstream gradients ``g_kl, g_ce``,
    from the log-normalisers a :class:`ForwardKL` ``per_row`` pass saved: ``p = exp(t' − lse t')``
    and the like need no maxima or sums again.

        ∂/∂s = (g_kl / T) · (q − p) + g_ce · (softmax(s) − onehot(y))
    """

    def __init__(
        self,
        *,
        temperature: Temperature,
        buffers: Buffers,
        normalisers: tuple[torch.Tensor, torch.Tensor, torch.Tensor],  # each (N, 1)
        grad_kl: torch.Tensor,  # (N, 1)
        grad_ce: torch.Tensor,  # (N, 1)
        soft: bool = True,
    ) -> None:
        self.temperature, self.buffers, self.soft = temperature, buffers, soft
        self.unit = not isinstance(temperature, torch.Tensor) and temperature == 1.0
        self.normalisers, self.grad_kl, self.grad_ce = normalisers, grad_kl, grad_ce

    def __call__(self, chunk: Chunk) -> ChunkResult:
        rows, n, buffer = chunk.rows, chunk.size, self.buffers
        inverse = 1.0 / _rows_of(self.temperature, rows)
        lse_t, lse_q, lse_s = (value[rows] for value in self.normalisers)
        with_labels = chunk.labels is not None
        b = self.grad_ce[rows]  # (n, 1)
        student = chunk.student.logits(1.0, out=buffer(2, n))  # s
        if not self.soft:  # the cross-entropy alone
            grad = student.sub_(lse_s).exp_().mul_(b)
        else:
            a = self.grad_kl[rows] * inverse
            p = chunk.teacher.logits(inverse, out=buffer(0, n)).sub_(lse_t).exp_()
            scaled = student if self.unit else torch.mul(student, inverse, out=buffer(3, n))
            grad = scaled.sub_(lse_q).exp_()  # q
            unit_labels = self.unit and with_labels  # softmax(s) is q
            grad.mul_(a + b if unit_labels else a).addcmul_(p, a, value=-1.0)
            if with_labels and not self.unit:
                grad.addcmul_(student.sub_(lse_s).exp_(), b)
        if with_labels:
            grad.scatter_add_(-1, chunk.safe_labels(), -b)
        return ChunkResult(logits_grad=grad)
