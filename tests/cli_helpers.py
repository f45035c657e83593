"""User code that configs in the CLI tests name as ``package.module:callable``."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset


def tiny_model(width: int = 8, num_classes: int = 3) -> nn.Module:
    """A model from user code: ``(B, 4) -> (B, num_classes)``."""
    return nn.Sequential(nn.Linear(4, width), nn.ReLU(), nn.Linear(width, num_classes))


def tiny_data(size: int = 48, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """Three separable blobs in 4-D: ``(train, eval)`` datasets of ``(inputs, label)``."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(size) % 3
    inputs = torch.randn(size, 4, generator=generator) * 0.3
    inputs[torch.arange(size), labels] += 2.0
    cut = size * 3 // 4
    return TensorDataset(inputs[:cut], labels[:cut]), TensorDataset(inputs[cut:], labels[cut:])


NOT_CALLABLE = 3


def ranked_data(size: int = 48, marks: str = ".") -> tuple[TensorDataset, TensorDataset]:
    """:func:`tiny_data`, and a file ``rank-<RANK>-of-<WORLD_SIZE>`` in ``marks`` saying which
    process of how many built it (the launchers set RANK and WORLD_SIZE; one process: 0 of 1)."""
    import os
    from pathlib import Path

    rank, world = os.environ.get("RANK", "0"), os.environ.get("WORLD_SIZE", "1")
    Path(marks, f"rank-{rank}-of-{world}").write_text(str(os.getpid()))
    return tiny_data(size)
