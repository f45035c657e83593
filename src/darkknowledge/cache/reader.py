"""``TeacherCache``: read a teacher cache by position, by sample key, or by content.

Opening reads only the manifest and checks that every shard file is there with the size the
manifest records. A shard's data is verified (SHA-256 of the whole file) the first time it is
used, and its tensors are then read lazily, a slice per sequence, from a memory map
(``safe_open``), so a cache larger than memory works. The key index is built on the first
``get``/``lookup``/``keys`` from the shards' headers (each checked against its own SHA-256).
"""

from __future__ import annotations

import bisect
import hashlib
import operator
from collections import OrderedDict
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import load

from .._files import file_sha256
from .hashing import content_hash
from .manifest import check_compatible, read_manifest
from .shards import decode_ids, read_header, shard_info

# Open shards kept at once (memory maps); older ones are closed first.
_OPEN_SHARDS = 16


class TeacherCache:
    """A teacher cache folder written by :func:`darkknowledge.cache.write_teacher_cache`.

    ``cache[i]`` is ``{"ids": (T_i, width) int64, "values": (T_i, width) float32, "key": str,
    "content_hash": str}`` for the dataset's sequence ``i``; padding entries hold id -1 and
    value 0. ``values`` are log-probabilities at the capture temperature (``topk``) or draw
    counts (``sampled``).

    Args:
        path: the cache folder.
        verify: check each shard's SHA-256 against the manifest before its first use.
        mmap: read tensors lazily from memory-mapped files; False reads a whole shard into
            memory on first use (once, checksum included: for network file systems).

    A damaged cache gives a ``ValueError`` naming the file: a wrong manifest version, a missing,
    truncated or altered shard, a pickle file in a shard's place (never unpickled).
    """

    def __init__(self, path: str | Path, *, verify: bool = True, mmap: bool = True) -> None:
        self.path = Path(path)
        self.verify, self.mmap = verify, mmap
        self.manifest = read_manifest(self.path)
        self._shards = self.manifest["shards"]
        self._firsts = [shard["first_index"] for shard in self._shards]
        for shard in self._shards:
            file = self.path / shard["file"]
            if not file.is_file():
                raise ValueError(f"teacher cache shard {file} is missing")
            size = file.stat().st_size
            if size != shard["bytes"]:
                raise ValueError(
                    f"teacher cache shard {file} has {size} bytes, the manifest records "
                    f"{shard['bytes']}: truncated or replaced; recapture it"
                )
        self._open: OrderedDict[int, Any] = OrderedDict()
        self._verified: set[int] = set()
        self._keys: dict[str, int] | None = None
        self._contents: dict[str, int] | None = None

    # -- what the cache holds ----------------------------------------------------------------
    @property
    def representation(self) -> str:
        return self.manifest["representation"]

    @property
    def width(self) -> int:
        """Columns per position: k (topk) or the number of samples (sampled)."""
        return self.manifest["width"]

    @property
    def vocab_size(self) -> int:
        return self.manifest["vocabulary"]["size"]

    @property
    def temperature(self) -> float:
        """The capture temperature."""
        return self.manifest["temperature"]

    def __len__(self) -> int:
        return self.manifest["dataset"]["sequences"]

    def __repr__(self) -> str:
        return (
            f"TeacherCache({str(self.path)!r}, {len(self)} sequences, {self.representation}, "
            f"width={self.width})"
        )

    def check_compatible(
        self,
        *,
        vocab_size: int | None = None,
        tokenizer_hash: str | None = None,
        dataset_fingerprint: str | None = None,
        representation: str | None = None,
    ) -> None:
        """Refuse (ValueError naming the field and both values) a cache made for another
        vocabulary, tokenizer (:func:`tokenizer_hash`), dataset (:func:`dataset_fingerprint`)
        or representation; arguments left None are not checked."""
        check_compatible(
            self.manifest,
            self.path,
            vocab_size=vocab_size,
            tokenizer_hash=tokenizer_hash,
            dataset_fingerprint=dataset_fingerprint,
            representation=representation,
        )

    # -- reading -----------------------------------------------------------------------------
    def __getitem__(self, index: int) -> dict[str, Any]:
        if isinstance(index, bool) or not hasattr(index, "__index__"):
            raise TypeError(f"cache index must be an int, got {type(index).__name__}")
        index = operator.index(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"cache index {index} out of range for {len(self)} sequences")
        index %= len(self)
        number = bisect.bisect_right(self._firsts, index) - 1
        row = index - self._firsts[number]
        shard = self._shard(number)
        offsets = shard.tensors.get_slice("offsets")[row : row + 2].tolist()
        ids = shard.tensors.get_slice("ids")[offsets[0] : offsets[1]]
        values = shard.tensors.get_slice("values")[offsets[0] : offsets[1]]
        return {
            "ids": decode_ids(ids, self.manifest["ids"]["encoding"]),
            "values": values.float(),
            "key": shard.keys[row],
            "content_hash": shard.content_hashes[row],
        }

    def __iter__(self):
        return (self[index] for index in range(len(self)))

    def get(self, key: int | str) -> dict[str, Any]:
        """The entry of the sample whose ``id`` (or ``"sha256:..."`` key) is ``key``; a
        KeyError, never an empty or wrong entry, when the cache has none."""
        index = self._key_index().get(str(key))
        if index is None:
            raise KeyError(f"no sample with key {str(key)!r} in the teacher cache at {self.path}")
        return self[index]

    def lookup(
        self, input_ids: torch.Tensor | list[int], attention_mask: torch.Tensor | None = None
    ) -> dict[str, Any]:
        """The entry of the sequence with these tokens (and mask), by content hash."""
        digest = content_hash(input_ids, attention_mask)
        self._key_index()
        index = self._contents.get(digest)
        if index is None:
            raise KeyError(
                f"no sequence with content hash {digest} in the teacher cache at {self.path}"
            )
        return self[index]

    def keys(self) -> list[str]:
        """Sample keys in dataset order."""
        return list(self._key_index())

    def verify_all(self) -> None:
        """Check every shard's SHA-256 now (instead of at first use), whatever ``verify`` is."""
        for number, shard in enumerate(self._shards):
            self._info(number)
            self._compare(number, file_sha256(self.path / shard["file"]))

    # -- shards ------------------------------------------------------------------------------
    def _shard(self, number: int) -> _OpenShard:
        """An open shard (an LRU of memory maps, or of in-memory tensors when mmap=False)."""
        if number in self._open:
            self._open.move_to_end(number)
            return self._open[number]
        file = self.path / self._shards[number]["file"]
        info = self._info(number)
        if self.mmap:
            if self.verify and number not in self._verified:
                self._compare(number, file_sha256(file))
            tensors = safe_open(str(file), framework="pt")
        else:
            data = file.read_bytes()
            if self.verify and number not in self._verified:
                self._compare(number, hashlib.sha256(data).hexdigest())
            tensors = _InMemory(load(data))
        self._open[number] = _OpenShard(tensors, info["keys"], info["content_hashes"])
        if len(self._open) > _OPEN_SHARDS:
            self._open.popitem(last=False)
        return self._open[number]

    def _compare(self, number: int, actual: str) -> None:
        shard = self._shards[number]
        if actual != shard["sha256"]:
            raise ValueError(
                f"teacher cache shard {self.path / shard['file']} is corrupted: its SHA-256 is "
                f"{actual}, the manifest records {shard['sha256']}; recapture it"
            )
        self._verified.add(number)

    def _info(self, number: int) -> dict[str, Any]:
        """A shard's keys and content hashes, from its header (checked against the manifest)."""
        file = self.path / self._shards[number]["file"]
        raw, header = read_header(file)  # a clear error for anything but our safetensors shard
        if self.verify and hashlib.sha256(raw).hexdigest() != self._shards[number]["header_sha256"]:
            raise ValueError(
                f"teacher cache shard {file} is corrupted: its header's SHA-256 does not match the manifest"
            )
        return shard_info(header, file)

    def _key_index(self) -> dict[str, int]:
        if self._keys is None:
            keys: dict[str, int] = {}
            contents: dict[str, int] = {}
            for number, shard in enumerate(self._shards):
                info = self._info(number)
                for row, (key, digest) in enumerate(zip(info["keys"], info["content_hashes"])):
                    keys.setdefault(key, shard["first_index"] + row)
                    contents.setdefault(digest, shard["first_index"] + row)
            self._keys, self._contents = keys, contents
        return self._keys

    def __getstate__(self) -> dict[str, Any]:
        # Memory maps do not cross process boundaries (DataLoader workers): reopen there.
        state = dict(self.__dict__)
        state["_open"] = OrderedDict()
        return state


class _OpenShard(NamedTuple):
    tensors: Any  # safe_open handle or _InMemory
    keys: list[str]
    content_hashes: list[str]


class _InMemory:
    """A shard read whole into memory, with the slice interface of ``safe_open``."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def get_slice(self, name: str) -> torch.Tensor:
        return self.tensors[name]
