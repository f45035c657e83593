"""``Distiller``: the training loop, on Hugging Face Accelerate.

Accelerate places the student, optimizer and data, runs mixed precision and DDP. The teacher
never goes through ``accelerator.prepare``: it is frozen structurally (eval mode, no
``requires_grad``, forward under ``torch.inference_mode()``) and may sit in its own dtype and
device. All math lives in :mod:`darkknowledge.losses`; this file only wires it. What is not the
loop lives beside it: checkpoints (:mod:`.resume`, :mod:`.checkpoint`), signals
(:mod:`.interrupts`), log records (:mod:`.logging`), Accelerate's gaps (:mod:`._accelerate`).
"""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from ..losses import DistillationLoss
from ..schedules import value_at
from ._accelerate import accelerator_for, plain_steps, step_optimizer
from .data import DataStream
from .distributed import explain_failures, global_count_and_stop, reduce_sum, step_normalizer
from .evaluation import evaluate_task
from .fsdp import check_temperature, full_tensor
from .interrupts import StopRequests, stop_exception
from .logging import MetricLogger, PendingRecord, Throughput, train_record
from .nonfinite import NonFiniteMonitor
from .resume import check_fresh_output, export_weights, load_training_state, save_training_state
from .setup import build_optimizer, freeze_teacher, validate_arguments
from .task import ClassificationTask, Task, frozen_outputs

Callback = Callable[["Distiller", "dict | None"], None]
DEFAULT_LEARNING_RATE = 1e-3


class TrainResult(NamedTuple):
    """``history``: every train and eval record of this ``fit``; ``final``: the last train
    record's numbers plus the final evaluation as ``eval_<name>``."""

    history: list[dict]
    final: dict


class Distiller:
    """Distil ``teacher`` into ``student`` (or train ``student`` on labels alone, ``teacher=None``).

    ``temperature`` is a float, a schedule ``step -> float`` or a ``LearnableTemperature``;
    ``alpha`` and ``learning_rate`` floats or schedules. One step is one optimizer update over
    ``grad_accum_steps`` micro-batches. See ``docs/training.md``.

    >>> import torch, darkknowledge as dk
    >>> data = [(torch.randn(16, 4), torch.randint(3, (16,))) for _ in range(4)]
    >>> teacher, student = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    >>> result = dk.Distiller(student, teacher, data, max_steps=8, progress=False).fit()
    >>> result.final["step"], sorted(result.history[0])[:3]
    (8, ['alpha', 'epoch', 'hard'])
    """

    def __init__(
        self,
        student: torch.nn.Module,
        teacher: torch.nn.Module | None,
        train_data: Iterable,
        *,
        task: Task | None = None,
        temperature: Any = 4.0,
        alpha: float | Callable[[int], float] = 0.9,
        loss_options: dict | None = None,
        optimizer: str | Callable = "adamw",
        learning_rate: float | Callable[[int], float] | None = None,
        weight_decay: float = 0.0,
        max_steps: int,
        grad_accum_steps: int = 1,
        max_grad_norm: float | None = None,
        mixed_precision: str = "no",
        eval_data: Iterable | None = None,
        eval_every: int = 0,
        save_every: int = 0,
        keep_last: int | None = None,
        output_dir: str | Path | None = None,
        log_every: int = 10,
        seed: int = 0,
        progress: bool = True,
        teacher_dtype: torch.dtype | str | None = None,
        callbacks: Iterable[Callback] = (),
        teacher_device: torch.device | str | None = None,
        student_config: dict | None = None,
        config: Mapping[str, Any] | None = None,
        accelerator: Accelerator | None = None,
        on_nonfinite: str = "stop",
    ) -> None:
        self.task = task if task is not None else ClassificationTask()
        loss_options = dict(loss_options or {})
        if learning_rate is None and isinstance(optimizer, str):
            learning_rate = DEFAULT_LEARNING_RATE  # a callable optimizer keeps its own
        validate_arguments(
            student=student, teacher=teacher, train_data=train_data, eval_data=eval_data,
            task=self.task, temperature=temperature, alpha=alpha, loss_options=loss_options,
            optimizer=optimizer, learning_rate=learning_rate, max_steps=max_steps,
            grad_accum_steps=grad_accum_steps, log_every=log_every, eval_every=eval_every,
            save_every=save_every, keep_last=keep_last, max_grad_norm=max_grad_norm,
            mixed_precision=mixed_precision, output_dir=output_dir,
        )  # fmt: skip
        self.max_steps, self.grad_accum_steps = max_steps, grad_accum_steps
        self.max_grad_norm, self.learning_rate = max_grad_norm, learning_rate
        self.eval_data, self.eval_every = eval_data, eval_every
        self.save_every, self.keep_last, self.log_every = save_every, keep_last, log_every
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.progress, self.callbacks = progress, tuple(callbacks)
        self.student_config = student_config
        self.config = None if config is None else dict(config)
        self.alpha = 0.0 if teacher is None else alpha  # no teacher: labels only, the baseline
        self._nonfinite = NonFiniteMonitor(on_nonfinite)  # NaN/Inf steps: stop or skip

        set_seed(seed)  # python, numpy, torch, CUDA; also the seed of the data sampler below
        self.accelerator = acc = accelerator_for(accelerator, mixed_precision)  # FSDP: see .fsdp
        self.teacher = None
        if teacher is not None:
            self.teacher = freeze_teacher(teacher, teacher_dtype, teacher_device or acc.device)
        bind = getattr(self.task, "bind", None)  # optional: a task that reads the models' shapes
        if bind is not None:
            bind(student, self.teacher)
        learned = isinstance(temperature, torch.nn.Module) and teacher is not None
        temperature_module = temperature if learned else None  # without a teacher: no soft term
        check_temperature(acc, learned)  # FSDP2 prepares one model
        optimizer = build_optimizer(
            optimizer, student, temperature_module, learning_rate, weight_decay
        )
        # The teacher is not prepared: DDP would wrap it and all-reduce nothing.
        extra = [temperature_module] if temperature_module is not None else []
        prepared = acc.prepare(student, optimizer, train_data, *extra)
        self.student, self.optimizer, self.train_data = prepared[:3]
        self.temperature_module = prepared[3] if extra else None
        self.loss_fn = None
        if teacher is not None:
            self.loss_fn = DistillationLoss(
                temperature=self.temperature_module if extra else temperature, alpha=alpha,
                **loss_options,
            )  # fmt: skip
        self.step = 0
        self.stream = DataStream(self.train_data, acc)  # continues across fit() calls
        self._plain_steps = plain_steps(acc)
        self._autocast = acc.autocast if acc.mixed_precision != "no" else contextlib.nullcontext
        self._fits, self._saved_step, self._last_checkpoint = 0, None, None
        self._stops = StopRequests()
        self._peers_stop: torch.Tensor | None = None
        self._last_train: dict = {}
        self._eval_metrics: dict = {}
        self._eval_step: int | None = None
        self._reset_records()

    # ---- the loop ------------------------------------------------------------------------

    @explain_failures
    def fit(self, resume: bool = False) -> TrainResult:
        """Train to ``max_steps``. ``resume=True`` continues from the newest complete
        checkpoint in ``output_dir`` (or starts afresh when there is none); a fresh first
        ``fit`` refuses an ``output_dir`` that holds a previous run. Calling ``fit`` again
        (after raising ``max_steps``) continues this run, data stream included."""
        acc = self.accelerator
        if resume and self.output_dir is None:
            raise ValueError("fit(resume=True) needs output_dir, where the checkpoints are")
        if not resume and self._fits == 0:
            check_fresh_output(self.output_dir)
        acc.wait_for_everyone()  # every process checked before the main one writes the log
        self._reset_records()
        self._logger = logger = MetricLogger(self.output_dir, enabled=acc.is_main_process)
        if resume:
            self._last_checkpoint = load_training_state(self)
            self._saved_step = self.step if self._last_checkpoint is not None else None
            logger.truncate_after(self.step)  # a resumed run rewrites the steps it repeats
        self._fits += 1
        self._window, self._peers_stop = Throughput(self.step), None
        show = self.progress and acc.is_main_process and sys.stderr.isatty()
        bar = tqdm(total=self.max_steps, initial=self.step, disable=not show)
        self.student.train()
        try:
            with self._stops:
                while self.step < self.max_steps:
                    self._stop_if_requested(agreed=self._peers_stop)
                    pending = self.train_step()
                    self._after_step(pending, bar)
                self._flush()
                self._stop_if_requested()  # a signal during the last step
                if self.eval_data is not None and self._eval_step != self.step:
                    self._log_eval()
                if self.output_dir is not None and self._saved_step != self.step:
                    self.save_checkpoint()
                self._stop_if_requested()  # during the final evaluation or save
        finally:
            bar.close()
            logger.close()
        final = {n: v for n, v in self._last_train.items() if n != "kind"}
        final.update(step=self.step, **{f"eval_{n}": v for n, v in self._eval_metrics.items()})
        return TrainResult(self._history, final)

    def train_step(self) -> PendingRecord | None:
        """One optimizer update over ``grad_accum_steps`` micro-batches; a record on log steps
        and on the last step."""
        acc, k, step = self.accelerator, self.grad_accum_steps, self.step
        log_now = (step + 1) % self.log_every == 0 or step + 1 == self.max_steps
        # All k micro-batches first: the normaliser needs the valid count of the whole update.
        batches = self._prepared([self.stream.next() for _ in range(k)], step)
        counts = torch.stack([_on(self.task.count_valid(b), acc.device) for b in batches])  # (k,)
        stopping = self._stops.signum is not None
        global_count, self._peers_stop = global_count_and_stop(acc, counts.sum(), stopping)
        # Each process divides by global/world; DDP averages, so the update is one big batch's.
        normalizer = step_normalizer(acc, global_count)
        if self.learning_rate is not None:  # None: a callable optimizer keeps its own
            for group in self.optimizer.param_groups:
                group["lr"] = value_at(self.learning_rate, step)
        outputs = []
        for i, batch in enumerate(batches):
            teacher_out = self._teacher_outputs(batch)
            # DDP all-reduces gradients after each backward; only the last micro-batch needs it.
            with self._no_sync() if i < k - 1 else contextlib.nullcontext():
                with self._autocast():  # mixed precision reaches the loss, not only the model
                    out = self.task.compute_loss(
                        self.student, batch, teacher_out, loss_fn=self.loss_fn, step=step,
                        normalizer=normalizer, grad_meter=log_now,
                    )  # fmt: skip
                self._backward(out.loss.total)  # summed over micro-batches, never divided by k
            outputs.append(out)
        grad_norm = None
        if self.max_grad_norm is not None:
            grad_norm = acc.clip_grad_norm_(self._trainable_parameters(), self.max_grad_norm)
            grad_norm = full_tensor(grad_norm)  # FSDP2: a replicated DTensor
        parameters = self._trainable_parameters  # called only if "skip" needs a gradient norm
        skip = self._nonfinite.check_step(acc, step + 1, outputs, grad_norm, parameters)
        step_optimizer(self.optimizer, self._plain_steps, skip=skip)
        self.step += 1
        self._window.add(global_count)
        if not log_now:
            return None
        self._nonfinite.snapshot(acc)  # read with the record, one step later
        return train_record(
            acc, outputs, step=self.step, epoch=self.stream.epoch, grad_norm=grad_norm,
            values=self._values_in_force(step, outputs), window=self._window.take(self.step),
        )  # fmt: skip

    def _teacher_outputs(self, batch: Any) -> Any:
        return None if self.teacher is None else frozen_outputs(self.task, self.teacher, batch)

    def _prepared(self, batches: list, step: int) -> list:
        """The task's optional ``prepare_batch`` on each micro-batch, before the valid positions
        are counted (on-policy distillation samples the completions from the student here)."""
        prepare = getattr(self.task, "prepare_batch", None)
        if prepare is None:
            return batches
        with self._autocast():  # sample with the precision the student trains in
            return [prepare(self.student, batch, step=step) for batch in batches]

    def _after_step(self, pending: PendingRecord | None, bar: tqdm) -> None:
        # The record of the previous log step is logged now: its numbers were copied to the host
        # behind that step's work, so reading them does not drain the GPU's queue.
        record = self._flush()
        self._pending = pending
        eval_now = self.eval_every and self.step % self.eval_every == 0
        save_now = self.save_every and self.step % self.save_every == 0
        save_now = save_now and self.step < self.max_steps  # the last one is saved after eval
        if eval_now or save_now:
            record = self._flush() or record
        if record is not None:
            bar.set_postfix(loss=f"{record['total']:.4g}", refresh=False)
        bar.update(1)
        if eval_now:
            self._log_eval()
        if save_now:
            self.save_checkpoint()
        for callback in self.callbacks:
            callback(self, record)

    def _stop_if_requested(self, agreed: torch.Tensor | None = None) -> None:
        """After SIGINT/SIGTERM: save at this step boundary and raise (see
        :mod:`.interrupts`). With several processes all of them must stop at the same step:
        in the loop the flag travelled in the step's all-reduce (``agreed``); after it, one
        more all-reduce settles it."""
        local = self._stops.signum is not None
        if self.accelerator.num_processes == 1:
            stop = local
        elif agreed is not None:
            stop = bool(agreed)
        else:
            flag = torch.tensor(float(local), device=self.accelerator.device)
            stop = bool(reduce_sum(self.accelerator, flag) > 0)
        if not stop:
            return
        self._flush()
        if self.output_dir is not None and self._saved_step != self.step:
            self.save_checkpoint()
        raise stop_exception(self._stops.signum or signal.SIGTERM, self.step, self._last_checkpoint)

    def _values_in_force(self, step: int, outputs: list) -> dict[str, Any]:
        temperature = outputs[0].temperature
        if temperature is None and self.loss_fn is not None and self.temperature_module is None:
            temperature = float(self.loss_fn.current_temperature(step))
        lr = self.optimizer.param_groups[0]["lr"]
        if self.learning_rate is not None:
            lr = value_at(self.learning_rate, step)
        return {
            "temperature": temperature,
            "alpha": float(value_at(self.alpha, step)),
            "lr": float(lr),
            **self._nonfinite.record_fields(),  # nonfinite_steps under on_nonfinite="skip"
        }

    def _flush(self) -> dict | None:
        """Log the pending train record, if any (its numbers are waited for)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        record = pending.resolve()
        self._logger.log(record)
        self._history.append(record)
        self._last_train = record
        self._nonfinite.stop_if_seen(self._last_checkpoint)  # after logging the NaN it saw
        return record

    # ---- evaluation ----------------------------------------------------------------------

    @explain_failures
    def evaluate(self, data: Iterable | None = None) -> dict:
        """Means over ``data`` (default: ``eval_data``) of the task's ``eval_sums``, over all
        processes: ``loss``, ``accuracy`` (from ``correct``) and ``count`` for classifiers.
        Process r takes batches r, r+W, ... (see :mod:`.evaluation`)."""
        data = self.eval_data if data is None else data
        if data is None:
            raise ValueError(
                "evaluate needs data: pass evaluate(data=...) or Distiller(eval_data=...)"
            )
        return evaluate_task(self.accelerator, self.task, self.student, data)

    def _log_eval(self) -> None:
        self._eval_metrics, self._eval_step = self.evaluate(), self.step
        record = {"kind": "eval", "step": self.step, **self._eval_metrics}
        self._logger.log(record)
        self._history.append(record)

    # ---- records, checkpoints and export -------------------------------------------------

    def _reset_records(self) -> None:
        """A new ``fit`` has its own history; the newest records carry over (a ``fit`` with no
        step left reports them)."""
        self._history: list[dict] = []
        self._pending: PendingRecord | None = None

    @explain_failures
    def save_checkpoint(self) -> Path:
        """Write ``<output_dir>/checkpoints/step-<step>/`` (see :mod:`.checkpoint`) with the
        data position the next step will read; every process must call it, e.g. from a
        callback. Keeps the newest ``keep_last`` checkpoints."""
        if self.output_dir is None:
            raise ValueError("save_checkpoint needs output_dir; pass Distiller(output_dir=...)")
        self._nonfinite.stop_before_saving(self.accelerator, self._last_checkpoint)
        self._last_checkpoint = save_training_state(self)
        self._saved_step = self.step
        return self._last_checkpoint

    @explain_failures
    def export_student(self, path: str | Path, *, config: dict | None = None) -> Path:
        """Write the student alone: ``<path>/model.safetensors`` and, when the student has a
        config (``config``, ``student_config``, or a Hugging Face ``model.config``),
        ``<path>/config.json``. Every process must call it; the main one writes."""
        return export_weights(self.accelerator, self.student, path, config or self.student_config)

    # ---- small helpers -------------------------------------------------------------------

    def _backward(self, loss: torch.Tensor) -> None:
        if self._plain_steps:
            loss.backward()
        else:
            self.accelerator.backward(loss)  # the fp16 grad scaler, ...

    def _trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def _no_sync(self) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        for module in (self.student, self.temperature_module):
            if module is not None:
                stack.enter_context(self.accelerator.no_sync(module))
        return stack


def _on(value, device) -> torch.Tensor:
    return torch.as_tensor(value, device=device)
