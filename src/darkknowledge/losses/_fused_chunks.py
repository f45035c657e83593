"""What :func:`darkknowledge.fused_linear_kd_loss` computes on one chunk of rows.

The chunk loop (``fused.py``) owns the rows, the accumulation and the matrix products of the
backward pass. For each chunk it asks an *objective* for the loss parts and for the gradient
with respect to the student's pre-activation logits ``z = h Wᵀ + b``. That gradient comes back
as ``grad · row_scale``: a ``(n, V)`` buffer and a ``(n, 1)`` factor that the loop folds into the
small ``(n, H)`` side of its products, which saves a full pass over the ``(n, V)`` buffer.

Two objectives:

- :class:`AutogradChunks`: any divergence and option, by autograd through :func:`kd_loss` on
  the chunk's logits. The reference for everything else.
- :class:`ForwardKLChunks`: the default objective (forward KL at a fixed T plus the hard
  cross-entropy) in closed form, in buffers allocated once per call. On a CPU its
  element-wise passes cost as much as the matrix products otherwise; this needs three
  exponentials per logit and no fresh (n, V) allocation per chunk (a fresh 128 MB buffer
  costs its page faults every time).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch

from .kd import kd_loss, resolve_soft_scale
from .reduction import reduce_positions, valid_positions
from .transforms import upcast

if TYPE_CHECKING:  # fused.py builds the objectives from its call description
    from .fused import _ChunkedKD as ChunkedKD


@dataclass(frozen=True)
class Head:
    """One output layer, already cut to the shared vocabulary."""

    weight: torch.Tensor  # (V, H)
    bias: torch.Tensor | None  # (V,)
    scale: float
    softcap: float | None

    def pre_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``h Wᵀ + b`` in the input dtype: ``(n, H) -> (n, V)``."""
        return self.project(hidden, self.bias)

    def project(
        self, hidden: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``h Wᵀ + bias``, ``(n, H) -> (n, V)``, into ``out`` when given (cast to its dtype)."""
        direct = out if out is None or out.dtype == hidden.dtype else None
        if bias is None:
            logits = torch.mm(hidden, self.weight.T, out=direct)
        else:
            logits = torch.addmm(bias, hidden, self.weight.T, out=direct)
        # bfloat16 products, float32 math: the cast is the one extra pass.
        return logits if out is None or direct is not None else out.copy_(logits)

    def finish(self, pre_logits: torch.Tensor) -> torch.Tensor:
        """Scale and soft-cap in float32 (or float64): ``(n, V) -> (n, V)``."""
        logits = upcast(pre_logits)
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = self.softcap * torch.tanh(logits / self.softcap)
        return logits


class ChunkResult(NamedTuple):
    """One chunk's share of the loss and its gradients (each None when not asked for)."""

    parts: torch.Tensor  # (3,): total, soft, hard of this chunk, already divided by N
    logits_grad: torch.Tensor | None  # (n, V) math dtype: ∂total/∂z divided by row_scale
    row_scale: torch.Tensor | None  # (n, 1), or None for 1
    temperature_grad: torch.Tensor | None


@dataclass(frozen=True)
class AutogradChunks:
    """Any objective of :func:`kd_loss`, by autograd on the chunk's float32 logits."""

    problem: ChunkedKD
    temperature: float | torch.Tensor  # a float, or a () or (N,) leaf tensor
    need_logits_grad: bool
    need_temperature_grad: bool

    def __call__(self, rows: slice, hidden: torch.Tensor) -> ChunkResult:
        # A tensor temperature is a leaf here (see fused.py): its gradient has its full shape.
        temperature = self.temperature
        per_position = isinstance(temperature, torch.Tensor) and temperature.dim() > 0
        problem = self.problem
        with torch.no_grad():
            teacher = problem.teacher
            teacher_logits = teacher.finish(teacher.pre_logits(problem.teacher_hidden[rows]))
            pre = problem.student.pre_logits(hidden)  # (n, V) in the input dtype
        with torch.enable_grad():
            # The gradient is taken with respect to the pre-activation logits in float32: the
            # chunk loop's matrix products turn it into the hidden, weight and bias gradients.
            pre = upcast(pre).requires_grad_(self.need_logits_grad)
            compiled = problem.compile
            part = (_compiled_chunk_loss(compiled) if compiled else _chunk_loss)(
                problem.student,
                pre,
                teacher_logits,
                None if problem.labels is None else problem.labels[rows],
                temperature[rows] if per_position else temperature,
                problem.kd_options,
            )
            wanted = [
                tensor
                for tensor, need in (
                    (pre, self.need_logits_grad),
                    (temperature, self.need_temperature_grad),
                )
                if need
            ]
            grads = list(torch.autograd.grad(part.total, wanted)) if wanted else []
        parts = torch.stack([p.detach() for p in part])
        logits_grad = grads.pop(0) if self.need_logits_grad else None
        temperature_grad = grads.pop(0) if self.need_temperature_grad else None
        return ChunkResult(parts, logits_grad, None, temperature_grad)


def _chunk_loss(student: Head, pre, teacher_logits, labels, temperature, kd_options):
    """kd_loss on one chunk of logits: the step that ``compile=True`` hands to torch.compile."""
    logits = student.finish(pre)
    return kd_loss(logits, teacher_logits, labels, temperature=temperature, **kd_options)


@functools.cache
def _compiled_chunk_loss(backend: bool | str):
    # One compiled function per backend: its graphs are cached per shape and option set.
    return torch.compile(_chunk_loss, backend="inductor" if backend is True else backend)


class ForwardKLChunks:
    """Forward KL at a fixed temperature plus the hard cross-entropy, in closed form.

    With ``t' = scale_t·t / T`` and ``s' = scale_s·s / T`` (``s = h Wᵀ + b``), per row:

        KL  = Σ_v p_v (t'_v − s'_v) + lse(s') − lse(t'),     p = softmax(t'), q = softmax(s')
        CE  = lse(s) − s_y                                    (T = 1, the student's scale)
        ∂total/∂s = scale_s · valid / N · [a (q − p) + b (softmax(s) − onehot(y))]
        a = alpha · soft_scale / T,   b = 1 − alpha (0 without labels)

    Written with the shifted exponentials ``E = exp(x − max x)`` and their sums ``Z``:
    ``Σ p (t' − s') = Σ E_t (t'' − s'') / Z_t`` and ``lse(s') − lse(t') = log Z_q − log Z_t``
    after the maxima cancel. The gradient is assembled in the ``E_q`` buffer and its per-row
    factor (``1 / Z_q`` and the constants) goes to the chunk loop as ``row_scale``.

    Buffers: three ``(chunk, V)`` float32 buffers at T = 1, four otherwise, allocated on the
    first chunk and reused. Needs: divergence ``forward_kl``, a Python float temperature, no
    softcap, finite biases (the other cases go through :class:`AutogradChunks`).
    """

    def __init__(
        self,
        problem: ChunkedKD,
        temperature: float,
        *,
        rows_per_chunk: int,
        math_dtype: torch.dtype,
        need_logits_grad: bool,
    ) -> None:
        options = problem.kd_options
        self.student, self.teacher = problem.student, problem.teacher
        self.teacher_hidden = problem.teacher_hidden
        self.temperature = temperature
        self.alpha = options["alpha"]
        self.with_labels = problem.labels is not None
        self.valid = valid_positions(problem.labels, None, options["ignore_index"])  # (N,) or None
        if self.with_labels:
            # Ignored rows get class 0; their row_scale is 0, so whatever they hold drops out.
            self.safe_labels = problem.labels.masked_fill(~self.valid, 0).unsqueeze(-1)  # (N, 1)
        # "sum" has no normalizer: dividing by 1 keeps one formula. In the math dtype: a count
        # from valid.sum() is an integer tensor.
        normalizer = 1.0 if options["normalizer"] is None else options["normalizer"]
        self.normalizer = (
            normalizer.to(math_dtype) if isinstance(normalizer, torch.Tensor) else float(normalizer)
        )
        self.soft_weight = self.alpha * float(
            resolve_soft_scale(options["soft_scale"], temperature)
        )
        self.need_logits_grad = need_logits_grad
        # The factors scale / T (teacher) and scale (student) go on the small (n, H) hidden
        # states and once on the biases, not on the (n, V) logits: one pass fewer per side.
        self.teacher_factor = self.teacher.scale / temperature
        self.teacher_bias = _scaled(self.teacher.bias, self.teacher_factor)
        self.student_bias = _scaled(self.student.bias, self.student.scale)
        self.rows_per_chunk = rows_per_chunk
        self.math_dtype = math_dtype
        self._buffers: list[torch.Tensor] = []

    @staticmethod
    def applies(problem: ChunkedKD, temperature) -> bool:
        """Whether this closed form computes the requested objective."""
        heads = (problem.student, problem.teacher)
        return (
            problem.kd_options["divergence"] == "forward_kl"
            and isinstance(temperature, float | int)
            and not problem.compile
            and all(head.softcap is None for head in heads)
            and all(head.bias is None or bool(torch.isfinite(head.bias).all()) for head in heads)
        )

    def _buffer(self, index: int, rows: int) -> torch.Tensor:
        while len(self._buffers) <= index:
            self._buffers.append(
                self.student.weight.new_empty(
                    (self.rows_per_chunk, self.student.weight.shape[0]), dtype=self.math_dtype
                )
            )
        return self._buffers[index][:rows]

    def __call__(self, rows: slice, hidden: torch.Tensor) -> ChunkResult:
        n, temperature = hidden.shape[0], self.temperature
        unit_temperature = temperature == 1.0
        # A: t'' = t' − max t', later t'' − s''.   B: E_t.   C: s, later s − max s, later E_s.
        # D: s'' = (s − max s) / T, later E_q; at T = 1 it is C itself.
        a_buf, b_buf, c_buf = self._buffer(0, n), self._buffer(1, n), self._buffer(2, n)
        self.teacher.project(
            _scaled(self.teacher_hidden[rows], self.teacher_factor), self.teacher_bias, out=a_buf
        )
        a_buf.sub_(a_buf.amax(-1, keepdim=True))
        e_t = torch.exp(a_buf, out=b_buf)
        z_t = e_t.sum(-1, keepdim=True)

        s = self.student.project(_scaled(hidden, self.student.scale), self.student_bias, out=c_buf)
        if self.with_labels:
            picked = s.gather(-1, self.safe_labels[rows])  # s_y, (n, 1)
        s_max = s.amax(-1, keepdim=True)
        shifted = s.sub_(s_max)  # s − max s, in C
        if unit_temperature:
            scaled = shifted
        else:
            scaled = torch.mul(shifted, 1.0 / temperature, out=self._buffer(3, n))
        # Σ E_t (t'' − s''), in A.
        weighted_gap = a_buf.sub_(scaled).mul_(e_t).sum(-1, keepdim=True)
        e_q = scaled.exp_()
        z_q = e_q.sum(-1, keepdim=True)
        kl = weighted_gap / z_t + torch.log(z_q / z_t)  # (n, 1)

        b = 0.0
        ce = z_s = e_s = None
        if self.with_labels:
            if unit_temperature:
                e_s, z_s = e_q, z_q
            else:
                e_s = shifted.exp_()
                z_s = e_s.sum(-1, keepdim=True)
            ce = s_max + torch.log(z_s) - picked
            b = 1.0 - self.alpha
        parts = self._parts(rows, kl, ce)
        if not self.need_logits_grad:
            return ChunkResult(parts, None, None, None)
        grad, row_scale = self._logits_grad(rows, e_t, z_t, e_q, z_q, e_s, z_s, b)
        return ChunkResult(parts, grad, row_scale, None)

    def _parts(self, rows: slice, kl: torch.Tensor, ce: torch.Tensor | None) -> torch.Tensor:
        """``(total, soft, hard)`` of this chunk, each a sum over valid rows / N."""
        valid = None if self.valid is None else self.valid[rows]
        soft = reduce_positions(kl.squeeze(-1), valid, "mean", self.normalizer)
        hard = (
            kl.new_zeros(())
            if ce is None
            else reduce_positions(ce.squeeze(-1), valid, "mean", self.normalizer)
        )
        total = (1.0 - self.alpha) * hard + self.soft_weight * soft
        return torch.stack([total, soft, hard])

    def _logits_grad(self, rows, e_t, z_t, e_q, z_q, e_s, z_s, b: float):
        """The gradient as ``buffer · row_scale``: combine in place, keep the row factors out."""
        a = self.soft_weight / self.temperature
        common = self.student.scale / self.normalizer
        if self.valid is not None:
            common = self.valid[rows].unsqueeze(-1).to(self.math_dtype) * common  # (n, 1)
        # a, b >= 0 (soft_scale is checked): a + b = 0 only when both are, the last case below.
        if (
            e_s is e_q and a + b
        ):  # T = 1: softmax(s) = q, the gradient is (a + b) q − a p − b onehot
            weight = a + b
            grad, row_scale = e_q, common * weight / z_q
            if a:
                grad.addcmul_(e_t, z_q / z_t, value=-a / weight)
            if b:
                grad.scatter_add_(-1, self.safe_labels[rows], (-b / weight) * z_q)
            return grad, row_scale
        if a:  # q is the base: grad = (a / Z_q) · [E_q − (Z_q/Z_t) E_t + (b/a)(Z_q/Z_s) E_s − ...]
            grad, row_scale = e_q, common * a / z_q
            grad.addcmul_(e_t, z_q / z_t, value=-1.0)
            if b:
                grad.addcmul_(e_s, z_q / z_s, value=b / a)
                grad.scatter_add_(-1, self.safe_labels[rows], (-b / a) * z_q)
            return grad, row_scale
        if b:  # alpha·soft_scale = 0: only the hard term has a gradient
            grad, row_scale = e_s, common * b / z_s
            grad.scatter_add_(-1, self.safe_labels[rows], -z_s)
            return grad, row_scale
        return e_q.zero_(), torch.zeros_like(z_q)


def _scaled(tensor: torch.Tensor | None, factor: float) -> torch.Tensor | None:
    """``tensor · factor``, without a copy when the factor is 1 (or the tensor None)."""
    return tensor if tensor is None or factor == 1.0 else tensor * factor
