"""``CachedCausalLMTask``: :class:`CausalLMTask` trained from a teacher cache, not a live teacher.

Each batch carries the cached sparse targets beside its tokens (``dk.cache.cached_loader``
attaches them, looked up by sample key): ``teacher_ids`` and ``teacher_values``
``(B, T, width)``, row ``t`` describing the teacher's distribution of token ``t + 1``, the
position the student's hidden state ``t`` predicts. The loss is the fused sparse one,

    L = (1 − alpha) · CE(z, y) + alpha · T² · D_sparse(teacher_ids, teacher_values; z)

with ``z = h Wᵀ`` never held whole (:func:`darkknowledge.fused_linear_sparse_kd_loss`): there
is no teacher model in memory and no ``(tokens, vocab)`` logits, only the student's hidden
states, its output layer and ``width`` numbers per position. The soft and hard terms count the
same positions as the live task's (the shifted labels that are not ``ignore_index``).

The teacher given to :class:`darkknowledge.Distiller` is a ``dk.cache.CachedTeacher``: a module
without weights holding the :class:`darkknowledge.cache.TeacherCache`, whose manifest the task
checks against the student (vocabulary, capture temperature).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import nn

from ..losses import KDLoss
from ..losses.fused import DEFAULT_CHUNK_SIZE
from ..losses.sparse import TAILS, fused_linear_sparse_kd_loss
from .task import CausalLMTask, StudentPass
from .vocab import is_padding

# The batch keys of the cached targets (written by dk.cache.cached_loader's collator).
TEACHER_IDS, TEACHER_VALUES = "teacher_ids", "teacher_values"
# DistillationLoss options the sparse loss understands (it is forward KL only: beta and lam,
# the parameters of other divergences, change nothing and are dropped).
_SPARSE_OPTIONS = ("soft_scale", "ignore_index", "divergence", "beta", "lam")


class SparseTargets(NamedTuple):
    """One micro-batch's cached targets and the cache they come from."""

    ids: torch.Tensor  # (B, T, width) token ids, -1 = padding
    values: torch.Tensor  # (B, T, width) T = 1 log-probabilities (topk) or counts (sampled)
    cache: Any  # the TeacherCache: representation, vocabulary, capture temperature


class CachedCausalLMTask(CausalLMTask):
    """Distil a causal LM from a teacher cache with the fused sparse loss.

    Args:
        tail: for top-k caches, ``"bucket"`` (the mass outside the kept ids is one more
            category on both sides) or ``"none"`` (dropped, both sides renormalised over the
            kept ids); sampled caches ignore it. See docs/losses.md.
        chunk_size, ignore_index, vocab_size: as :class:`CausalLMTask`. The cache must have
            been captured for the student's vocabulary: ``vocab_size`` when given, else the
            rows of its output layer, or fewer when those rows are the cache's vocabulary
            padded to a multiple of a power of two (the padding rows are cut).

    Without a teacher (``dk.Distiller(..., teacher=None)``) it trains on labels alone, exactly
    as :class:`CausalLMTask`; the targets in the batch are then unused.
    """

    def __init__(
        self,
        *,
        tail: str = "bucket",
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        ignore_index: int = -100,
        vocab_size: int | None = None,
    ) -> None:
        super().__init__(chunk_size=chunk_size, ignore_index=ignore_index, vocab_size=vocab_size)
        if tail not in TAILS:
            raise ValueError(f"tail must be one of {', '.join(map(repr, TAILS))}, got {tail!r}")
        self.tail = tail

    def teacher_outputs(self, teacher: nn.Module, batch: Any) -> SparseTargets:
        """The batch's cached targets (no model runs): ``teacher`` must be a cached teacher."""
        cache = getattr(teacher, "cache", None)
        if not callable(getattr(cache, "check_compatible", None)):
            raise TypeError(
                "CachedCausalLMTask trains from a teacher cache: the teacher must be "
                f"dk.cache.CachedTeacher(path), got {type(teacher).__name__}; for a live "
                "teacher use dk.llm.CausalLMTask"
            )
        if not isinstance(batch, Mapping) or TEACHER_IDS not in batch:
            found = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
            raise ValueError(
                f"a batch for CachedCausalLMTask needs '{TEACHER_IDS}' and '{TEACHER_VALUES}' "
                f"(build the loader with dk.cache.cached_loader), got {found}"
            )
        ids, values = batch[TEACHER_IDS], batch[TEACHER_VALUES]
        tokens = batch["input_ids"].shape
        if ids.dim() != 3 or ids.shape[:2] != tokens or values.shape != ids.shape:
            raise ValueError(
                f"{TEACHER_IDS} and {TEACHER_VALUES} must be (B, T, width) with input_ids' "
                f"(B, T) = {tuple(tokens)}, got {tuple(ids.shape)} and {tuple(values.shape)}"
            )
        return SparseTargets(ids, values, cache)

    def distillation_loss(
        self,
        student: StudentPass,
        teacher_outputs: SparseTargets,
        *,
        loss_fn: Any,
        step: int,
        normalizer: Any,
    ) -> tuple[KDLoss, float | torch.Tensor]:
        """The fused sparse KD loss of the student's hidden states and output layer against
        the batch's cached targets (:class:`CausalLMTask` runs the rest: labels only without a
        teacher; the gradient balance is not measured)."""
        _, hidden, layer, labels = student
        cache = teacher_outputs.cache
        vocab_size = self._cache_vocab(layer.weight.shape[0], cache)
        options = self._sparse_options(loss_fn, step)
        loss = fused_linear_sparse_kd_loss(
            hidden,
            layer.weight,
            teacher_outputs.ids.to(hidden.device),
            teacher_outputs.values.to(hidden.device),
            labels,
            representation=cache.representation,
            tail=self.tail if cache.representation == "topk" else "bucket",
            chunk_size=self.chunk_size,
            vocab_size=vocab_size,
            student_bias=layer.bias,
            normalizer=normalizer,
            student_logit_scale=layer.logit_scale,
            student_softcap=layer.softcap,
            # A verified cache's ids were checked at capture and its shards by SHA-256.
            check_ids=not cache.verify,
            **options,
        )
        return loss, options["temperature"]

    def _cache_vocab(self, student_rows: int, cache: Any) -> int | None:
        """The vocabulary the student's output layer is cut to (None: all of it), after
        :meth:`check_cache`: ``vocab_size`` when given; else the cache's vocabulary when the
        student's ``student_rows`` are it padded to a multiple of a power of two (as
        :class:`CausalLMTask` cuts a padded layer, :func:`~darkknowledge.llm.vocab.is_padding`).
        Any other difference is refused, naming both sizes."""
        vocab_size = self.vocab_size
        if vocab_size is None and is_padding(cache.vocab_size, student_rows):
            vocab_size = cache.vocab_size  # the padding rows are never a target: cut them
        self.check_cache(cache, vocab_size or student_rows)
        return vocab_size

    @staticmethod
    def check_cache(cache: Any, vocab_size: int) -> None:
        """Refuse a cache for another vocabulary, or captured at a temperature other than 1
        (the sparse losses take T = 1 targets and apply the training temperature themselves)."""
        cache.check_compatible(vocab_size=vocab_size)
        if cache.temperature != 1.0:
            raise ValueError(
                f"the teacher cache at {cache.path} was captured at temperature "
                f"{cache.temperature}; training needs T = 1 targets (the training temperature is "
                "applied by the loss): recapture it with temperature=1.0"
            )

    def _sparse_options(self, loss_fn: Any, step: int) -> dict[str, Any]:
        unsupported = sorted(set(loss_fn.kd_options) - set(_SPARSE_OPTIONS))
        divergence = loss_fn.kd_options.get("divergence", "forward_kl")
        if unsupported or divergence != "forward_kl":
            raise ValueError(
                "CachedCausalLMTask's sparse loss is forward KL with the options soft_scale and "
                f"ignore_index; got {unsupported or f'divergence={divergence!r}'}"
            )
        options = self._loss_options(loss_fn, step)
        for unused in ("divergence", "beta", "lam"):
            options.pop(unused, None)
        return options
