"""Metric records to ``<output_dir>/metrics.jsonl`` (one flushed line per record) and TensorBoard.

A record is a flat dict with ``kind`` (``"train"`` or ``"eval"``) and ``step``; numbers go to
TensorBoard as ``<kind>/<name>`` when ``torch.utils.tensorboard`` can be imported.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from .._files import write_text, writing
from .distributed import reduce_sum
from .grad_meter import combine_grad_norms

METRICS_FILE = "metrics.jsonl"


class MetricLogger:
    """Appends records; does nothing on processes other than the main one (``enabled=False``)."""

    def __init__(self, output_dir: str | os.PathLike | None, *, enabled: bool = True) -> None:
        self.path = Path(output_dir) / METRICS_FILE if output_dir is not None and enabled else None
        self._file = None
        self._writer = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a")
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                SummaryWriter = None
            if SummaryWriter is not None:
                self._writer = SummaryWriter(str(Path(output_dir) / "tensorboard"))

    def log(self, record: dict[str, Any]) -> None:
        if self._file is None:
            return
        with writing(self.path):  # a full disk: DiskFull naming metrics.jsonl
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()  # a killed run keeps every line written so far
        if self._writer is not None:
            for name, value in record.items():
                if (
                    isinstance(value, int | float)
                    and not isinstance(value, bool)
                    and name != "step"
                ) and math.isfinite(value):
                    self._writer.add_scalar(f"{record['kind']}/{name}", value, record["step"])

    def truncate_after(self, step: int) -> None:
        """Drop records after ``step`` (a resumed run rewrites the steps it repeats)."""
        if self.path is None or not self.path.exists():
            return
        self._file.close()
        kept = [line for line in self.path.read_text().splitlines() if _step_of(line) <= step]
        write_text(self.path, "".join(line + "\n" for line in kept))
        self._file = self.path.open("a")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _step_of(line: str) -> float:
    """A record's step; a blank or half-written line (the run was killed while writing it)
    counts as after every step, so it is dropped."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


class Throughput:
    """Steps, seconds and valid positions (samples, tokens) since the last log step."""

    def __init__(self, step: int) -> None:
        self.start_step, self.start_time, self.count = step, time.perf_counter(), 0.0

    def add(self, global_count: torch.Tensor) -> None:
        self.count = self.count + global_count  # a tensor: no host sync here

    def take(self, step: int) -> tuple[int, float, torch.Tensor | float]:
        now = time.perf_counter()
        window = (step - self.start_step, max(now - self.start_time, 1e-9), self.count)
        self.start_step, self.start_time, self.count = step, now, 0.0
        return window


class PendingRecord:
    """A log record whose numbers may still be tensors on the GPU.

    Reading them at once (``.item()``) would wait for the whole queue of work and leave the GPU
    idle while Python prepares the next step, on every log step. Instead they are copied to pinned
    memory behind the step's work and read one step later (:meth:`resolve`), when they have long
    arrived. Plain values pass through; the record keeps its key order.
    """

    def __init__(self, record: dict[str, Any]) -> None:
        self.record = dict(record)
        self.names = [n for n, v in record.items() if isinstance(v, torch.Tensor)]
        self.host, self.event = None, None
        if self.names:
            device = record[self.names[0]].device
            values = [record[n].detach().float().reshape(()).to(device) for n in self.names]
            packed = torch.stack(values)  # (len(names),)
            if packed.is_cuda:
                self.host = torch.empty(packed.shape, pin_memory=True)
                self.host.copy_(packed, non_blocking=True)
                self.event = torch.cuda.Event()
                self.event.record()
            else:
                self.host = packed

    def resolve(self) -> dict[str, Any]:
        if self.event is not None:
            self.event.synchronize()  # waits for this record's step only, not for the queue
        if self.names:
            self.record.update(zip(self.names, self.host.tolist()))
        return self.record


def train_record(
    accelerator: Any,
    outputs: list,
    *,
    step: int,
    epoch: int,
    values: dict[str, Any],
    grad_norm: torch.Tensor | None,
    window: tuple[int, float, torch.Tensor | float],
) -> PendingRecord:
    """The log record of one optimizer step from its micro-batches' ``TaskOutput``s.

    ``values`` holds the temperature, alpha and lr in force; ``window`` is
    :meth:`Throughput.take`'s ``(steps, seconds, positions)``. Nothing here waits for the device.
    """
    parts = torch.stack([torch.stack(o.loss).detach().float() for o in outputs]).sum(0)
    # (3,): total, soft, hard, summed over the micro-batches. Each process's parts carry
    # 1/(global/world): their mean over processes is the global mean.
    parts = reduce_sum(accelerator, parts) / accelerator.num_processes
    device, world = accelerator.device, accelerator.num_processes
    soft_norm = combine_grad_norms([o.soft_grad_norm for o in outputs], device)
    hard_norm = combine_grad_norms([o.hard_grad_norm for o in outputs], device)
    if soft_norm is not None and world > 1:
        # The global loss is the mean of the processes' losses: its gradient at all logits is
        # the processes' gradients / world, so the norm is sqrt(Σ_r norm_r²) / world.
        norms = reduce_sum(accelerator, torch.stack([soft_norm, hard_norm]) ** 2).sqrt() / world
        soft_norm, hard_norm = norms[0], norms[1]
    record = {
        "kind": "train", "step": step, "epoch": epoch,
        "total": parts[0], "soft": parts[1], "hard": parts[2], **values,
        "soft_grad_norm": soft_norm, "hard_grad_norm": hard_norm,
    }  # fmt: skip
    if grad_norm is not None:
        record["grad_norm"] = grad_norm
    record.update(_task_logs(accelerator, outputs))
    steps, seconds, positions = window
    record.update(steps_per_s=steps / seconds, positions_per_s=positions / seconds)
    return PendingRecord(record)


def _task_logs(accelerator: Any, outputs: list) -> dict[str, torch.Tensor]:
    """The tasks' ``TaskOutput.logs``, summed over micro-batches and averaged over processes
    like the loss parts (they carry the same normalizer)."""
    names = list(outputs[0].logs or {})
    if not names:
        return {}
    device = accelerator.device
    values = torch.stack(
        [
            torch.stack([torch.as_tensor(o.logs[n], device=device).float() for n in names])
            for o in outputs
        ]
    ).sum(0)  # (len(names),)
    values = reduce_sum(accelerator, values.detach()) / accelerator.num_processes
    return dict(zip(names, values))
