"""A byte-level text corpus that needs no network: the Python standard library's own source.

Files are the standard library's top-level ``*.py`` files in sorted order; every
``heldout_every``-th file is held out for evaluation, so evaluation text comes from files the
models never saw. Tokens are bytes (vocabulary 256). The corpus differs between Python
versions, so :attr:`ByteCorpus.digest` (a hash of the bytes themselves) is part of any cache key.
"""

from __future__ import annotations

import hashlib
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from ..losses._checks import check_count

VOCAB_SIZE = 256


@dataclass(frozen=True)
class ByteCorpus:
    train: torch.Tensor  # (N_train,) uint8
    heldout: torch.Tensor  # (N_heldout,) uint8
    train_files: tuple[str, ...]
    heldout_files: tuple[str, ...]

    @property
    def digest(self) -> str:
        """SHA-256 of the train and held-out bytes: changes whenever the text does."""
        hasher = hashlib.sha256(self.train.numpy().tobytes())
        hasher.update(self.heldout.numpy().tobytes())
        return hasher.hexdigest()


def stdlib_corpus(
    *, train_bytes: int = 2_000_000, heldout_bytes: int = 200_000, heldout_every: int = 10
) -> ByteCorpus:
    """The standard library's source as bytes, split by file into train and held-out text.

    >>> corpus = stdlib_corpus(train_bytes=5000, heldout_bytes=1000)
    >>> corpus.train.numel(), corpus.heldout.numel(), set(corpus.train_files) & set(corpus.heldout_files)
    (5000, 1000, set())
    """
    for name, value in (
        ("train_bytes", train_bytes),
        ("heldout_bytes", heldout_bytes),
        ("heldout_every", heldout_every),
    ):
        check_count(value, name, "a positive int")
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py"))
    if not files:
        raise FileNotFoundError(f"no *.py files in the standard library directory {root}")
    parts: dict[str, list[bytes]] = {"train": [], "heldout": []}
    names: dict[str, list[str]] = {"train": [], "heldout": []}
    budget = {"train": train_bytes, "heldout": heldout_bytes}
    for index, path in enumerate(files):
        split = "heldout" if index % heldout_every == heldout_every - 1 else "train"
        have = sum(map(len, parts[split]))
        if have >= budget[split]:
            continue
        parts[split].append(path.read_bytes()[: budget[split] - have])
        names[split].append(path.name)
    data = {
        split: torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)
        for split, chunks in parts.items()
    }
    return ByteCorpus(
        data["train"], data["heldout"], tuple(names["train"]), tuple(names["heldout"])
    )


class EpochBatches:
    """``num_batches`` batches per epoch drawn from a generator seeded by ``seed`` and the
    epoch (the Distiller calls ``set_epoch``), so two runs see the same data and each epoch
    other batches. Subclasses draw from :meth:`generator` in ``__iter__``."""

    def __init__(self, *, num_batches: int, seed: int = 0) -> None:
        self.num_batches, self.seed, self.epoch = num_batches, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Each epoch draws other batches."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches

    def generator(self) -> torch.Generator:
        """A CPU generator for the current epoch (a prime apart per epoch)."""
        return torch.Generator().manual_seed(self.seed + 100_003 * self.epoch)


class RandomWindows(EpochBatches):
    """Batches ``{"input_ids": (batch_size, block_size)}`` of random windows, ``num_batches``
    per epoch, seeded by ``seed`` and the epoch, so two runs see the same data."""

    def __init__(
        self,
        data: torch.Tensor,
        *,
        block_size: int,
        batch_size: int,
        num_batches: int,
        seed: int = 0,
    ):
        if data.numel() <= block_size:
            raise ValueError(
                f"the corpus ({data.numel()} bytes) must be longer than block_size={block_size}"
            )
        super().__init__(num_batches=num_batches, seed=seed)
        self.data, self.block_size, self.batch_size = data, block_size, batch_size

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        generator = self.generator()
        offsets = torch.arange(self.block_size)
        for _ in range(self.num_batches):
            starts = torch.randint(
                self.data.numel() - self.block_size, (self.batch_size, 1), generator=generator
            )
            yield {"input_ids": self.data[starts + offsets].long()}  # (B, T)


def sequential_windows(
    data: torch.Tensor, *, block_size: int, batch_size: int
) -> list[dict[str, torch.Tensor]]:
    """Non-overlapping windows covering ``data`` once (the tail shorter than a window is dropped)."""
    count = data.numel() // block_size
    windows = data[: count * block_size].long().view(count, block_size)  # (count, T)
    return [{"input_ids": windows[i : i + batch_size]} for i in range(0, count, batch_size)]


class WindowDataset(Dataset):
    """``count`` windows of ``block_size`` tokens at random offsets of ``data``, drawn once with
    ``seed``: a map-style dataset, so that a ``DataLoader`` shuffles it by epoch and Accelerate
    shards it over processes (:class:`RandomWindows` is an iterable: every process would read
    the same batches). Item ``i`` is ``{"input_ids": (block_size,)}``, plus ``prompt_lengths``
    (a 0-dim tensor) when ``prompt_length > 0``: the first ``prompt_length`` tokens are the
    prompt, the rest its completion.

    >>> data = WindowDataset(torch.arange(100, dtype=torch.uint8), block_size=8, prompt_length=3)
    >>> len(data), data[0]["input_ids"].shape, int(data[0]["prompt_lengths"])
    (12, torch.Size([8]), 3)
    """

    def __init__(
        self,
        data: torch.Tensor,
        *,
        block_size: int,
        count: int | None = None,
        prompt_length: int = 0,
        seed: int = 0,
    ) -> None:
        if data.numel() <= block_size:
            raise ValueError(
                f"the corpus ({data.numel()} tokens) must be longer than block_size={block_size}"
            )
        if not 0 <= prompt_length < block_size:
            raise ValueError(
                f"prompt_length must be in [0, block_size={block_size}), got {prompt_length}"
            )
        count = data.numel() // block_size if count is None else count
        generator = torch.Generator().manual_seed(seed)
        self.offsets = torch.randint(data.numel() - block_size + 1, (count,), generator=generator)
        self.data, self.block_size, self.prompt_length = data, block_size, prompt_length

    def __len__(self) -> int:
        return self.offsets.numel()

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        start = int(self.offsets[index])
        item = {"input_ids": self.data[start : start + self.block_size].long()}  # (T,)
        if self.prompt_length:
            item["prompt_lengths"] = torch.tensor(self.prompt_length)
        return item
