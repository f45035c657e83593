"""Where a chunk's logits come from: an output layer applied to hidden states, or given logits.

The engine walks rows (token positions). For each chunk it hands the objective the student's
rows and the teacher's rows as *Rows* objects that produce the chunk's logits on demand, into a
buffer the objective owns, so that the ``(tokens, vocab)`` logits never exist:

- :class:`HeadRows`: ``scale · (h Wᵀ + b)`` (then a softcap) from hidden states ``(n, H)``;
- :class:`LogitRows`: rows of logits ``(n, V)`` given by the caller (``kd_loss``, or a teacher
  whose logits were computed elsewhere).

The *sides* own all rows and, for the student, receive the gradient: :class:`HeadStudent`
turns ``∂loss/∂z`` into hidden-state, weight and bias gradients, :class:`LogitsStudent` writes it
into a logits gradient. Teacher sides only give rows: :class:`HeadTeacher`,
:class:`LogitsTeacher` and the sparse :class:`SparseTeacher`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..transforms import compute_dtype, upcast

Factor = float | torch.Tensor  # a float, or a per-row (n, 1) tensor


@dataclass(frozen=True)
class Head:
    """One output layer, already cut to the shared vocabulary: ``z = scale · (h Wᵀ + b)``,
    then ``softcap · tanh(z / softcap)`` if a softcap is given."""

    weight: torch.Tensor  # (V, H)
    bias: torch.Tensor | None = None  # (V,)
    scale: float = 1.0
    softcap: float | None = None

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
        """Scale and soft-cap in float32 (or float64), differentiably: ``(n, V) -> (n, V)``."""
        logits = upcast(pre_logits)
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = self.softcap * torch.tanh(logits / self.softcap)
        return logits


@dataclass(frozen=True)
class HeadRows:
    """A chunk's logits as an output layer applied to its hidden states ``(n, H)``."""

    hidden: torch.Tensor  # (n, H)
    head: Head

    @property
    def may_be_infinite(self) -> bool:
        """Finite hidden states and weights give finite products; only a bias can hold -inf."""
        return self.head.bias is not None

    def logits(self, factor: Factor = 1.0, out: torch.Tensor | None = None) -> torch.Tensor:
        """``factor · (h Wᵀ + b)`` before any softcap, ``(n, V)``, into ``out``.

        The factor goes on the small ``(n, H)`` side and on the bias, not on the ``(n, V)``
        product: one pass fewer over the logits.
        """
        head = self.head
        if not isinstance(factor, torch.Tensor):
            hidden = self.hidden if factor == 1.0 else self.hidden * factor
            bias = head.bias if head.bias is None or factor == 1.0 else head.bias * factor
            return head.project(hidden, bias, out=out)
        logits = head.project(self.hidden * factor.to(self.hidden.dtype), None, out=out)
        return logits if head.bias is None else logits.addcmul_(head.bias, factor)

    def pre_logits(self) -> torch.Tensor:
        """``h Wᵀ + b`` in the input dtype, for the objectives that go through autograd."""
        return self.head.project(self.hidden, self.head.bias)

    def finish(self, pre_logits: torch.Tensor) -> torch.Tensor:
        return self.head.finish(pre_logits)


@dataclass(frozen=True)
class LogitRows:
    """A chunk of logits given by the caller, ``(n, V)``."""

    rows: torch.Tensor  # (n, V)

    may_be_infinite = True  # a caller's logits may mask entries with -inf

    def logits(self, factor: Factor = 1.0, out: torch.Tensor | None = None) -> torch.Tensor:
        """``factor · logits`` in the math dtype, into ``out`` (a fresh tensor without)."""
        if out is None:
            out = torch.empty_like(self.rows, dtype=compute_dtype(self.rows.dtype))
        if not isinstance(factor, torch.Tensor) and factor == 1.0:
            return out.copy_(self.rows)
        if self.rows.dtype == out.dtype:
            return torch.mul(self.rows, factor, out=out)
        # A bfloat16 product would round before the cast: convert first, then scale.
        return out.copy_(self.rows).mul_(factor)

    def pre_logits(self) -> torch.Tensor:
        return self.rows

    def finish(self, pre_logits: torch.Tensor) -> torch.Tensor:
        return upcast(pre_logits)


@dataclass(frozen=True)
class HeadTeacher:
    """Teacher hidden states ``(N, H_t)`` and output layer; gives :class:`HeadRows`."""

    hidden: torch.Tensor
    head: Head

    def rows(self, rows: slice) -> HeadRows:
        return HeadRows(self.hidden[rows], self.head)


@dataclass(frozen=True)
class LogitsTeacher:
    """Full teacher logits ``(N, V)``; gives :class:`LogitRows`."""

    logits: torch.Tensor

    def rows(self, rows: slice) -> LogitRows:
        return LogitRows(self.logits[rows])


@dataclass(frozen=True)
class SparseRows:
    """A chunk of a sparse teacher: ``ids (n, k)`` (padding replaced by an id of the same row),
    ``values (n, k)`` in the math dtype, and ``kept (n, k)``, False at padding slots."""

    ids: torch.Tensor
    values: torch.Tensor
    kept: torch.Tensor


@dataclass(frozen=True)
class SparseTeacher:
    """Sparse teacher targets for every row: see :class:`SparseRows`."""

    ids: torch.Tensor  # (N, k) int64
    values: torch.Tensor  # (N, k)
    kept: torch.Tensor  # (N, k) bool

    def rows(self, rows: slice) -> SparseRows:
        return SparseRows(self.ids[rows], self.values[rows], self.kept[rows])


class HeadStudent:
    """The student as hidden states ``(N, H)`` and an output layer: the gradient with respect to
    a chunk's logits becomes the hidden-state, weight and bias gradients at once.

    ``needs`` says which of (hidden, weight, bias) want a gradient. The weight and bias
    gradients are sums over chunks, accumulated in the math dtype; ``full_vocab`` pads them back
    to the weight's own row count when the head was cut to a shared vocabulary.
    """

    def __init__(
        self,
        hidden: torch.Tensor,
        head: Head,
        needs: tuple[bool, bool, bool] = (False, False, False),
        full_vocab: int | None = None,
    ) -> None:
        self.hidden, self.head, self.needs = hidden, head, needs
        self.num_rows, self.device = hidden.shape[0], hidden.device
        self.dtype = hidden.dtype
        self.math_dtype = compute_dtype(hidden.dtype)
        self.full_vocab = head.weight.shape[0] if full_vocab is None else full_vocab
        weight = head.weight
        need_hidden, need_weight, need_bias = needs
        self.grad_hidden = torch.empty_like(hidden) if need_hidden else None
        self.grad_weight = (
            weight.new_zeros(weight.shape, dtype=self.math_dtype) if need_weight else None
        )
        self.grad_bias = (
            weight.new_zeros(weight.shape[0], dtype=self.math_dtype) if need_bias else None
        )

    @property
    def need_logits_grad(self) -> bool:
        return any(self.needs)

    def rows(self, rows: slice) -> HeadRows:
        return HeadRows(self.hidden[rows], self.head)

    def add_logits_grad(
        self, rows: slice, grad: torch.Tensor, row_scale: torch.Tensor | None
    ) -> None:
        """``∂loss/∂z = grad · row_scale`` for these rows: the ``(n, 1)`` factor goes on the
        ``(n, H)`` side of the products."""
        chunk, weight = self.hidden[rows], self.head.weight
        if self.grad_bias is not None:
            self.grad_bias += grad.sum(0) if row_scale is None else grad.T @ row_scale.squeeze(-1)
        if row_scale is not None:
            row_scale = row_scale.to(self.dtype)
        grad = grad.to(self.dtype)
        if self.grad_hidden is not None:
            torch.mm(grad, weight, out=self.grad_hidden[rows])  # (n, V) @ (V, H)
            if row_scale is not None:
                self.grad_hidden[rows] *= row_scale
        if self.grad_weight is not None:
            scaled_chunk = chunk if row_scale is None else chunk * row_scale
            if self.dtype == self.math_dtype:
                self.grad_weight.addmm_(grad.T, scaled_chunk)  # (V, n) @ (n, H)
            else:
                self.grad_weight += grad.T @ scaled_chunk

    def gradients(self) -> list[torch.Tensor | None]:
        """``[hidden, weight, bias]`` gradients, in the inputs' dtypes and full row counts."""
        weight_dtype = self.head.weight.dtype
        grad_weight, grad_bias = self.grad_weight, self.grad_bias
        if grad_weight is not None:
            grad_weight = _pad_rows(grad_weight, self.full_vocab).to(weight_dtype)
        if grad_bias is not None:
            grad_bias = _pad_rows(grad_bias, self.full_vocab).to(weight_dtype)
        return [self.grad_hidden, grad_weight, grad_bias]


class LogitsStudent:
    """The student as logits ``(N, V)``: the gradient is written into a logits gradient."""

    def __init__(self, logits: torch.Tensor, need_grad: bool = False) -> None:
        self.logits = logits
        self.num_rows, self.device = logits.shape[0], logits.device
        self.math_dtype = compute_dtype(logits.dtype)
        self.grad = torch.empty_like(logits) if need_grad else None

    @property
    def need_logits_grad(self) -> bool:
        return self.grad is not None

    def rows(self, rows: slice) -> LogitRows:
        return LogitRows(self.logits[rows])

    def add_logits_grad(
        self, rows: slice, grad: torch.Tensor, row_scale: torch.Tensor | None
    ) -> None:
        if row_scale is None:
            self.grad[rows] = grad
        else:
            torch.mul(grad, row_scale, out=self.grad[rows])  # scaled and cast in one pass

    def gradients(self) -> list[torch.Tensor | None]:
        return [self.grad]


def _pad_rows(grad: torch.Tensor, rows: int) -> torch.Tensor:
    """Zero gradient for the padding rows cut off by ``vocab_size``."""
    if grad.shape[0] == rows:
        return grad
    full = grad.new_zeros((rows, *grad.shape[1:]))
    full[: grad.shape[0]] = grad
    return full
