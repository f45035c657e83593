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

from .._files import write_text

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
        kept = [
            line
            for line in self.path.read_text().splitlines()
            if line.strip() and json.loads(line)["step"] <= step
        ]
        write_text(self.path, "".join(line + "\n" for line in kept))
        self._file = self.path.open("a")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None


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
