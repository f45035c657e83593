"""``MTPTask``: the :class:`darkknowledge.Distiller` task for a causal LM with MTP heads.

The student is an :class:`~darkknowledge.mtp.MTPStudent`; the teacher a plain causal LM. Each
micro-batch's loss is :func:`~darkknowledge.mtp.mtp_batch_loss`: the model's own next-token
loss (depth 0, weight ``main_weight``) plus every depth ``k``'s, row ``i`` matched to the
teacher's distribution at position ``i + k``:

    L = main_weight · L_0 + Σ_{k=1..D} w_k · L_k,
    L_k = (1/N) Σ_{valid i} (1 − alpha) CE(z^k_i, y_{i+k}) + alpha · T² · D(p_{i+k}, q^k_i)

with ``N`` the Distiller's global count of next-token targets (one normalizer for every depth,
as DeepSeek-V3 divides every depth by the sequence length; the deeper depths have a few rows
fewer per sequence and weigh slightly less). Batches, labels and the teacher's hidden states
are :class:`~darkknowledge.llm.CausalLMTask`'s; each depth's unweighted loss parts go to the
train record as ``depth{k}/total``, ``depth{k}/soft`` and ``depth{k}/hard``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..llm.heads import unwrap_model
from ..llm.task import CausalLMTask, TeacherOutputs, logged_temperature
from ..losses.fused import DEFAULT_CHUNK_SIZE
from ..train.task import TaskOutput
from . import _checks
from .loss import mtp_batch_loss
from .student import MTPStudent, as_mtp_student


class MTPTask(CausalLMTask):
    """Train an :class:`~darkknowledge.mtp.MTPStudent` (model and heads, or heads alone).

    Args:
        depth_weights: ``w_k >= 0`` for depths ``1..D`` (None: 1.0 each); checked against the
            student's number of depths at the first batch.
        main_weight: the weight of the model's own next-token loss (0 with a frozen model:
            :meth:`~darkknowledge.mtp.MTPStudent.freeze_model`).
        chunk_size, ignore_index, vocab_size: as :class:`~darkknowledge.llm.CausalLMTask`.

    Without a teacher (``dk train``, ``Distiller(teacher=None)``) every depth is trained on the
    labels alone: the baseline of heads trained on data. Evaluation (``eval_sums``) is the
    model's next-token loss and accuracy, as for ``CausalLMTask``.

    >>> import torch, transformers, darkknowledge as dk
    >>> transformers.logging.set_verbosity_error()
    >>> config = transformers.GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    >>> student = dk.mtp.MTPStudent.from_model(transformers.GPT2LMHeadModel(config), "parallel", 2)
    >>> teacher = transformers.GPT2LMHeadModel(config)
    >>> data = [{"input_ids": torch.randint(32, (4, 12))} for _ in range(3)]
    >>> task = dk.mtp.MTPTask(depth_weights=[0.5, 0.25])
    >>> result = dk.Distiller(student, teacher, data, task=task, temperature=1.0, max_steps=3,
    ...                       log_every=1, progress=False).fit()
    >>> sorted(name for name in result.history[-1] if name.startswith("depth"))[:3]
    ['depth0/hard', 'depth0/soft', 'depth0/total']
    """

    def __init__(
        self,
        *,
        depth_weights: Sequence[float] | None = None,
        main_weight: float = 1.0,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        ignore_index: int = -100,
        vocab_size: int | None = None,
    ) -> None:
        super().__init__(chunk_size=chunk_size, ignore_index=ignore_index, vocab_size=vocab_size)
        if depth_weights is not None:
            depth_weights = _checks.check_weights(depth_weights, len(list(depth_weights)))
            if not depth_weights:
                raise ValueError("depth_weights must hold one weight per depth, got []")
        if (
            isinstance(main_weight, bool)
            or not isinstance(main_weight, int | float)
            or not math.isfinite(main_weight)
            or main_weight < 0
        ):
            raise ValueError(f"main_weight must be a finite float >= 0, got {main_weight!r}")
        self.depth_weights = None if depth_weights is None else tuple(depth_weights)
        self.main_weight = float(main_weight)

    def compute_loss(
        self,
        student: nn.Module,
        batch: Any,
        teacher_outputs: TeacherOutputs | None,
        *,
        loss_fn: Any = None,
        step: int = 0,
        normalizer: torch.Tensor | float | None = None,
        grad_meter: bool = False,
    ) -> TaskOutput:
        """:func:`~darkknowledge.mtp.mtp_batch_loss` on the batch; ``loss_fn=None``: labels only.

        The gradient balance (``grad_meter``) is not measured, as for ``CausalLMTask``.
        """
        inner = as_mtp_student(student)
        if self.depth_weights is not None and len(self.depth_weights) != inner.num_depths:
            raise ValueError(
                f"depth_weights has {len(self.depth_weights)} weights but the student has "
                f"{inner.num_depths} MTP depths; give one weight per depth"
            )
        inputs = self.inputs(batch)
        options: dict[str, Any] = {
            "chunk_size": self.chunk_size,
            "vocab_size": self.vocab_size,
            "ignore_index": self.ignore_index,
            "normalizer": normalizer,
        }
        temperature = None
        distil = loss_fn is not None and teacher_outputs is not None
        if distil:
            options.update(self._loss_options(loss_fn, step))
            temperature = options["temperature"]
        loss = mtp_batch_loss(
            student,
            inputs["input_ids"],
            inputs["labels"],
            attention_mask=inputs["attention_mask"],
            teacher_hidden=teacher_outputs.hidden if distil else None,
            teacher_layer=teacher_outputs.layer if distil else None,
            main_weight=self.main_weight,
            depth_weights=self.depth_weights,
            **options,
        )
        return TaskOutput(
            loss.as_kd_loss(), None, None, logged_temperature(temperature), loss.log_values()
        )

    @torch.no_grad()
    def eval_sums(self, student: nn.Module, batch: Any) -> dict[str, float]:
        """The model's next-token sums (``loss``, ``correct``, ``count``), heads aside; a plain
        causal LM (a teacher) is evaluated as it is."""
        inner = unwrap_model(student)
        return super().eval_sums(inner.model if isinstance(inner, MTPStudent) else student, batch)
