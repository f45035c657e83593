"""Training from a teacher cache: the teacher's stand-in, the keyed dataset and the loader.

    teacher = dk.cache.CachedTeacher("cache/")                 # no weights, no forward
    loader = dk.cache.cached_loader(dataset, teacher.cache, batch_size=16)
    dk.Distiller(student, teacher, loader, task=dk.llm.CachedCausalLMTask(), ...).fit()

Every example gets its cached targets by its **sample key** (its ``id``, else the SHA-256 of its
tokens: the key the capture recorded), never by its position in the loop, and the entry's
content hash is compared with the example's own, so a shuffled, resumed, sharded or
multi-epoch loop always reads the targets of the tokens it trains on. The lookups (a dictionary
access for a cache read into memory, else a memory-map slice per sequence) and the padding run
in the DataLoader's worker processes, ahead of the training step (``num_workers``,
``prefetch_factor``), so they overlap the student's compute; ``num_workers=0`` runs them in the
training process, which measured faster when a CPU trains (benchmarks/results/teacher_cache.md).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..llm.cached_task import TEACHER_IDS, TEACHER_VALUES
from ..llm.collate import PaddingCollator
from .hashing import dataset_fingerprint, read_example
from .reader import TeacherCache

_VALUE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
# in_memory=None reads a cache into memory when its shards hold at most this many bytes.
IN_MEMORY_BYTES = 2**30


class CachedTeacher(nn.Module):
    """The teacher of a :class:`darkknowledge.Distiller` whose targets come from a cache.

    It has no weights and no forward pass: the targets arrive with each batch
    (:func:`cached_loader`) and :class:`darkknowledge.llm.CachedCausalLMTask` reads them. It holds
    the :class:`TeacherCache` (``.cache``), whose manifest the task checks against the student.

    Args:
        cache: a :class:`TeacherCache` or the path of a cache folder.
    """

    def __init__(self, cache: TeacherCache | str | Path) -> None:
        super().__init__()
        if isinstance(cache, str | Path):
            cache = TeacherCache(cache)
        if not isinstance(cache, TeacherCache):
            raise TypeError(
                f"cache must be a TeacherCache or a folder path, got {type(cache).__name__}"
            )
        self.cache = cache

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(
            "a CachedTeacher has no forward pass: its targets come with each batch; train with "
            "task=dk.llm.CachedCausalLMTask() on batches from dk.cache.cached_loader"
        )

    def extra_repr(self) -> str:
        return repr(self.cache)


class CachedTargets(Dataset):
    """``dataset[i]`` with its cached targets, looked up by the example's sample key.

    ``item = {**example (without "id"), "teacher_ids": (T, width) int32, "teacher_values":
    (T, width)}`` in the cache's value dtype (float16 or bfloat16: exactly what is stored).

    Args:
        dataset: a sequence of examples (dicts with ``input_ids`` ``(T,)``, optionally
            ``attention_mask`` and ``id``), as given to ``write_teacher_cache``.
        cache: the :class:`TeacherCache` captured from it.
        check_dataset: refuse a cache whose dataset fingerprint differs from ``dataset``'s
            (reads every example once). False allows training on part of the captured data; every
            lookup is still checked by key and content hash.
        in_memory: read every entry once, here, and look entries up in memory (on the demo
            cache about 30 µs a sequence instead of about 180 µs through the memory map);
            None: when the shards hold at most ``IN_MEMORY_BYTES`` (1 GiB).

    The cache is verified (every shard's SHA-256) and its key index built here, once, so
    DataLoader workers inherit both (and the entries read into memory) instead of each reading
    the whole cache again.
    """

    def __init__(
        self,
        dataset: Sequence[Mapping[str, Any]],
        cache: TeacherCache,
        *,
        check_dataset: bool = True,
        in_memory: bool | None = None,
    ) -> None:
        if not isinstance(cache, TeacherCache):
            raise TypeError(f"cache must be a TeacherCache, got {type(cache).__name__}")
        if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
            raise TypeError(
                f"dataset must be a sequence of examples (len() and [i]), got {type(dataset).__name__}"
            )
        if check_dataset:
            cache.check_compatible(dataset_fingerprint=dataset_fingerprint(dataset))
        if cache.verify:
            cache.verify_all()
        cache.keys()  # the key index, built before workers start
        self.dataset, self.cache = dataset, cache
        self.values_dtype = _VALUE_DTYPES[cache.manifest["values"]["dtype"]]
        if in_memory is None:
            in_memory = sum(shard["bytes"] for shard in cache.manifest["shards"]) <= IN_MEMORY_BYTES
        self.in_memory = bool(in_memory)
        self._entries: list[tuple[torch.Tensor, torch.Tensor, str]] = []
        self._index: dict[str, int] = {}
        for index in range(len(cache)) if self.in_memory else ():
            entry = cache[index]
            self._index.setdefault(entry["key"], index)  # the first of a repeated key, as get()
            self._entries.append(self._compact(entry))

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = self.dataset[index]
        parsed = read_example(example, index, self.cache.vocab_size)
        try:
            if self.in_memory:
                ids, values, digest = self._entries[self._index[parsed.key]]
            else:
                ids, values, digest = self._compact(self.cache.get(parsed.key))
        except KeyError:
            raise KeyError(
                f"dataset[{index}] (key {parsed.key!r}) is not in the teacher cache at "
                f"{self.cache.path}; capture the cache from this dataset"
            ) from None
        if digest != parsed.content_hash:
            raise ValueError(
                f"dataset[{index}] (key {parsed.key!r}) holds other tokens than the teacher cache "
                f"at {self.cache.path} captured under that key; recapture the cache"
            )
        item = {name: value for name, value in example.items() if name != "id"}
        item[TEACHER_IDS], item[TEACHER_VALUES] = ids, values  # (T, width) each
        return item

    def _compact(self, entry: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, str]:
        """int32 ids and values in the stored dtype (exact: stored so), and the content hash."""
        return (
            entry["ids"].to(torch.int32),
            entry["values"].to(self.values_dtype),
            entry["content_hash"],
        )


class CachedCollator:
    """Collate examples with cached targets: the tokens by ``collate`` (default
    :class:`darkknowledge.llm.PaddingCollator`), the targets padded to the batch's length on the
    same side (id -1, value 0: no soft term there) into ``(B, L, width)``."""

    def __init__(self, collate: Callable[[list], Any] | None = None) -> None:
        self.collate = collate if collate is not None else PaddingCollator()
        self.padding_side = getattr(self.collate, "padding_side", "right")

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        targets = [(example[TEACHER_IDS], example[TEACHER_VALUES]) for example in examples]
        rest = [
            {k: v for k, v in example.items() if k not in (TEACHER_IDS, TEACHER_VALUES)}
            for example in examples
        ]
        batch = self.collate(rest)
        if not isinstance(batch, Mapping) or "input_ids" not in batch:
            raise TypeError(
                f"the collate function must return a dict with 'input_ids', got {type(batch).__name__}"
            )
        length = batch["input_ids"].shape[-1]
        return {
            **batch,
            TEACHER_IDS: torch.stack([self._pad(ids, length, -1) for ids, _ in targets]),
            TEACHER_VALUES: torch.stack([self._pad(values, length, 0) for _, values in targets]),
        }

    def _pad(self, rows: torch.Tensor, length: int, fill: float) -> torch.Tensor:
        """``(T, width)`` -> ``(length, width)``."""
        if rows.shape[0] > length:
            raise ValueError(
                f"cached targets of {rows.shape[0]} positions do not fit a batch of length {length}"
            )
        padding = rows.new_full((length - rows.shape[0], rows.shape[1]), fill)
        return torch.cat((padding, rows) if self.padding_side == "left" else (rows, padding))


def cached_loader(
    dataset: Sequence[Mapping[str, Any]],
    cache: TeacherCache | str | Path,
    *,
    batch_size: int,
    shuffle: bool = True,
    num_workers: int = 1,
    prefetch_factor: int = 4,
    collate_fn: Callable[[list], Any] | None = None,
    drop_last: bool = False,
    check_dataset: bool = True,
    in_memory: bool | None = None,
    generator: torch.Generator | None = None,
) -> DataLoader:
    """A DataLoader of batches with their cached targets, for ``CachedCausalLMTask``.

    Batches are ``collate_fn``'s (default ``PaddingCollator()``: ``input_ids``,
    ``attention_mask`` ``(B, L)``, ...) plus ``teacher_ids`` and ``teacher_values``
    ``(B, L, width)``. ``num_workers`` processes look the targets up ahead of the training step
    (each keeps ``prefetch_factor`` batches ready); ``num_workers=0`` looks them up in the
    training process. The Distiller shards the loader over processes and reshuffles it with
    its seed, so resume and several processes work as with any DataLoader.

    Args:
        dataset, check_dataset, in_memory: as :class:`CachedTargets`.
        cache: a :class:`TeacherCache` or its folder.
        batch_size, shuffle, drop_last, generator: as ``torch.utils.data.DataLoader``.
    """
    if isinstance(cache, str | Path):
        cache = TeacherCache(cache)
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be an int >= 0, got num_workers={num_workers!r}")
    if (
        isinstance(prefetch_factor, bool)
        or not isinstance(prefetch_factor, int)
        or prefetch_factor < 1
    ):
        raise ValueError(f"prefetch_factor must be a positive int, got {prefetch_factor!r}")
    return DataLoader(
        CachedTargets(dataset, cache, check_dataset=check_dataset, in_memory=in_memory),
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        prefetch_factor=prefetch_factor if num_workers else None,
        collate_fn=CachedCollator(collate_fn),
        drop_last=drop_last,
        generator=generator,
    )
