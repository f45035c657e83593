"""Tiny synthetic models and data shared by the trainer tests (and the 2-process worker)."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, TensorDataset

DIM, CLASSES = 8, 4


def mlp(seed: int, hidden: int = 32, dropout: float = 0.0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(DIM, hidden), torch.nn.ReLU(), torch.nn.Dropout(dropout),
        torch.nn.Linear(hidden, CLASSES),
    )  # fmt: skip


def teacher_mlp() -> torch.nn.Module:
    """A fixed random MLP with confident (sharp) logits, which labels :func:`points`."""
    teacher = mlp(1234)
    with torch.no_grad():
        teacher[-1].weight.mul_(8.0)
    return teacher


def points(n: int = 256, seed: int = 0, ignore_every: int = 0) -> TensorDataset:
    """``n`` random points labelled by a fixed random teacher; every ``ignore_every``-th label
    is -100 (ignored), so micro-batches have uneven valid counts."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(n, DIM, generator=generator)
    with torch.no_grad():
        labels = teacher_mlp()(inputs).argmax(-1)
    if ignore_every:
        labels[::ignore_every] = -100
    return TensorDataset(inputs, labels)


def loader(dataset: TensorDataset, batch_size: int, shuffle: bool = False) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle)


def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def partly_labelled(size: int = 96, every: int = 2) -> tuple[TensorDataset, TensorDataset]:
    """User data for configs (``trainkit:partly_labelled``): ``(train, eval)`` where every
    ``every``-th training label is -100 (unlabelled); the eval labels are all known."""
    train, evaluation = points(size), points(size // 2, seed=1)
    inputs, labels = train.tensors
    labels = labels.clone()
    labels[::every] = -100
    return TensorDataset(inputs, labels), evaluation
