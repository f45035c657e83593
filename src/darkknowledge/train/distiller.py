"""``Distiller``: the training loop, on Hugging Face Accelerate.

Accelerate places the student, optimizer and data, runs mixed precision and DDP/FSDP. The
teacher never goes through ``accelerator.prepare``: it is frozen structurally (eval mode, no
``requires_grad``, forward under ``torch.inference_mode()``) and may sit in its own dtype and
device. All math lives in :mod:`darkknowledge.losses`; this file only wires it.
"""

from __future__ import annotations

import contextlib
import signal as signal_module
import sys
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from accelerate import DistributedType
from accelerate.utils import gather_object, send_to_device, set_seed
from tqdm.auto import tqdm

from ..losses import DistillationLoss
from . import checkpoint as ckpt
from .data import DataStream
from .distributed import global_count_and_stop, reduce_sum, step_normalizer
from .logging import MetricLogger, PendingRecord, Throughput
from .setup import (
    build_optimizer,
    freeze_teacher,
    make_accelerator,
    student_config_dict,
    validate_arguments,
)
from .signals import combine_grad_norms
from .task import ClassificationTask, Task

Callback = Callable[["Distiller", "dict | None"], None]


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
        learning_rate: float | Callable[[int], float] = 1e-3,
        weight_decay: float = 0.0,
        max_steps: int,
        grad_accum_steps: int = 1,
        max_grad_norm: float | None = None,
        mixed_precision: str = "no",
        eval_data: Iterable | None = None,
        eval_every: int = 0,
        save_every: int = 0,
        output_dir: str | None = None,
        log_every: int = 1,
        seed: int = 0,
        progress: bool = True,
        teacher_dtype: torch.dtype | str | None = None,
        callbacks: Iterable[Callback] = (),
        teacher_device: torch.device | str | None = None,
        student_config: dict | None = None,
    ) -> None:
        self.task = task if task is not None else ClassificationTask()
        loss_options = dict(loss_options or {})
        validate_arguments({**locals(), "task": self.task})
        self.max_steps, self.grad_accum_steps = max_steps, grad_accum_steps
        self.max_grad_norm, self.learning_rate = max_grad_norm, learning_rate
        self.eval_data, self.eval_every = eval_data, eval_every
        self.save_every, self.log_every = save_every, log_every
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.progress, self.callbacks = progress, tuple(callbacks)
        self.student_config = student_config
        self.alpha = 0.0 if teacher is None else alpha  # no teacher: labels only, the baseline

        set_seed(seed)  # python, numpy, torch, CUDA; also the seed of the data sampler below
        self.accelerator = accelerator = make_accelerator(mixed_precision)
        self.teacher = (
            None
            if teacher is None
            else freeze_teacher(teacher, teacher_dtype, teacher_device or accelerator.device)
        )
        learned = isinstance(temperature, torch.nn.Module) and teacher is not None
        temperature_module = temperature if learned else None  # without a teacher: no soft term
        optimizer = build_optimizer(
            optimizer, student, temperature_module, learning_rate, weight_decay
        )
        # The teacher is not prepared: DDP would wrap it and all-reduce nothing, FSDP shard it.
        prepared = accelerator.prepare(
            student,
            optimizer,
            train_data,
            *([temperature_module] if temperature_module is not None else []),
        )
        self.student, self.optimizer, self.train_data = prepared[:3]
        self.temperature_module = prepared[3] if temperature_module is not None else None
        self.loss_fn = None
        if teacher is not None:
            self.loss_fn = DistillationLoss(
                temperature=self.temperature_module if temperature_module is not None else temperature,
                alpha=alpha, **loss_options,
            )  # fmt: skip
        self.step, self._epoch, self._batch_index = 0, 0, 0
        plain = (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)
        self._plain_steps = accelerator.scaler is None and accelerator.distributed_type in plain
        self._stop_signal: int | None = None

    # ---- the loop ------------------------------------------------------------------------

    def fit(self, resume: bool = False) -> TrainResult:
        """Train to ``max_steps``; with ``resume=True`` continue from the latest checkpoint in
        ``output_dir`` (or start afresh when there is none)."""
        acc = self.accelerator
        logger = MetricLogger(self.output_dir, enabled=acc.is_main_process)
        if resume:
            self._resume(logger)
        stream = DataStream(self.train_data, acc, epoch=self._epoch, index=self._batch_index)
        self._history, self._last_train, self._eval_metrics, self._eval_step = [], {}, None, None
        self._window, self._peers_stop, self._pending = Throughput(self.step), None, None
        self._logger = logger
        show = self.progress and acc.is_main_process and sys.stderr.isatty()
        bar = tqdm(total=self.max_steps, initial=self.step, disable=not show)
        handlers = self._install_signal_handlers()
        self.student.train()
        try:
            while self.step < self.max_steps:
                self._stop_if_signalled(stream)
                pending = self.train_step(stream)
                self._after_step(pending, stream, logger, bar)
            self._flush(logger)
            if self.eval_data is not None and self._eval_step != self.step:
                self._log_eval(logger)
            if self.output_dir is not None:
                self.save_checkpoint(stream)
        finally:
            self._restore_signal_handlers(handlers)
            bar.close()
            logger.close()
        final = {n: v for n, v in self._last_train.items() if n != "kind"}
        final.update(
            step=self.step, **{f"eval_{n}": v for n, v in (self._eval_metrics or {}).items()}
        )
        return TrainResult(self._history, final)

    def train_step(self, stream: DataStream) -> PendingRecord | None:
        """One optimizer update over ``grad_accum_steps`` micro-batches; a record on log steps."""
        acc, k, step = self.accelerator, self.grad_accum_steps, self.step
        log_now = (step + 1) % self.log_every == 0
        # All k micro-batches first: the normaliser needs the valid count of the whole update.
        batches = [stream.next() for _ in range(k)]
        counts = torch.stack([_on(self.task.count_valid(b), acc.device) for b in batches])  # (k,)
        stopping = self._stop_signal is not None
        global_count, self._peers_stop = global_count_and_stop(acc, counts.sum(), stopping)
        # Each process divides by global/world; DDP averages, so the update is one big batch's.
        normalizer = step_normalizer(acc, global_count)
        for group in self.optimizer.param_groups:
            group["lr"] = _at(self.learning_rate, step)
        outputs = []
        for i, batch in enumerate(batches):
            teacher_out = self._teacher_outputs(batch)
            # DDP all-reduces gradients after each backward; only the last micro-batch needs it.
            with self._no_sync() if i < k - 1 else contextlib.nullcontext():
                out = self.task.compute_loss(
                    self.student, batch, teacher_out, loss_fn=self.loss_fn, step=step,
                    normalizer=normalizer, signal=log_now,
                )  # fmt: skip
                self._backward(out.loss.total)  # summed over micro-batches, never divided by k
            outputs.append(out)
        grad_norm = None
        if self.max_grad_norm is not None:
            grad_norm = acc.clip_grad_norm_(self._trainable_parameters(), self.max_grad_norm)
        self._optimizer_step()
        self.step += 1
        self._window.add(global_count)
        return self._train_record(step, outputs, grad_norm, stream) if log_now else None

    def _teacher_outputs(self, batch: Any) -> Any:
        if self.teacher is None:
            return None
        with torch.inference_mode():
            outputs = self.task.teacher_outputs(self.teacher, batch)
        return _out_of_inference_mode(outputs)  # autograd may need to save them for backward

    def _after_step(self, pending, stream: DataStream, logger, bar) -> None:
        # The record of the previous log step is logged now: its numbers were copied to the host
        # behind that step's work, so reading them does not drain the GPU's queue.
        record = self._flush(logger)
        self._pending = pending
        eval_now = self.eval_every and self.step % self.eval_every == 0
        save_now = (
            self.save_every and self.step % self.save_every == 0 and self.step < self.max_steps
        )
        if eval_now or save_now:
            record = self._flush(logger) or record
        if record is not None:
            bar.set_postfix(loss=f"{record['total']:.4g}", refresh=False)
        bar.update(1)
        if eval_now:
            self._log_eval(logger)
        if save_now:
            self.save_checkpoint(stream)
        for callback in self.callbacks:
            callback(self, record)

    def _stop_if_signalled(self, stream: DataStream) -> None:
        """After SIGINT/SIGTERM: save at this step boundary and leave. With several processes the
        flag travels in the previous step's all-reduce, so all of them stop at the same step."""
        acc = self.accelerator
        if acc.num_processes == 1:
            stop = self._stop_signal is not None
        else:
            stop = self._peers_stop is not None and bool(self._peers_stop)
        if not stop:
            return
        self._flush(self._logger)
        if self.output_dir is not None:
            self.save_checkpoint(stream)
        if self._stop_signal == signal_module.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + int(self._stop_signal or signal_module.SIGTERM))

    def _train_record(
        self, step: int, outputs: list, grad_norm, stream: DataStream
    ) -> PendingRecord:
        acc = self.accelerator
        parts = torch.stack([torch.stack(o.loss).detach().float() for o in outputs]).sum(0)
        # (3,): total, soft, hard, summed over the micro-batches
        # Each process's parts carry 1/(global/world): their mean over processes is the global mean.
        parts = reduce_sum(acc, parts) / acc.num_processes
        soft_norm = combine_grad_norms([o.soft_grad_norm for o in outputs], acc.device)
        hard_norm = combine_grad_norms([o.hard_grad_norm for o in outputs], acc.device)
        if soft_norm is not None and acc.num_processes > 1:
            # The global loss is the mean of the processes' losses: its gradient at all logits is
            # the processes' gradients / world, so the norm is sqrt(Σ_r norm_r²) / world.
            norms = (
                reduce_sum(acc, torch.stack([soft_norm, hard_norm]) ** 2).sqrt() / acc.num_processes
            )
            soft_norm, hard_norm = norms[0], norms[1]
        temperature = outputs[0].temperature
        if temperature is None and self.loss_fn is not None and self.temperature_module is None:
            temperature = float(self.loss_fn.current_temperature(step))
        steps, seconds, positions = self._window.take(self.step)
        record = {
            "kind": "train", "step": self.step, "epoch": stream.epoch,
            "total": parts[0], "soft": parts[1], "hard": parts[2], "temperature": temperature,
            "alpha": float(_at(self.alpha, step)), "lr": float(_at(self.learning_rate, step)),
            "soft_grad_norm": soft_norm, "hard_grad_norm": hard_norm,
        }  # fmt: skip
        if grad_norm is not None:
            record["grad_norm"] = grad_norm
        record.update(steps_per_s=steps / seconds, positions_per_s=positions / seconds)
        return PendingRecord(record)

    def _flush(self, logger: MetricLogger) -> dict | None:
        """Log the pending train record, if any (its numbers are waited for)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        record = pending.resolve()
        logger.log(record)
        self._history.append(record)
        self._last_train = record
        return record

    # ---- evaluation ----------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, data: Iterable | None = None) -> dict:
        """Means over ``data`` (default: ``eval_data``) of the task's ``eval_sums``, over all
        processes: ``loss``, ``accuracy`` (from ``correct``) and ``count`` for classifiers."""
        data = self.eval_data if data is None else data
        if data is None:
            raise ValueError(
                "evaluate needs data: pass evaluate(data=...) or Distiller(eval_data=...)"
            )
        acc = self.accelerator
        was_training = self.student.training
        self.student.eval()
        sums: dict[str, float] = {}
        try:
            for i, batch in enumerate(data):
                if (
                    i % acc.num_processes != acc.process_index
                ):  # process r takes batches r, r+W, ...
                    continue
                for name, value in self.task.eval_sums(
                    self.student, send_to_device(batch, acc.device)
                ).items():
                    sums[name] = sums.get(name, 0.0) + float(value)
        finally:
            self.student.train(was_training)
        if acc.num_processes > 1:
            gathered, sums = gather_object([sums]), {}
            for part in gathered:
                for name, value in part.items():
                    sums[name] = sums.get(name, 0.0) + value
        count = sums.get("count", 0.0)
        metrics = {
            ("accuracy" if n == "correct" else n): v / max(count, 1.0)
            for n, v in sums.items()
            if n != "count"
        }
        return {**metrics, "count": count}

    def _log_eval(self, logger: MetricLogger) -> None:
        self._eval_metrics, self._eval_step = self.evaluate(), self.step
        record = {"kind": "eval", "step": self.step, **self._eval_metrics}
        logger.log(record)
        self._history.append(record)

    # ---- checkpoints ---------------------------------------------------------------------

    def save_checkpoint(self, stream: DataStream | None = None) -> Path:
        """Write ``<output_dir>/checkpoints/step-<step>/`` atomically (see
        :mod:`darkknowledge.train.checkpoint`); every process must call it. ``stream`` gives the
        data position (the next batch to read)."""
        if self.output_dir is None:
            raise ValueError("save_checkpoint needs output_dir; pass Distiller(output_dir=...)")
        if stream is not None:
            self._epoch, self._batch_index = stream.epoch, stream.index
        acc = self.accelerator
        final = ckpt.checkpoint_dir(self.output_dir, self.step)
        tmp = ckpt.temp_dir_for(final)
        student_state = acc.get_state_dict(self.student)  # a collective under FSDP: all processes
        if acc.is_main_process:
            tmp.mkdir(parents=True, exist_ok=True)
            ckpt.write_safetensors(
                tmp / "student.safetensors", ckpt.plain_state_dict(student_state)
            )
            if self.temperature_module is not None:
                state = acc.unwrap_model(self.temperature_module).state_dict()
                ckpt.write_safetensors(
                    tmp / "temperature.safetensors", ckpt.plain_state_dict(state)
                )
            tensors: dict[str, torch.Tensor] = {}
            ckpt.write_json(
                tmp / "optimizer.json", ckpt.encode_tree(self.optimizer.state_dict(), tensors)
            )
            ckpt.write_safetensors(tmp / "optimizer.safetensors", tensors)
            scaler = acc.scaler.state_dict() if acc.scaler is not None else None
            ckpt.write_json(tmp / "state.json", {
                "step": self.step, "epoch": self._epoch, "batch_index": self._batch_index,
                "world_size": acc.num_processes, "scaler": scaler,
            })  # fmt: skip
        acc.wait_for_everyone()  # the directory exists before the other processes write into it
        rng_json, rng_tensors = ckpt.rng_state()
        ckpt.write_json(tmp / f"rng-rank{acc.process_index}.json", rng_json)
        ckpt.write_safetensors(tmp / f"rng-rank{acc.process_index}.safetensors", rng_tensors)
        acc.wait_for_everyone()
        if acc.is_main_process:
            ckpt.publish(tmp, final)
        acc.wait_for_everyone()
        return final

    def _resume(self, logger: MetricLogger) -> None:
        if self.output_dir is None:
            raise ValueError("fit(resume=True) needs output_dir, where the checkpoints are")
        path = ckpt.latest_checkpoint(self.output_dir)
        if path is None:
            return  # nothing saved yet: a fresh start, so one command line serves every restart
        acc = self.accelerator
        state = ckpt.read_json(path / "state.json")
        if state["world_size"] != acc.num_processes:
            raise ValueError(
                f"checkpoint {path} was written by {state['world_size']} processes, this run has "
                f"{acc.num_processes}; resume with the same number of processes"
            )
        acc.unwrap_model(self.student).load_state_dict(
            ckpt.read_safetensors(path / "student.safetensors")
        )
        if self.temperature_module is not None:
            acc.unwrap_model(self.temperature_module).load_state_dict(
                ckpt.read_safetensors(path / "temperature.safetensors")
            )
        tensors = ckpt.read_safetensors(path / "optimizer.safetensors")
        self.optimizer.load_state_dict(
            ckpt.decode_tree(ckpt.read_json(path / "optimizer.json"), tensors)
        )
        if state["scaler"] is not None and acc.scaler is not None:
            acc.scaler.load_state_dict(state["scaler"])
        rank = acc.process_index
        ckpt.set_rng_state(
            ckpt.read_json(path / f"rng-rank{rank}.json"),
            ckpt.read_safetensors(path / f"rng-rank{rank}.safetensors"),
        )
        self.step, self._epoch, self._batch_index = (
            state["step"],
            state["epoch"],
            state["batch_index"],
        )
        logger.truncate_after(self.step)

    def export_student(self, path: str | Path, *, config: dict | None = None) -> Path:
        """Write the student alone: ``<path>/model.safetensors`` and, when the student has a
        config (``config``, ``student_config``, or a Hugging Face ``model.config``),
        ``<path>/config.json``. Every process must call it; the main one writes."""
        acc, path = self.accelerator, Path(path)
        state = acc.get_state_dict(self.student)
        if acc.is_main_process:
            path.mkdir(parents=True, exist_ok=True)
            ckpt.write_safetensors(path / "model.safetensors", ckpt.plain_state_dict(state))
            config = student_config_dict(
                acc.unwrap_model(self.student), config or self.student_config
            )
            if config is not None:
                ckpt.write_json(path / "config.json", config)
        acc.wait_for_everyone()
        return path

    # ---- small helpers -------------------------------------------------------------------

    def _backward(self, loss: torch.Tensor) -> None:
        if self._plain_steps:
            loss.backward()
        else:
            self.accelerator.backward(loss)  # grad scaler (fp16), DeepSpeed, ...

    def _optimizer_step(self) -> None:
        # Accelerate's optimizer wrapper probes for an optional package on every step() and
        # inspects a signature on every zero_grad() (together about 0.5 ms of Python in
        # accelerate 1.15); without a grad scaler or XLA it does nothing else.
        optimizer = self.optimizer.optimizer if self._plain_steps else self.optimizer
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def _trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def _no_sync(self) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        for module in (self.student, self.temperature_module):
            if module is not None:
                stack.enter_context(self.accelerator.no_sync(module))
        return stack

    def _install_signal_handlers(self) -> dict:
        """SIGINT/SIGTERM set a flag; the loop saves a checkpoint at the next step and exits."""
        if threading.current_thread() is not threading.main_thread():
            return {}  # signal handlers can only be installed from the main thread

        def handler(signum, frame):
            self._stop_signal = signum

        self._stop_signal = None
        return {
            s: signal_module.signal(s, handler)
            for s in (signal_module.SIGINT, signal_module.SIGTERM)
        }

    def _restore_signal_handlers(self, handlers: dict) -> None:
        for signum, previous in handlers.items():
            signal_module.signal(signum, previous)


def _on(value, device) -> torch.Tensor:
    return torch.as_tensor(value, device=device)


def _at(value, step: int) -> float:
    """A float stays a float; a schedule (any callable) is evaluated at ``step``."""
    return value(step) if callable(value) else value


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
