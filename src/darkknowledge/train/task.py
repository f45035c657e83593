"""A Task adapts batches and models to the Distiller; the Distiller itself knows neither.

The protocol (also implemented by ``darkknowledge.llm.task.CausalLMTask``):

- ``count_valid(batch) -> Tensor``: positions that count in this micro-batch (samples, tokens).
- ``teacher_outputs(teacher, batch)``: run under ``torch.inference_mode()`` by the Distiller;
  returns whatever ``compute_loss`` needs (the Distiller clones inference tensors out of
  inference mode before they reach autograd).
- ``compute_loss(student, batch, teacher_outputs, *, loss_fn, step, normalizer, signal)
  -> TaskOutput``: ``loss_fn=None`` means labels only (no teacher); ``normalizer`` is the
  global count of valid positions of the optimizer step divided by the number of processes;
  ``signal=True`` asks for the signal meter (see :mod:`darkknowledge.train.signals`).
- ``eval_sums(student, batch) -> dict[str, float]``: sums (``loss``, ``correct``, ``count``)
  that the Distiller adds up over batches and processes and turns into means.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch

from ..losses import DistillationLoss, KDLoss, count_valid, kd_loss, valid_positions
from .signals import signal_grad_norms


class TaskOutput(NamedTuple):
    """One micro-batch's loss parts, and on signal steps the signal meter's readings.

    ``temperature`` (optional) is the temperature in force, its mean if per sample; tasks that
    leave it None get the Distiller's own reading of a float or scheduled temperature. The
    numbers may be 0-dim tensors: the Distiller reads them without stalling the GPU.
    """

    loss: KDLoss
    soft_grad_norm: float | torch.Tensor | None = None
    hard_grad_norm: float | torch.Tensor | None = None
    temperature: float | torch.Tensor | None = None


@runtime_checkable
class Task(Protocol):
    def count_valid(self, batch: Any) -> torch.Tensor: ...

    def teacher_outputs(self, teacher: torch.nn.Module, batch: Any) -> Any: ...

    def compute_loss(
        self,
        student: torch.nn.Module,
        batch: Any,
        teacher_outputs: Any,
        *,
        loss_fn: DistillationLoss | None,
        step: int,
        normalizer: torch.Tensor | float,
        signal: bool,
    ) -> TaskOutput: ...

    def eval_sums(self, student: torch.nn.Module, batch: Any) -> dict[str, float]: ...


class ClassificationTask:
    """Batches are ``(inputs, labels)``; logits are ``model(inputs)`` (or its ``.logits``).

    ``inputs`` has any shape the model accepts, ``labels`` is ``(B,)`` (or ``(...)`` matching
    the logits' leading dimensions) with ``ignore_index`` for positions that do not count.

    >>> import torch
    >>> task = ClassificationTask()
    >>> batch = (torch.randn(4, 3), torch.tensor([0, 1, -100, 2]))
    >>> int(task.count_valid(batch))
    3
    """

    def __init__(self, *, ignore_index: int = -100) -> None:
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
        self.ignore_index = ignore_index

    def _split(self, batch: Any) -> tuple[Any, torch.Tensor]:
        if not isinstance(batch, tuple | list) or len(batch) != 2:
            raise TypeError(
                f"ClassificationTask expects batches (inputs, labels), got {type(batch).__name__}"
                + (f" of length {len(batch)}" if isinstance(batch, tuple | list) else "")
            )
        return batch[0], batch[1]

    def count_valid(self, batch: Any) -> torch.Tensor:
        return count_valid(self._split(batch)[1], ignore_index=self.ignore_index)

    def teacher_outputs(self, teacher: torch.nn.Module, batch: Any) -> torch.Tensor:
        inputs, _ = self._split(batch)
        # The teacher may live on another device or in another dtype than the student.
        param = next(teacher.parameters(), None)
        if param is not None and isinstance(inputs, torch.Tensor):
            dtype = param.dtype if inputs.is_floating_point() else inputs.dtype
            inputs = inputs.to(device=param.device, dtype=dtype)
        return _logits(teacher(inputs))  # (B, C)

    def compute_loss(
        self,
        student: torch.nn.Module,
        batch: Any,
        teacher_outputs: Any,
        *,
        loss_fn: DistillationLoss | None,
        step: int,
        normalizer: torch.Tensor | float,
        signal: bool,
    ) -> TaskOutput:
        inputs, labels = self._split(batch)
        logits = _logits(student(inputs))  # (B, C)
        if loss_fn is None:
            # Labels only (the baseline): kd_loss's own hard term with alpha = 0. The student's
            # detached logits stand in for the teacher; that soft term is 0 and weighted 0.
            alpha, temperature = 0.0, None
            loss = kd_loss(
                logits, logits.detach(), labels, temperature=1.0, alpha=0.0,
                ignore_index=self.ignore_index, normalizer=normalizer,
            )  # fmt: skip
        else:
            teacher_logits = teacher_outputs.to(logits.device)  # (B, C)
            alpha = loss_fn.current_alpha(step)
            temperature = loss_fn.current_temperature(step, logits, teacher_logits)
            loss = self.distillation_loss(
                logits, teacher_logits, labels, temperature=temperature, alpha=alpha,
                kd_options=loss_fn.kd_options, normalizer=normalizer,
            )  # fmt: skip
        if not signal:
            return TaskOutput(loss)
        soft_norm, hard_norm = signal_grad_norms(loss, alpha, logits)
        if isinstance(temperature, torch.Tensor):
            temperature = temperature.detach().float().mean()  # read by the Distiller later
        return TaskOutput(loss, soft_norm, hard_norm, temperature)

    def distillation_loss(
        self,
        logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        labels: torch.Tensor,
        *,
        temperature: float | torch.Tensor,
        alpha: float,
        kd_options: dict[str, Any],
        normalizer: torch.Tensor | float,
    ) -> KDLoss:
        """The objective on one micro-batch's ``(B, C)`` logits: :func:`kd_loss`, with soft and
        hard terms over the same valid positions. Subclasses change only this."""
        return kd_loss(
            logits, teacher_logits, labels, temperature=temperature, alpha=alpha,
            **{**kd_options, "ignore_index": self.ignore_index, "normalizer": normalizer},
        )  # fmt: skip

    def eval_sums(self, student: torch.nn.Module, batch: Any) -> dict[str, float]:
        inputs, labels = self._split(batch)
        logits = _logits(student(inputs))  # (B, C)
        summed = kd_loss(
            logits, logits, labels, temperature=1.0, alpha=0.0,
            ignore_index=self.ignore_index, reduction="sum",
        )  # fmt: skip
        valid = valid_positions(labels, None, self.ignore_index)  # (B,)
        correct = ((logits.argmax(dim=-1) == labels) & valid).sum()
        return {"loss": float(summed.hard), "correct": float(correct), "count": float(valid.sum())}


def _logits(output: Any) -> torch.Tensor:
    """A model's logits: the output itself, or its ``.logits`` (Hugging Face models)."""
    return output if isinstance(output, torch.Tensor) else output.logits
