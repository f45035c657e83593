"""``CausalLMTask``: the :class:`darkknowledge.Distiller` task for Hugging Face causal LMs.

The loss is the fused one (:func:`darkknowledge.losses.fused.fused_linear_kd_loss`), computed
from the last hidden states and the output layer of student and teacher, so the
``(tokens, vocab)`` logits never exist at once. A batch is a ``dict`` with ``input_ids``
``(B, T)`` and optionally ``attention_mask``, Hugging Face-style unshifted ``labels``
(``ignore_index`` where nothing is predicted), ``prompt_lengths`` ``(B,)`` or
``completion_mask`` ``(B, T)``; a bare ``input_ids`` tensor works too. Labels are shifted in
one place, :func:`darkknowledge.llm.labels.shift_labels`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..losses import KDLoss, count_valid, fused_linear_cross_entropy
from ..losses._checks import check_count
from ..losses.fused import DEFAULT_CHUNK_SIZE, fused_linear_kd_loss
from ..train.task import TaskOutput
from .heads import OutputLayer, last_hidden_states, logits_from_hidden, output_layer
from .labels import shift_labels
from .vocab import shared_vocab_size

# Options of DistillationLoss that the fused loss understands; anything else is refused.
_FUSED_OPTIONS = ("divergence", "beta", "lam", "soft_scale", "ignore_index")


class TeacherOutputs(NamedTuple):
    hidden: torch.Tensor  # (B, T, H_teacher)
    layer: OutputLayer


class StudentPass(NamedTuple):
    """The student's forward pass on a batch, up to its last hidden states."""

    batch: Any
    hidden: torch.Tensor  # (B, T, H)
    layer: OutputLayer
    labels: torch.Tensor  # (B, T), shifted, on the hidden states' device


class CausalLMTask:
    """Distil a causal LM into another one token by token, with the fused chunked loss.

    Args:
        chunk_size: positions per chunk of the fused loss (memory ~ chunk_size × vocab).
        ignore_index: label value of positions that do not count.
        vocab_size: the shared vocabulary when the two output layers differ only by padding
            rows (both are cut to it); None: inferred from the two output layers, which must
            have one size or one padded to a multiple of a power of two (a real tokenizer
            mismatch is refused), see :func:`darkknowledge.llm.vocab.shared_vocab_size`.
    """

    # A task that only distils (on-policy) refuses a step without a teacher.
    needs_teacher = False

    def __init__(
        self,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        ignore_index: int = -100,
        vocab_size: int | None = None,
    ) -> None:
        self.chunk_size = check_count(chunk_size, "chunk_size", "a positive int")
        self.ignore_index = ignore_index
        self.vocab_size = vocab_size

    # -- batches ---------------------------------------------------------------------------
    def inputs(self, batch: Any) -> dict[str, torch.Tensor | None]:
        """``input_ids``, ``attention_mask`` and the shifted ``labels`` ``(B, T)`` of a batch."""
        if isinstance(batch, torch.Tensor):
            batch = {"input_ids": batch}
        if not isinstance(batch, Mapping) or "input_ids" not in batch:
            raise TypeError(
                f"a causal-LM batch must be a dict with 'input_ids' (or a tensor of them), got {type(batch).__name__}"
                + (f" with keys {sorted(batch)}" if isinstance(batch, Mapping) else "")
            )
        input_ids, attention_mask = batch["input_ids"], batch.get("attention_mask")
        labels = shift_labels(
            batch.get("labels", input_ids),
            attention_mask,
            prompt_lengths=batch.get("prompt_lengths"),
            completion_mask=batch.get("completion_mask"),
            ignore_index=self.ignore_index,
        )
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    def count_valid(self, batch: Any) -> torch.Tensor:
        """Number of predicted tokens in the micro-batch (the Distiller sums these)."""
        return count_valid(self.inputs(batch)["labels"], ignore_index=self.ignore_index)

    def student_pass(self, student: nn.Module, batch: Any) -> StudentPass:
        """The student's forward pass on ``batch`` up to its last hidden states."""
        inputs = self.inputs(batch)
        hidden = last_hidden_states(student, *_on_device(student, inputs))
        return StudentPass(batch, hidden, output_layer(student), inputs["labels"].to(hidden.device))

    # -- training --------------------------------------------------------------------------
    def teacher_outputs(self, teacher: nn.Module, batch: Any) -> TeacherOutputs:
        """Teacher hidden states and output layer (the Distiller runs this without gradients)."""
        inputs = self.inputs(batch)
        hidden = last_hidden_states(teacher, *_on_device(teacher, inputs))
        return TeacherOutputs(hidden, output_layer(teacher))

    def compute_loss(
        self,
        student: nn.Module,
        batch: Any,
        teacher_outputs: Any,
        *,
        loss_fn: Any = None,
        step: int = 0,
        normalizer: torch.Tensor | float | None = None,
        grad_meter: bool = False,
    ) -> TaskOutput:
        """The fused KD loss on the student's hidden states; ``loss_fn=None`` trains on labels only.

        The distillation term is :meth:`distillation_loss`, the one method that the cached and
        on-policy tasks override. The gradient balance (``grad_meter``) is not measured
        (``None``): it would need the logits that the fused loss exists to avoid.
        """
        forward = self.student_pass(student, batch)
        if loss_fn is None or teacher_outputs is None:
            if self.needs_teacher:
                raise ValueError(
                    f"{type(self).__name__} distils: it needs a teacher (Distiller(teacher=...))"
                )
            return TaskOutput(
                self._hard_only(forward.hidden, forward.layer, forward.labels, normalizer)
            )
        loss, temperature = self.distillation_loss(
            forward, teacher_outputs, loss_fn=loss_fn, step=step, normalizer=normalizer
        )
        return TaskOutput(loss, None, None, logged_temperature(temperature))

    def distillation_loss(
        self,
        student: StudentPass,
        teacher_outputs: Any,
        *,
        loss_fn: Any,
        step: int,
        normalizer: Any,
    ) -> tuple[KDLoss, float | torch.Tensor]:
        """The loss of a step with a teacher and the temperature it used: here the fused
        ``(1 − alpha)·CE + alpha·soft_scale·D`` of the student's hidden states and output layer
        against the teacher's, on the shifted labels."""
        options = self._loss_options(loss_fn, step)
        hidden, layer, labels = student.hidden, student.layer, student.labels
        loss = self.fused_kd(hidden, layer, teacher_outputs, labels, normalizer, options)
        return loss, options["temperature"]

    def fused_kd(
        self,
        hidden: torch.Tensor,
        layer: OutputLayer,
        teacher_outputs: TeacherOutputs,
        labels: torch.Tensor,
        normalizer: Any,
        options: dict[str, Any],
    ) -> KDLoss:
        """:func:`fused_linear_kd_loss` of the student's hidden states ``(B, T, H)`` and output
        layer against the teacher's, with ``options`` (temperature, alpha, divergence, ...)."""
        return fused_linear_kd_loss(
            hidden,
            layer.weight,
            teacher_outputs.hidden.to(hidden.device),
            teacher_outputs.layer.weight.to(hidden.device),
            labels,
            chunk_size=self.chunk_size,
            vocab_size=self.shared_vocab(layer, teacher_outputs.layer),
            student_bias=layer.bias,
            teacher_bias=_to(teacher_outputs.layer.bias, hidden.device),
            normalizer=normalizer,
            student_logit_scale=layer.logit_scale,
            teacher_logit_scale=teacher_outputs.layer.logit_scale,
            student_softcap=layer.softcap,
            teacher_softcap=teacher_outputs.layer.softcap,
            **options,
        )

    def shared_vocab(self, student_layer: OutputLayer, teacher_layer: OutputLayer) -> int | None:
        """``vocab_size``, or the padding-only difference of the two layers cut (no host sync:
        shapes only)."""
        return shared_vocab_size(
            student_layer.weight.shape[0], teacher_layer.weight.shape[0], vocab_size=self.vocab_size
        )

    def _loss_options(self, loss_fn: Any, step: int) -> dict[str, Any]:
        unsupported = sorted(set(loss_fn.kd_options) - set(_FUSED_OPTIONS))
        if unsupported:
            raise ValueError(
                f"CausalLMTask's fused loss does not support the loss options {unsupported}; "
                f"supported: {', '.join(_FUSED_OPTIONS)}"
            )
        temperature = loss_fn.current_temperature(step)
        if isinstance(temperature, torch.Tensor) and temperature.dim() > 0:
            raise ValueError(
                f"CausalLMTask needs one global temperature, got a tensor of shape {tuple(temperature.shape)} "
                "(a per-sample LearnableTemperature needs logits, which the fused loss never builds)"
            )
        options = {"ignore_index": self.ignore_index, **loss_fn.kd_options}
        return {**options, "temperature": temperature, "alpha": loss_fn.current_alpha(step)}

    def _hard_only(
        self, hidden: torch.Tensor, layer: OutputLayer, labels: torch.Tensor, normalizer: Any
    ) -> KDLoss:
        """Cross-entropy alone (the baseline): no soft term, no teacher projection."""
        return fused_linear_cross_entropy(
            hidden,
            layer.weight,
            labels,
            student_bias=layer.bias,
            ignore_index=self.ignore_index,
            normalizer=normalizer,
            chunk_size=self.chunk_size,
            student_logit_scale=layer.logit_scale,
            student_softcap=layer.softcap,
        )

    # -- evaluation ------------------------------------------------------------------------
    @torch.no_grad()
    def eval_sums(self, student: nn.Module, batch: Any) -> dict[str, float]:
        """Sums over the batch's predicted tokens: ``loss`` (cross-entropy, nats), ``correct``
        (argmax hits) and ``count``. Mean loss / count gives perplexity = exp(mean loss)."""
        _, hidden, layer, labels = self.student_pass(student, batch)
        flat_hidden, flat_labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
        keep = flat_labels != self.ignore_index
        flat_hidden, flat_labels = flat_hidden[keep], flat_labels[keep]
        loss_sum, correct = 0.0, 0
        for start in range(0, flat_labels.numel(), self.chunk_size):
            # Chunks of positions: at most chunk_size × vocab logits at a time.
            chunk_labels = flat_labels[start : start + self.chunk_size]
            logits = logits_from_hidden(flat_hidden[start : start + self.chunk_size], layer)
            loss_sum += float(F.cross_entropy(logits.float(), chunk_labels, reduction="sum"))
            correct += int((logits.argmax(-1) == chunk_labels).sum())
        return {"loss": loss_sum, "correct": float(correct), "count": float(flat_labels.numel())}


def logged_temperature(temperature: float | torch.Tensor | None) -> float | None:
    """The temperature as the train record's float (a learnable one's current value)."""
    if isinstance(temperature, torch.Tensor):
        return float(temperature.detach())
    return temperature


def _on_device(
    model: nn.Module, inputs: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``input_ids`` and ``attention_mask`` on the device of the model's first parameter."""
    param = next(model.parameters(), None)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    if param is None:
        return ids, mask
    return ids.to(param.device), None if mask is None else mask.to(param.device)


def _to(tensor: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if tensor is None else tensor.to(device)
