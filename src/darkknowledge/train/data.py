"""Endless micro-batches with a position (epoch, batch index) that a checkpoint can restore."""

from __future__ import annotations

import itertools
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import send_to_device
from torch.utils.data import DataLoader

_END = object()


class DataStream:
    """Yields batches of ``data`` epoch after epoch, starting at ``(epoch, index)``.

    Each epoch calls ``data.set_epoch(epoch)`` when it exists (Accelerate's seedable sampler
    reshuffles with seed ``seed + epoch``), so a resumed run sees the same batches. Opening an
    epoch's iterator runs under ``fork_rng``: a DataLoader draws its worker seed from the global
    RNG there, and a resumed run opens its iterator at another moment than the original one.
    """

    def __init__(
        self, data: Any, accelerator: Accelerator, *, epoch: int = 0, index: int = 0
    ) -> None:
        self.data, self.accelerator = data, accelerator
        self.epoch, self.index = epoch, index
        self._iterator = None

    def _open(self) -> None:
        with torch.random.fork_rng(devices=[]):
            if hasattr(self.data, "set_epoch"):
                self.data.set_epoch(self.epoch)
            if self.index and isinstance(self.data, DataLoader):
                iterator = iter(self.accelerator.skip_first_batches(self.data, self.index))
            else:
                iterator = itertools.islice(iter(self.data), self.index, None)
            first = next(iterator, _END)
        self._iterator = iter(()) if first is _END else itertools.chain([first], iterator)

    def next(self) -> Any:
        while True:
            if self._iterator is None:
                self._open()
            batch = next(self._iterator, _END)
            if batch is not _END:
                self.index += 1
                if not isinstance(self.data, DataLoader):  # a prepared DataLoader places its own
                    batch = send_to_device(batch, self.accelerator.device)
                return batch
            if self.index == 0:
                raise ValueError(
                    "train_data yielded no batches; pass a non-empty DataLoader or list of batches"
                )
            self.epoch, self.index, self._iterator = self.epoch + 1, 0, None
