"""The one chunker: walk the rows, ask the objective, turn its gradient into input gradients.

An *objective* is any callable ``objective(chunk: Chunk) -> ChunkResult``. The chunker owns the
rows, the accumulation of the loss parts and what becomes of ``∂loss/∂z`` (the gradient with
respect to the chunk's student logits): hidden-state, weight and bias gradients for a student
given as hidden states and an output layer, or a logits gradient for a student given as logits.
It never holds more than one chunk's ``(n, V)`` values at a time.

:func:`sweep` runs the chunker inside a ``torch.autograd.Function``: the forward pass computes
the loss *and* its gradients chunk by chunk; the backward pass only multiplies them by the
incoming gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import torch

from .sides import Head, HeadStudent

Normalizer = float | torch.Tensor


@dataclass(frozen=True)
class Chunk:
    """What an objective receives for one chunk of ``n`` rows.

    Attributes:
        rows: the chunk's rows in the flattened ``(N,)`` order, to slice per-row data the
            objective holds (a per-row temperature, saved statistics).
        student: the student's rows (:class:`~.sides.HeadRows` or :class:`~.sides.LogitRows`):
            ``student.logits(factor, out=buffer)`` writes ``factor · z``, ``(n, V)``.
        teacher: the teacher side's rows (head rows, logit rows, :class:`~.sides.SparseRows`),
            or None for an objective without a teacher.
        labels: ``(n,)`` class indices, any value where ``valid`` is False; or None.
        valid: ``(n,)`` bool, True where the row counts; None when every row does.
        normalizer: divide the chunk's sums by this (the global count of valid rows for a
            mean, 1.0 for a sum), so that the chunks' parts add up to the loss.
        need_logits_grad: whether to return ``∂total/∂z``.
    """

    rows: slice
    student: Any
    teacher: Any
    labels: torch.Tensor | None
    valid: torch.Tensor | None
    normalizer: Normalizer
    need_logits_grad: bool

    @property
    def size(self) -> int:
        return self.rows.stop - self.rows.start

    def safe_labels(self) -> torch.Tensor:
        """``(n, 1)`` labels with the invalid rows' replaced by 0, ready for gather/scatter."""
        labels = self.labels if self.valid is None else self.labels.masked_fill(~self.valid, 0)
        return labels.unsqueeze(-1)


class ChunkResult(NamedTuple):
    """An objective's answer for one chunk (each field None when not computed).

    Attributes:
        parts: ``(3,)`` the chunk's ``(total, soft, hard)``, sums over valid rows divided by the
            normalizer.
        logits_grad: ``(n, V)`` in the math dtype: ``∂total/∂z`` divided by ``row_scale``.
        row_scale: ``(n, 1)``, or None for 1: a per-row factor the chunker applies on the small
            side of its products instead of a pass over ``(n, V)``.
        per_row: a tuple of ``(n, ...)`` tensors the chunker concatenates over chunks
            (per-position values, statistics saved for a backward pass).
        temperature_grad: ``∂total/∂T`` for a temperature tensor with a gradient.
    """

    parts: torch.Tensor | None = None
    logits_grad: torch.Tensor | None = None
    row_scale: torch.Tensor | None = None
    per_row: tuple[torch.Tensor, ...] | None = None
    temperature_grad: torch.Tensor | None = None


class Objective(Protocol):
    """A per-chunk objective: the loss parts of one chunk and ``∂total/∂z``."""

    def __call__(self, chunk: Chunk) -> ChunkResult: ...


class ChunkedOutput(NamedTuple):
    parts: torch.Tensor  # (3,) total, soft, hard
    per_row: tuple[torch.Tensor, ...] | None
    temperature_grad: torch.Tensor | None


def run_chunks(
    objective: Objective,
    student: Any,
    teacher: Any = None,
    *,
    labels: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
    normalizer: Normalizer = 1.0,
    chunk_size: int,
) -> ChunkedOutput:
    """Run ``objective`` over the rows of ``student`` in chunks of ``chunk_size``.

    ``student`` is a :class:`~.sides.HeadStudent` or :class:`~.sides.LogitsStudent`; it
    receives each chunk's logits gradient when it asks for one (``student.need_logits_grad``);
    read the input gradients from ``student.gradients()`` afterwards. ``teacher`` is a teacher
    side with ``rows(slice)`` (or None); ``labels`` and ``valid`` are ``(N,)``.
    """
    num_rows = student.num_rows
    parts = torch.zeros(3, dtype=student.math_dtype, device=student.device)
    need_grad = student.need_logits_grad
    per_row: list[tuple[torch.Tensor, ...]] = []
    temperature_grad = None
    for start in range(0, num_rows, chunk_size):
        rows = slice(start, min(start + chunk_size, num_rows))
        result = objective(
            Chunk(
                rows=rows,
                student=student.rows(rows),
                teacher=None if teacher is None else teacher.rows(rows),
                labels=None if labels is None else labels[rows],
                valid=None if valid is None else valid[rows],
                normalizer=normalizer,
                need_logits_grad=need_grad,
            )
        )
        if result.parts is not None:
            parts += result.parts
        if result.per_row is not None:
            per_row.append(result.per_row)
        if result.temperature_grad is not None:
            temperature_grad = (
                result.temperature_grad
                if temperature_grad is None
                else temperature_grad + result.temperature_grad
            )
        if need_grad:
            student.add_logits_grad(rows, result.logits_grad, result.row_scale)
        del result  # the chunk's (n, V) buffers go before the next chunk's
    joined = tuple(torch.cat(parts_) for parts_ in zip(*per_row)) if per_row else None
    return ChunkedOutput(parts, joined, temperature_grad)


# A sweep computes the loss parts and the gradients of ``total`` for the inputs whose entry in
# ``needs`` is True (None for the others).
Sweep = Callable[
    [Sequence[bool]], tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor | None]]
]


class _SweepFunction(torch.autograd.Function):
    """Forward: the loss and its gradients in one sweep. Backward: scale the stored gradients."""

    @staticmethod
    def forward(ctx, run: Sweep, *inputs):
        total, soft, hard, grads = run(tuple(ctx.needs_input_grad[1:]))
        ctx.mark_non_differentiable(soft, hard)
        ctx.save_for_backward(*grads)
        return total, soft, hard

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total, _grad_soft, _grad_hard):
        # Always a fresh product: handing autograd the stored tensor itself lets it accumulate
        # into it (a later backward with retain_graph=True would read a modified buffer), and
        # testing grad_total == 1 would wait for the device.
        grads = tuple(None if g is None else g * grad_total.to(g.dtype) for g in ctx.saved_tensors)
        return (None, *grads)


def sweep(
    run: Sweep, inputs: Sequence[torch.Tensor | None]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(total, soft, hard)`` from ``run``, with ``total`` differentiable for ``inputs``.

    ``run(needs)`` computes the parts and the gradients of ``total`` for the inputs that need
    one. Without any input needing a gradient (or under ``torch.no_grad()``) it runs once with
    nothing to differentiate and no autograd node is made. Double backward is refused
    (``once_differentiable``): the gradients are computed in closed form, not as a graph.
    """
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        return _SweepFunction.apply(run, *inputs)
    total, soft, hard, _ = run((False,) * len(inputs))
    return total, soft, hard


# objective_for(temperature, need_temperature_grad) -> the chunk objective of one run: the
# temperature is a float, or a leaf tensor of the engine's own when one is given.
ObjectiveFactory = Callable[[Any, bool], Objective]


def run_fused_linear(
    objective_for: ObjectiveFactory,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    head: Head | None = None,
    teacher: Any = None,
    *,
    labels: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
    normalizer: Normalizer = 1.0,
    chunk_size: int = 256,
    temperature: Any = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(total, soft, hard)`` of an objective over the rows of ``hidden`` ``(N, H)`` and the
    output layer ``weight`` ``(V, H)`` (+ ``bias``), with ``total`` differentiable for
    ``hidden``, ``weight``, ``bias`` and a tensor ``temperature``.

    The gradients are computed chunk by chunk in the forward pass (:func:`sweep`). ``head`` is
    the layer the objective sees (scale, softcap, a cut to fewer rows: the weight gradient is
    padded back with zeros); by default ``Head(weight, bias)``. ``labels`` and ``valid`` are
    ``(N,)``; ``teacher`` a teacher side with ``rows(slice)``, or None.
    """
    if head is None:
        head = Head(weight.detach(), None if bias is None else bias.detach())
    t_tensor = temperature if isinstance(temperature, torch.Tensor) else None

    def run(needs):
        need_hidden, need_weight, need_bias, need_temperature = needs
        side = HeadStudent(hidden, head, (need_hidden, need_weight, need_bias), weight.shape[0])
        # A leaf of our own, so that the objective can ask autograd for its gradient alone.
        leaf = (
            temperature if t_tensor is None else t_tensor.detach().requires_grad_(need_temperature)
        )
        out = run_chunks(
            objective_for(leaf, need_temperature), side, teacher,
            labels=labels, valid=valid, normalizer=normalizer, chunk_size=chunk_size,
        )  # fmt: skip
        grad_temperature = None
        if need_temperature:
            grad_temperature = (
                torch.zeros_like(leaf) if out.temperature_grad is None else out.temperature_grad
            )
        total, soft, hard = out.parts.unbind()
        return total, soft, hard, [*side.gradients(), grad_temperature]

    with torch.autocast(hidden.device.type, enabled=False):  # the dtypes are settled already
        return sweep(run, [hidden, weight, bias, t_tensor])
