"""A Task adapts batches and models to the Distiller; the Distiller itself knows neither.

The protocol (also implemented by ``darkknowledge.llm.task.CausalLMTask``):

- ``count_valid(batch) -> Tensor``: positions that count in this micro-batch (samples, tokens).
- ``teacher_outputs(teacher, batch)``: run under ``torch.inference_mode()`` by the Distiller;
  returns whatever ``compute_loss`` needs (the Distiller clones inference tensors out of
  inference mode before they reach autograd).
- ``compute_loss(student, batch, teacher_outputs, *, loss_fn, step, normalizer, grad_meter)
  -> TaskOutput``: ``loss_fn=None`` means labels only (no teacher); ``normalizer`` is the
  global count of valid positions of the optimizer step divided by the number of processes;
  ``grad_meter=True`` asks for the gradient balance of the soft and hard terms (see
  :mod:`darkknowledge.train.grad_meter`). The Distiller runs it under the accelerator's
  autocast, so mixed precision reaches the loss as well as the model.
- ``eval_sums(student, batch) -> dict[str, float]``: sums (``loss``, ``correct``, ``count``)
  that the Distiller adds up over batches and processes and turns into means.
- optional ``prepare_batch(student, batch, *, step) -> batch``: called on each micro-batch of
  a step before its valid positions are counted, under the accelerator's autocast (on-policy
  distillation, :class:`darkknowledge.llm.OnPolicyTask`, samples completions there).
- optional ``bind(student, teacher) -> None``: called once when the Distiller is built, with
  the student and the frozen teacher (None without one), before either is wrapped (on-policy
  distillation learns there which ids the student may sample).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch

from ..losses import (
    DistillationLoss,
    KDLoss,
    count_valid,
    hard_only_loss,
    kd_loss,
    valid_positions,
)
from .grad_meter import cross_entropy_gradient, gradient_balance


class TaskOutput(NamedTuple):
    """One micro-batch's loss parts, and on meter steps the gradient balance's readings.

    ``temperature`` (optional) is the temperature in force, its mean if per sample; tasks that
    leave it None get the Distiller's own reading of a float or scheduled temperature. The
    numbers may be 0-dim tensors: the Distiller reads them without stalling the GPU.
    ``logs`` (optional) holds more numbers for the train record, divided by the step's
    normalizer like the loss parts: the Distiller sums them over micro-batches and averages
    them over processes (e.g. each MTP depth's loss).
    """

    loss: KDLoss
    soft_grad_norm: float | torch.Tensor | None = None
    hard_grad_norm: float | torch.Tensor | None = None
    temperature: float | torch.Tensor | None = None
    logs: dict[str, float | torch.Tensor] | None = None


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
        grad_meter: bool,
    ) -> TaskOutput: ...

    def eval_sums(self, student: torch.nn.Module, batch: Any) -> dict[str, float]: ...


class ClassificationTask:
    """Batches are ``(inputs, labels)``; logits are ``model(inputs)`` (or its ``.logits``).

    ``inputs`` has any shape the model accepts, ``labels`` is ``(B,)`` (or ``(...)`` matching
    the logits' leading dimensions) with ``ignore_index`` for positions that do not count.

    ``distill_unlabelled=True`` is the *transfer-set* regime of Hinton et al. (2015): an
    example labelled ``ignore_index`` is unlabelled but still distilled on, so every example
    gets the teacher's soft targets and the labelled ones the hard term too, both divided by
    the number of examples of the step:

        l_i = alpha · T² · D(p_i, q_i) + (1 - alpha) · CE(z_i, y_i) · [y_i is known]

    >>> import torch
    >>> batch = (torch.randn(4, 3), torch.tensor([0, 1, -100, 2]))
    >>> int(ClassificationTask().count_valid(batch)), int(ClassificationTask(distill_unlabelled=True).count_valid(batch))
    (3, 4)
    """

    def __init__(self, *, ignore_index: int = -100, distill_unlabelled: bool = False) -> None:
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
        if not isinstance(distill_unlabelled, bool):
            raise TypeError(f"distill_unlabelled must be a bool, got {distill_unlabelled!r}")
        self.ignore_index = ignore_index
        self.distill_unlabelled = distill_unlabelled

    def _split(self, batch: Any) -> tuple[Any, torch.Tensor]:
        if not isinstance(batch, tuple | list) or len(batch) != 2:
            raise TypeError(
                f"ClassificationTask expects batches (inputs, labels), got {type(batch).__name__}"
                + (f" of length {len(batch)}" if isinstance(batch, tuple | list) else "")
            )
        return batch[0], batch[1]

    def count_valid(self, batch: Any) -> torch.Tensor:
        labels = self._split(batch)[1]
        if self.distill_unlabelled:  # every example counts for the soft term
            return count_valid(torch.zeros_like(labels))
        return count_valid(labels, ignore_index=self.ignore_index)

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
        grad_meter: bool,
    ) -> TaskOutput:
        inputs, labels = self._split(batch)
        logits = _logits(student(inputs))  # (B, C)
        if loss_fn is None:  # labels only (the baseline): no soft term, no teacher
            alpha, temperature = 0.0, None
            loss = hard_only_loss(
                logits, labels, ignore_index=self.ignore_index, normalizer=normalizer
            )
        else:
            teacher_logits = teacher_outputs.to(logits.device)  # (B, C)
            alpha = loss_fn.current_alpha(step)
            temperature = loss_fn.current_temperature(step, logits, teacher_logits)
            loss = self.distillation_loss(
                logits, teacher_logits, labels, temperature=temperature, alpha=alpha,
                kd_options=loss_fn.kd_options, normalizer=normalizer,
            )  # fmt: skip
        if not grad_meter:
            return TaskOutput(loss)
        hard_grad = None
        if type(self).distillation_loss is ClassificationTask.distillation_loss and alpha < 1.0:
            # The hard term is known to be the cross-entropy: its gradient in closed form spares
            # the meter a backward pass (a subclass's own distillation_loss gets autograd).
            hard_grad = cross_entropy_gradient(
                logits, labels, weight=1.0 - alpha, normalizer=normalizer,
                ignore_index=self.ignore_index,
            )  # fmt: skip
        soft_norm, hard_norm = gradient_balance(loss, alpha, logits, hard_grad)
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
        hard terms over the same valid positions (with ``distill_unlabelled``, the soft term over
        every example). Subclasses change only this."""
        if self.distill_unlabelled:
            return self._transfer_set_loss(
                logits, teacher_logits, labels, temperature=temperature, alpha=alpha,
                kd_options=kd_options, normalizer=normalizer,
            )  # fmt: skip
        return kd_loss(
            logits, teacher_logits, labels, temperature=temperature, alpha=alpha,
            **{**kd_options, "ignore_index": self.ignore_index, "normalizer": normalizer},
        )  # fmt: skip

    def _transfer_set_loss(
        self, logits, teacher_logits, labels, *, temperature, alpha, kd_options, normalizer
    ) -> KDLoss:
        """Soft term over every example, hard term over the labelled ones, both divided by
        ``normalizer`` (the number of examples)."""
        options = {**kd_options, "normalizer": normalizer}
        soft = kd_loss(logits, teacher_logits, None, temperature=temperature, alpha=1.0, **options)
        # alpha = 0 gives the hard term alone, summed over labelled examples / all examples.
        hard = kd_loss(
            logits, teacher_logits, labels, temperature=1.0, alpha=0.0,
            ignore_index=self.ignore_index, normalizer=normalizer,
        )  # fmt: skip
        return KDLoss(alpha * soft.total + (1.0 - alpha) * hard.hard, soft.soft, hard.hard)

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


def frozen_outputs(task: Task, teacher: torch.nn.Module, batch: Any) -> Any:
    """``task.teacher_outputs`` under ``torch.inference_mode()``, cloned out of inference mode
    so that autograd may save them for backward (a learned temperature looks at them)."""
    with torch.inference_mode():
        outputs = task.teacher_outputs(teacher, batch)
    return _out_of_inference_mode(outputs)


def _out_of_inference_mode(tree: Any) -> Any:
    """Clone inference tensors so autograd may save them; other values pass through."""
    if isinstance(tree, torch.Tensor):
        return tree.clone() if tree.is_inference() else tree
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return type(tree)(*(_out_of_inference_mode(v) for v in tree))
    if isinstance(tree, list | tuple):
        return type(tree)(_out_of_inference_mode(v) for v in tree)
    if isinstance(tree, dict):  # also a Hugging Face ModelOutput, rebuilt as its own type
        items = {k: _out_of_inference_mode(v) for k, v in tree.items()}
        return items if type(tree) is dict else type(tree)(**items)
    return tree
