"""``DistillationTrainer``: knowledge distillation inside a Hugging Face ``transformers.Trainer``.

Only ``compute_loss`` changes: the fused KD loss of :class:`darkknowledge.llm.CausalLMTask` on
hidden states and output layers replaces the model's own loss, so the ``(tokens, vocab)``
logits are never built. Everything else (optimiser, schedules, accumulation, DDP through
accelerate, logging, checkpoints) is the Trainer's.

Normalisation: the loss is a sum over predicted tokens divided by the number of predicted
tokens of the whole optimizer step (all accumulated micro-batches, and all processes when
``average_tokens_across_devices``), which the Trainer passes as ``num_items_in_batch``; that
count is taken with :func:`darkknowledge.llm.shift_labels`, the same rule as the loss. Without
it (transformers < 4.46) the loss is a per-micro-batch mean and the Trainer divides by the
accumulation steps.
"""

from __future__ import annotations

from typing import Any

import torch
import transformers
from torch import nn

from .llm.task import CausalLMTask
from .losses import DistillationLoss
from .losses._checks import check_divergence_name, check_unit_interval
from .losses.fused import DEFAULT_CHUNK_SIZE


class DistillationTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` whose loss is ``(1 - alpha)·CE + alpha·T²·D(teacher ‖ student)``.

    Args:
        model: the student (any ``AutoModelForCausalLM``-style model, PEFT-wrapped or not).
        teacher_model: the teacher; frozen, put in eval mode and moved to the student's device,
            never wrapped by DDP nor given to the optimiser.
        temperature: T, a float or a schedule ``step -> float`` (evaluated at ``global_step``).
        alpha: weight of the soft term, a float or a schedule.
        divergence, beta, lam, soft_scale: see :func:`darkknowledge.kd_loss`.
        chunk_size: positions per chunk of the fused loss.
        *args, **kwargs: the ``Trainer``'s own (``args=TrainingArguments(...)``, datasets, ...).

    Batches hold ``input_ids``, ``attention_mask`` and unshifted ``labels`` (``-100`` where
    nothing is predicted), as ``DataCollatorForLanguageModeling(mlm=False)`` makes them.
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        teacher_model: nn.Module | None = None,
        *args: Any,
        temperature: Any = 2.0,
        alpha: Any = 0.5,
        divergence: str = "forward_kl",
        beta: float = 0.5,
        lam: float = 0.1,
        soft_scale: str | float = "T2",
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        **kwargs: Any,
    ) -> None:
        if not isinstance(teacher_model, nn.Module):
            raise TypeError(
                f"teacher_model must be an nn.Module (the teacher), got {type(teacher_model).__name__}"
            )
        check_divergence_name(divergence)
        if not callable(alpha):
            check_unit_interval(alpha, "alpha")
        super().__init__(model, *args, **kwargs)
        if self.args.n_gpu > 1:
            raise ValueError(
                f"DistillationTrainer does not support DataParallel (n_gpu={self.args.n_gpu} in one process); "
                "launch one process per GPU with torchrun or accelerate launch"
            )
        self.task = CausalLMTask(chunk_size=chunk_size)
        self.loss_fn = DistillationLoss(
            temperature=temperature,
            alpha=alpha,
            divergence=divergence,
            beta=beta,
            lam=lam,
            soft_scale=soft_scale,
        )
        self.teacher_model = teacher_model.to(self.args.device).eval().requires_grad_(False)
        # The loss below is normalised by num_items_in_batch when the Trainer gives it, so the
        # Trainer must count it and must not divide by the accumulation steps again.
        self.model_accepts_loss_kwargs = True

    def get_batch_samples(self, *args: Any, **kwargs: Any):
        """The Trainer's micro-batches, with ``num_items_in_batch`` counted by our label rule."""
        batch_samples, num_items = super().get_batch_samples(*args, **kwargs)
        if num_items is None or not batch_samples:
            return batch_samples, num_items
        count = sum(self.task.count_valid(batch) for batch in batch_samples)
        count = torch.as_tensor(count, device=self.args.device)
        if self._averages_across_devices():
            count = self.accelerator.gather(count).sum()
        return batch_samples, count

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        normalizer = num_items_in_batch
        if normalizer is not None and self._averages_across_devices():
            # num_items_in_batch counts every process's tokens; DDP averages the gradients over
            # processes, so each process divides its sum by global_count / world_size.
            normalizer = normalizer / self.accelerator.num_processes
        with torch.no_grad():
            teacher_outputs = self.task.teacher_outputs(self.teacher_model, inputs)
        output = self.task.compute_loss(
            model,
            inputs,
            teacher_outputs,
            loss_fn=self.loss_fn,
            step=self.state.global_step,
            normalizer=normalizer,
        )
        loss = output.loss.total
        if return_outputs:
            return loss, {
                "loss": loss,
                "soft": output.loss.soft.detach(),
                "hard": output.loss.hard.detach(),
            }
        return loss

    def _averages_across_devices(self) -> bool:
        return (
            bool(getattr(self.args, "average_tokens_across_devices", False))
            and self.args.world_size > 1
        )
