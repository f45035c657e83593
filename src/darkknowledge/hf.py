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
accumulation steps. Evaluation ignores the Trainer's count (taken by another rule: under left
padding it counts the first real token of each row, which nothing predicts) and divides each
batch's sum by its own number of predicted tokens.

Logs: every training log adds ``soft`` and ``hard`` (the step's loss parts, averaged over the
steps since the last log and over processes), ``temperature`` and ``alpha``, as
``dk.Distiller`` does. ``evaluate()`` adds ``eval_ce`` (the student's cross-entropy per
predicted token over the whole evaluation set), ``eval_perplexity = exp(eval_ce)`` and
``eval_soft`` (the divergence per token) to the Trainer's ``eval_loss`` (the objective).

Mixed precision: Accelerate autocasts only the student's forward; the teacher's forward and the
fused loss run here, so they are put under ``accelerator.autocast()`` too (the loss then does
its vocabulary products in the autocast dtype and its softmax math in float32).
"""

from __future__ import annotations

import math
import pickle
from typing import Any

import torch
import transformers
from torch import nn
from transformers.trainer_utils import get_last_checkpoint

from .llm.heads import output_layer
from .llm.task import CausalLMTask
from .llm.vocab import shared_vocab_size
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
        vocab_size: the vocabulary both output layers are cut to when one only adds padding
            rows; None: inferred (same size, or one padded to a multiple of a power of two),
            and a real mismatch is refused here (:func:`darkknowledge.llm.vocab.shared_vocab_size`).
        teacher_tokenizer: the teacher's tokenizer; with the student's as ``processing_class``,
            their token ids are compared and any disagreement refused.
        *args, **kwargs: the ``Trainer``'s own (``args=TrainingArguments(...)``, datasets, ...).

    Batches hold ``input_ids``, ``attention_mask`` and unshifted ``labels`` (``-100`` where
    nothing is predicted), as ``DataCollatorForLanguageModeling(mlm=False)`` or
    :class:`darkknowledge.llm.PaddingCollator` make them, and optionally ``prompt_lengths`` or
    ``completion_mask`` (kept by ``remove_unused_columns``, although the model does not take them).
    """

    # Batch keys the loss reads besides the model's own arguments.
    LOSS_COLUMNS = ("prompt_lengths", "completion_mask")

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
        vocab_size: int | None = None,
        teacher_tokenizer: Any = None,
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
        student_tokenizer = getattr(self, "processing_class", None) or getattr(
            self, "tokenizer", None
        )
        if teacher_tokenizer is not None and student_tokenizer is None:
            raise ValueError(
                "teacher_tokenizer is compared with the student's tokenizer: pass that one as "
                "processing_class (or tokenizer=) too"
            )
        shared = shared_vocab_size(  # a tokenizer mismatch is refused now, not at step 1
            output_layer(self.model).weight.shape[0],
            output_layer(teacher_model).weight.shape[0],
            vocab_size=vocab_size,
            student_tokenizer=student_tokenizer if teacher_tokenizer is not None else None,
            teacher_tokenizer=teacher_tokenizer,
        )
        self.task = CausalLMTask(chunk_size=chunk_size, vocab_size=shared)
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
        self._train_parts: torch.Tensor | None = None  # (soft, hard) summed since the last log
        self._logged_step = 0
        self._eval_sums: torch.Tensor | None = None  # (soft, hard, count) summed over evaluation

    def _set_signature_columns_if_needed(self) -> None:
        # remove_unused_columns keeps the columns of the model's forward; the loss also reads
        # prompt_lengths / completion_mask. The Trainer's subclass hook for this (TRL's trainers
        # extend it the same way); the columns list is the Trainer's own.
        super()._set_signature_columns_if_needed()
        columns = getattr(self, "_signature_columns", None)
        if isinstance(columns, list):
            columns.extend(name for name in self.LOSS_COLUMNS if name not in columns)

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
        evaluating = not model.training
        # Evaluation: the Trainer counts tokens by its own rule; the loss's own count (None) is
        # this batch's predicted tokens, the rule of the loss.
        normalizer = None if evaluating else num_items_in_batch
        if normalizer is not None and self._averages_across_devices():
            # num_items_in_batch counts every process's tokens; DDP averages the gradients over
            # processes, so each process divides its sum by global_count / world_size.
            normalizer = normalizer / self.accelerator.num_processes
        with self.accelerator.autocast():
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
        parts = output.loss
        if evaluating:
            self._add_eval_sums(parts.soft, parts.hard, self.task.count_valid(inputs))
        else:
            # Without a count (old Trainers) each micro-batch is a mean that the Trainer divides
            # by the accumulation steps; with one, the micro-batches add up to the step's value.
            share = 1.0 if normalizer is not None else 1.0 / self.args.gradient_accumulation_steps
            self._add_train_parts(parts.soft, parts.hard, share)
        loss = parts.total
        if return_outputs:
            return loss, {"loss": loss, "soft": parts.soft.detach(), "hard": parts.hard.detach()}
        return loss

    # -- logs ------------------------------------------------------------------------------
    def _add_train_parts(self, soft: torch.Tensor, hard: torch.Tensor, share: float) -> None:
        step_parts = torch.stack([soft.detach(), hard.detach()]).double() * share  # no host sync
        self._train_parts = (
            step_parts if self._train_parts is None else self._train_parts + step_parts
        )

    def _add_eval_sums(self, soft: torch.Tensor, hard: torch.Tensor, count: Any) -> None:
        count = torch.as_tensor(count, device=soft.device).double()
        sums = torch.stack([soft.detach().double() * count, hard.detach().double() * count, count])
        self._eval_sums = (
            sums if self._eval_sums is None else self._eval_sums + sums.to(self._eval_sums.device)
        )

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """The Trainer's log, plus ``soft``, ``hard``, ``temperature`` and ``alpha`` on training
        logs (those holding ``loss``)."""
        if "loss" in logs and self._train_parts is not None:
            parts, self._train_parts = self._train_parts, None
            if self.accelerator.num_processes > 1:  # every process logs at the same steps
                parts = self.accelerator.reduce(parts, reduction="mean")
            steps = max(self.state.global_step - self._logged_step, 1)
            self._logged_step = self.state.global_step
            soft, hard = (parts / steps).tolist()
            step = max(self.state.global_step - 1, 0)  # the step the last loss was computed at
            temperature = self.loss_fn.current_temperature(step)
            if isinstance(temperature, torch.Tensor):
                temperature = float(temperature.detach().mean())
            logs = {
                **logs,
                "soft": soft,
                "hard": hard,
                "temperature": float(temperature),
                "alpha": float(self.loss_fn.current_alpha(step)),
            }
        super().log(logs, *args, **kwargs)

    def evaluation_loop(self, *args: Any, **kwargs: Any):
        """The Trainer's loop, whose metrics gain ``<prefix>_ce``, ``<prefix>_perplexity`` and
        ``<prefix>_soft``: sums over every predicted token of the set, divided once."""
        # Every process starts from zeros, so each joins the reduction below even without batches.
        self._eval_sums = torch.zeros(3, dtype=torch.float64, device=self.args.device)
        try:
            output = super().evaluation_loop(*args, **kwargs)
            sums = self._eval_sums
        finally:
            self._eval_sums = None
        if self.accelerator.num_processes > 1:
            sums = self.accelerator.reduce(sums, reduction="sum")
        soft_sum, hard_sum, count = sums.tolist()
        if count > 0:
            prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
            cross_entropy = hard_sum / count
            output.metrics[f"{prefix}_ce"] = cross_entropy
            output.metrics[f"{prefix}_perplexity"] = math.exp(min(cross_entropy, 700.0))
            output.metrics[f"{prefix}_soft"] = soft_sum / count
        return output

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        """The Trainer's ``train``. Resuming, the Trainer reads its ``*.pt``/``*.pth`` files with
        ``torch.load(weights_only=True)``; a pickle that such a load refuses (one that names
        code, which is never run) is reported as a ``ValueError`` naming the folder."""
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        except pickle.UnpicklingError:  # torch's own message is a page long
            if resume_from_checkpoint is True:
                resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            raise ValueError(
                f"resume_from_checkpoint {str(resume_from_checkpoint)!r}: a .pt/.pth file in it "
                "holds a pickle that torch.load(weights_only=True) refuses (it names code, which "
                "is never run): not a checkpoint this Trainer wrote"
            ) from None

    def _averages_across_devices(self) -> bool:
        return (
            bool(getattr(self.args, "average_tokens_across_devices", False))
            and self.args.world_size > 1
        )
