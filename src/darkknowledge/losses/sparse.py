"""Distillation from sparse teacher targets: what a teacher cache stores per position.

    L_total = (1 − alpha) · CE(z_s, y) + alpha · T² · D_sparse

``teacher_ids (..., k)`` and ``teacher_values (..., k)`` per position, in one of two
representations (the objective and its exactness: ``engine/sparse.py`` and docs/losses.md):

- ``"topk"``: the teacher's T = 1 log-probabilities of ``k`` ids. With ``tail="bucket"`` the
  mass left out is one more category on both sides; with ``"none"`` both sides are renormalised
  over the kept ids. At T ≠ 1 the stored log-probabilities are re-tempered. Exactly
  ``kd_loss`` when every token is kept.
- ``"sampled"``: counts of ids drawn with replacement from the teacher's T = 1 distribution;
  the gradient is an unbiased estimate of forward KL's at T = 1 (only T = 1).

Padding: id ``-1`` (its value is ignored), so rows may keep different numbers of ids.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import _checks
from . import _fused_common as common
from .engine.call import SoftScale, resolve_soft_scale
from .engine.chunker import run_chunks, run_fused_linear, sweep
from .engine.forward_kl import Buffers
from .engine.per_position import rows_per_chunk
from .engine.sides import LogitsStudent, SparseTeacher
from .engine.sparse import SparseKD
from .fused import DEFAULT_CHUNK_SIZE
from .kd import KDLoss
from .reduction import Normalizer, valid_positions

REPRESENTATIONS = ("topk", "sampled")
TAILS = ("bucket", "none")
ID_DTYPES = (torch.int16, torch.int32, torch.int64)
VALUE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def sparse_kd_loss(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_values: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    representation: str = "topk",
    temperature: float | torch.Tensor = 1.0,
    alpha: float,
    tail: str = "bucket",
    ignore_index: int = -100,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    normalizer: Normalizer = None,
    soft_scale: SoftScale = "T2",
    check_ids: bool = True,
) -> KDLoss:
    """The distillation loss on sparse teacher targets, from the student's logits.

    Args:
        student_logits: ``(..., V)`` any float dtype (math in float32; float64 stays float64).
        teacher_ids: ``(..., k)`` int16, int32 or int64 token ids in ``[0, V)``, unique per
            position; ``-1`` pads a position that keeps fewer than ``k``.
        teacher_values: ``(..., k)`` float16, bfloat16 or float32 (float64 too): the teacher's
            T = 1 log-probabilities of the ids (``"topk"``) or their sample counts
            (``"sampled"``).
        labels: ``(...)`` integer targets for the hard term, or None (then alpha must be 1).
        representation: ``"topk"`` or ``"sampled"``.
        temperature: T > 0, a float or a tensor without gradient (per position or sample, as in
            :func:`darkknowledge.kd_loss`); ``"sampled"`` needs T = 1.
        alpha, soft_scale, ignore_index, mask, normalizer: as in :func:`darkknowledge.kd_loss`.
        tail: ``"bucket"`` (the mass left out is one more category) or ``"none"`` (dropped,
            both sides renormalised over the kept ids); ``"topk"`` only.
        reduction: ``"mean"`` or ``"sum"``.
        check_ids: check that the ids are in ``[0, V)`` or ``-1`` and unique per position
            (on CPU tensors only: a sort of the ``(N, k)`` ids per call, which costs more than
            the loss at large ``k``). False skips it, for ids known to be good: a teacher cache
            read with ``verify=True`` (its ids were checked when it was written, its shards are
            checked by SHA-256). Bad ids are then not caught: an id ``>= V`` fails inside the
            loss or reads a wrong logit, a repeated id counts twice.

    Returns:
        ``KDLoss(total, soft, hard)``, each ``()``; only ``total`` carries a gradient (computed
        with the loss, chunk by chunk, by the chunk engine).

    >>> import torch, darkknowledge as dk
    >>> student, teacher = torch.randn(4, 10, requires_grad=True), torch.randn(4, 10)
    >>> log_p = teacher.log_softmax(-1)
    >>> values, ids = log_p.topk(10, dim=-1)  # every token kept: exactly kd_loss
    >>> sparse = dk.sparse_kd_loss(student, ids, values, temperature=2.0, alpha=1.0)
    >>> full = dk.kd_loss(student, teacher, temperature=2.0, alpha=1.0)
    >>> bool(torch.allclose(sparse.total, full.total))
    True
    >>> sparse.total.backward()
    """
    _checks.check_logits(student_logits, "student_logits")
    leading_shape, vocab = student_logits.shape[:-1], student_logits.shape[-1]
    logits = student_logits.reshape(-1, vocab)  # (N, V)
    num_rows, dtype = logits.shape[0], common.math_dtype(logits)
    options = SparseOptions(
        representation, temperature, alpha, tail, ignore_index, reduction, check_ids
    )
    prepared = options.prepare(
        teacher_ids, teacher_values, labels, mask, normalizer, soft_scale, leading_shape, vocab,
        dtype,
    )  # fmt: skip
    chunk_size = rows_per_chunk(vocab)
    buffers = Buffers(min(chunk_size, max(num_rows, 1)), vocab, dtype, logits.device)
    objective = prepared.objective(buffers, student_scale=1.0, softcap=None)

    def run(needs):
        student = LogitsStudent(logits, need_grad=needs[0])
        out = run_chunks(
            objective, student, prepared.teacher, labels=prepared.labels, valid=prepared.valid,
            normalizer=prepared.normalizer, chunk_size=chunk_size,
        )  # fmt: skip
        total, soft, hard = out.parts.unbind()
        return total, soft, hard, student.gradients()

    return KDLoss(*sweep(run, [logits]))


def fused_linear_sparse_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_values: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    alpha: float,
    representation: str = "topk",
    temperature: float | torch.Tensor = 1.0,
    tail: str = "bucket",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    student_bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    mask: torch.Tensor | None = None,
    normalizer: Normalizer = None,
    reduction: str = "mean",
    soft_scale: SoftScale = "T2",
    student_logit_scale: float = 1.0,
    student_softcap: float | None = None,
    vocab_size: int | None = None,
    check_ids: bool = True,
) -> KDLoss:
    """:func:`sparse_kd_loss` on ``z = scale · (h Wᵀ + b)`` (then the optional softcap), chunk
    by chunk, never holding the ``(N, V)`` logits: the training loss from a teacher cache.

    Args:
        student_hidden: ``(..., H)`` the student's final hidden states.
        student_weight: ``(V_s, H)`` its output layer; ``vocab_size`` cuts it to its first
            rows (padding rows get a zero gradient).
        teacher_ids, teacher_values, labels, representation, temperature, alpha, tail,
            ignore_index, mask, reduction, normalizer, soft_scale, check_ids: as in
            :func:`sparse_kd_loss`.
        student_bias, chunk_size, student_logit_scale, student_softcap: as in
            :func:`darkknowledge.fused_linear_kd_loss`.

    Returns:
        ``KDLoss(total, soft, hard)``; only ``total`` carries a gradient (to the hidden states,
        the weight and the bias).

    >>> import torch, darkknowledge as dk
    >>> hidden, weight = torch.randn(6, 8, requires_grad=True), torch.randn(50, 8)
    >>> values, ids = torch.randn(6, 50).log_softmax(-1).topk(8, dim=-1)  # a top-8 cache
    >>> labels = torch.tensor([1, 2, 3, -100, 4, 5])
    >>> loss = dk.fused_linear_sparse_kd_loss(hidden, weight, ids, values, labels, alpha=0.5, chunk_size=4)
    >>> loss.total.backward()
    """
    student = common.student_inputs(
        student_hidden, student_weight, student_bias, chunk_size=chunk_size,
        vocab_size=vocab_size, logit_scale=student_logit_scale, softcap=student_softcap,
    )  # fmt: skip
    hidden, head = student.hidden, student.head
    num_rows, dtype = hidden.shape[0], common.math_dtype(hidden)
    options = SparseOptions(
        representation, temperature, alpha, tail, ignore_index, reduction, check_ids
    )
    prepared = options.prepare(
        teacher_ids, teacher_values, labels, mask, normalizer, soft_scale,
        student.leading_shape, head.weight.shape[0], dtype,
    )  # fmt: skip
    buffers = Buffers(min(chunk_size, max(num_rows, 1)), head.weight.shape[0], dtype, hidden.device)
    objective = prepared.objective(buffers, student_scale=head.scale, softcap=head.softcap)
    total, soft, hard = run_fused_linear(
        lambda *_: objective, hidden, student.weight, student.bias, head, prepared.teacher,
        labels=prepared.labels, valid=prepared.valid, normalizer=prepared.normalizer,
        chunk_size=chunk_size,
    )  # fmt: skip
    return KDLoss(total, soft, hard)


@dataclass(frozen=True)
class SparseOptions:
    """The options of one sparse-teacher call, checked on construction."""

    representation: str
    temperature: float | torch.Tensor
    alpha: float
    tail: str
    ignore_index: int
    reduction: str
    check_ids: bool = True

    def __post_init__(self) -> None:
        if self.representation not in REPRESENTATIONS:
            raise ValueError(
                f"representation must be one of {', '.join(map(repr, REPRESENTATIONS))}, "
                f"got {self.representation!r}"
            )
        if self.tail not in TAILS:
            raise ValueError(
                f"tail must be one of {', '.join(map(repr, TAILS))}, got {self.tail!r}"
            )
        if self.representation == "sampled" and self.tail != "bucket":
            raise ValueError(
                f"tail={self.tail!r} applies to representation='topk'; sampled counts estimate "
                "the whole distribution and have no tail (leave tail at its default)"
            )
        _checks.check_unit_interval(self.alpha, "alpha")
        common.check_reduction(self.reduction)
        if not isinstance(self.check_ids, bool):
            raise TypeError(f"check_ids must be a bool, got {self.check_ids!r}")

    def prepare(
        self, teacher_ids, teacher_values, labels, mask, normalizer, soft_scale, leading_shape,
        vocab: int, dtype: torch.dtype,
    ) -> _Prepared:  # fmt: skip
        """The checked teacher side, labels, mask and constants of the call."""
        resolve_soft_scale(soft_scale, 1.0)  # validates it before any work is done
        temperature = _checks.temperature_for(self.temperature, leading_shape)
        if isinstance(temperature, torch.Tensor) and temperature.requires_grad:
            raise ValueError(
                "temperature must not require grad in the sparse losses (no gradient for T is "
                "computed); pass temperature.detach(), or use dk.kd_loss for a learned temperature"
            )
        if self.representation == "sampled" and (
            isinstance(temperature, torch.Tensor) or temperature != 1.0
        ):
            raise ValueError(
                f"representation='sampled' needs temperature=1.0, got {temperature!r}: the "
                "counts are draws from the teacher's T = 1 distribution, and re-tempering them "
                "has no unbiased estimate (it needs the probabilities the counts do not carry); "
                "use representation='topk' to distill at another temperature"
            )
        num_rows = leading_shape.numel()
        _checks.check_labels_for_alpha(labels, self.alpha)
        if labels is not None:
            _checks.check_labels(labels, leading_shape, vocab, self.ignore_index)
            labels = labels.reshape(num_rows)
        if mask is not None:
            _checks.check_mask(mask, leading_shape)
            mask = mask.reshape(num_rows)
        valid = valid_positions(labels, mask, self.ignore_index)
        scale = resolve_soft_scale(soft_scale, temperature)
        if isinstance(temperature, torch.Tensor):  # one value per row, (N, 1)
            temperature = temperature.to(dtype).expand(leading_shape).reshape(num_rows, 1)
            scale = temperature.square() if soft_scale == "T2" else scale
        teacher = _sparse_teacher(
            teacher_ids, teacher_values, leading_shape, vocab, dtype, self.representation,
            check_ids=self.check_ids,
        )  # fmt: skip
        normalizer = common.normalizer_for(self.reduction, normalizer, valid, num_rows, dtype)
        return _Prepared(self, teacher, labels, valid, temperature, self.alpha * scale, normalizer)


@dataclass(frozen=True)
class _Prepared:
    options: SparseOptions
    teacher: SparseTeacher
    labels: torch.Tensor | None  # (N,)
    valid: torch.Tensor | None  # (N,)
    temperature: float | torch.Tensor  # a float, or (N, 1)
    soft_weight: float | torch.Tensor  # alpha · soft_scale, a float or (N, 1)
    normalizer: float | torch.Tensor

    def objective(self, buffers: Buffers, *, student_scale: float, softcap) -> SparseKD:
        return SparseKD(
            representation=self.options.representation, tail=self.options.tail,
            temperature=self.temperature, alpha=self.options.alpha, soft_weight=self.soft_weight,
            buffers=buffers, student_scale=student_scale, softcap=softcap,
        )  # fmt: skip


def _sparse_teacher(
    ids: torch.Tensor,
    values: torch.Tensor,
    leading_shape: torch.Size,
    vocab: int,
    dtype: torch.dtype,
    representation: str,
    *,
    check_ids: bool = True,
) -> SparseTeacher:
    """Checked ``(N, k)`` ids (padding pointed at a kept id of its row), values in the math
    dtype, and the kept mask. Value checks on CPU only (no host sync elsewhere); the ids' range
    and uniqueness only with ``check_ids``."""
    for name, tensor, dtypes in (
        ("teacher_ids", ids, ID_DTYPES),
        ("teacher_values", values, VALUE_DTYPES),
    ):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dtype not in dtypes:
            allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
            raise TypeError(f"{name} must have dtype {allowed}; got {tensor.dtype}")
        if tensor.dim() != len(leading_shape) + 1 or tensor.shape[:-1] != leading_shape:
            raise ValueError(
                f"{name} must have shape (..., k) with the logits' leading shape "
                f"{tuple(leading_shape)}, got {tuple(tensor.shape)}"
            )
    if ids.shape != values.shape:
        raise ValueError(
            f"teacher_ids and teacher_values must have the same shape, got "
            f"{tuple(ids.shape)} and {tuple(values.shape)}"
        )
    ids = ids.reshape(-1, ids.shape[-1]).long()  # (N, k)
    values = values.reshape(ids.shape).to(dtype)
    kept = ids >= 0
    if ids.device.type == "cpu":
        if check_ids:
            _check_ids(ids, vocab)
        _check_values(values, kept, representation)
    # Padding points at the row's first kept id (any id of the row would do, and its value is
    # ignored); a row without kept ids points at 0.
    first = ids.gather(-1, kept.to(torch.uint8).argmax(-1, keepdim=True)).clamp_min(0)
    return SparseTeacher(torch.where(kept, ids, first), values, kept)


def _check_ids(ids: torch.Tensor, vocab: int) -> None:
    """``(N, k)`` ids in ``[0, vocab)`` or -1, unique per row but for the padding."""
    bad = (ids < -1) | (ids >= vocab)
    if bool(bad.any()):
        raise ValueError(
            f"teacher_ids must be token ids in [0, {vocab}) or -1 (padding), got {int(ids[bad][0])}"
        )
    ordered = ids.sort(-1).values
    repeated = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)
    if bool(repeated.any()):
        row = int(repeated.any(-1).nonzero()[0])
        raise ValueError(
            f"teacher_ids must be unique per position (padding -1 excepted); position {row} "
            f"repeats id {int(ordered[row, 1:][repeated[row]][0])}"
        )


def _check_values(values: torch.Tensor, kept: torch.Tensor, representation: str) -> None:
    """The kept values are log-probabilities (topk) or sample counts (sampled)."""
    real = values[kept]
    if representation == "topk":
        wrong = torch.isnan(real) | (real > 1e-3)
        what = "log-probabilities (<= 0; pass log_softmax(teacher_logits), not logits)"
    else:
        wrong = ~torch.isfinite(real) | (real < 0)
        what = "sample counts (finite, >= 0)"
    if bool(wrong.any()):
        raise ValueError(
            f"teacher_values must be {what} for representation={representation!r}, "
            f"got {float(real[wrong][0])!r}"
        )
