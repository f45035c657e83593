"""``write_teacher_cache``: run the teacher once over a dataset and store its sparse targets.

The folder's life: ``capture.json`` (the settings) is written first; shards appear one by one,
each atomically; ``manifest.json`` is written last and ``capture.json`` removed. Calling
again with the same arguments resumes an unfinished capture (shards already on disk are kept,
after their headers are checked) or returns the finished manifest; with other arguments it is
refused, naming the fields that differ.

Shard ``j`` holds sequences ``[j · shard_size, (j + 1) · shard_size)``; under torchrun, process
``r`` of ``W`` captures the shards with ``j % W == r``, so every shard file is the same whatever
the number of processes, and process 0 writes the manifest after a barrier.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from tqdm.auto import tqdm

from .._files import DiskFull, file_sha256, write_durably
from ..losses._checks import check_count, check_temperature
from . import manifest as manifest_file
from ._processes import Processes, barrier, capture_processes, sum_over_processes
from .backends import CaptureBackend, HuggingFaceBackend
from .hashing import fingerprint, read_example, tokenizer_hash
from .shards import (
    encode_ids,
    header_length,
    id_encoding,
    read_header,
    serialize_shard,
    shard_info,
    shard_name,
)
from .targets import Request, capture_sequences

_VALUE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
# Largest count each value dtype holds exactly (integers up to 2^(mantissa bits + 1)).
_EXACT_COUNTS = {"float16": 2048, "bfloat16": 256}


def write_teacher_cache(
    teacher: Any,
    dataset: Sequence[Mapping[str, Any]],
    path: str | Path,
    *,
    representation: str = "topk",
    k: int | None = None,
    num_samples: int | None = None,
    batch_size: int = 8,
    temperature: float = 1.0,
    seed: int = 0,
    backend: Callable[[Any], CaptureBackend] | None = None,
    shard_size: int = 512,
    values_dtype: str = "float16",
    tokenizer: Any = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Capture ``teacher``'s sparse targets for every sequence of ``dataset`` into ``path``.

    Per sequence of ``T`` tokens the cache holds ``ids`` and ``values`` ``(T, width)``, row
    ``t`` describing the teacher's distribution of token ``t + 1``,
    ``p = softmax(z_t / temperature)``:

    - ``representation="topk"``: the ``k`` most probable ids and ``log p`` of each, largest
      first (T = 1 log-probabilities at the default ``temperature=1``);
    - ``"sampled"``: ``num_samples`` draws with replacement from ``p``, stored as the distinct
      ids (increasing) and their counts, padded to ``num_samples`` columns with id -1, count 0.
      The draws of a sequence depend only on ``(seed, its key)``.

    Args:
        teacher: a Hugging Face causal LM, or whatever ``backend`` accepts.
        dataset: a sequence of dicts with ``input_ids`` ``(T,)`` (lengths may differ) and
            optionally ``attention_mask`` ``(T,)`` and ``id`` (int or str, the sample key;
            without it the key is ``"sha256:" +`` the content hash of the tokens).
        path: the cache folder (created; a resume if it holds an unfinished capture of the
            same settings).
        batch_size: sequences per teacher call.
        backend: a factory ``teacher -> CaptureBackend``; default :class:`HuggingFaceBackend`.
        shard_size: sequences per shard file (a shard is built in memory before it is written).
        values_dtype: ``"float16"`` or ``"bfloat16"``.
        tokenizer: recorded by its vocabulary hash, so a student's tokenizer can be checked.
        progress: a progress bar when stderr is a terminal, and a last line saying where the
            cache went.

    Returns:
        The manifest (also in ``path/manifest.json``).
    """
    request = _request(representation, k, num_samples, temperature, seed, values_dtype)
    for name, value in (("batch_size", batch_size), ("shard_size", shard_size)):
        check_count(value, name, "a positive int")
    if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")) or len(dataset) == 0:
        raise ValueError("dataset must be a non-empty sequence of examples (len() and [i])")
    capture = (backend or HuggingFaceBackend)(teacher)
    if not isinstance(capture, CaptureBackend):
        raise TypeError(
            f"backend must return a CaptureBackend (vocab_size, describe, topk, sample), got "
            f"{type(capture).__name__}"
        )
    if representation == "topk" and k > capture.vocab_size:
        raise ValueError(f"k={k} is larger than the teacher's vocabulary of {capture.vocab_size}")
    entries = _scan(dataset, capture.vocab_size)
    settings = _settings(capture, entries, tokenizer, request, shard_size)
    job = _Job(capture, dataset, entries, Path(path), request, settings, batch_size)
    with capture_processes() as processes:
        done = _existing_capture(job.folder, settings)
        # Every process looks at the folder before process 0 writes to it: a process that
        # looked while the plan was being published could see it appear between its two
        # checks and refuse the folder as "not empty".
        barrier(processes)
        if done is not None:
            return done
        if processes.rank == 0:
            _start(job.folder, settings)
        barrier(processes)
        table = sum_over_processes(processes, job.capture_shards(processes, progress))
        manifest = job.manifest(table)
        if processes.rank == 0:
            _write_json(job.folder / manifest_file.MANIFEST, manifest)
            (job.folder / manifest_file.PLAN).unlink(missing_ok=True)
        barrier(processes)
    if progress and processes.rank == 0:
        print(
            f"teacher cache: {len(entries)} sequences, {manifest['dataset']['positions']} "
            f"positions, {manifest['bytes_per_token']['on_disk']:.1f} bytes/token -> "
            f"{job.folder / manifest_file.MANIFEST}",
            file=sys.stderr,
        )
    return manifest


def _request(representation, k, num_samples, temperature, seed, values_dtype) -> Request:
    """The validated capture request; errors name the argument."""
    if representation not in manifest_file.REPRESENTATIONS:
        raise ValueError(
            f"representation must be one of {manifest_file.REPRESENTATIONS}, got {representation!r}"
        )
    needed, unused = ("k", "num_samples") if representation == "topk" else ("num_samples", "k")
    given = {"k": k, "num_samples": num_samples}
    if given[unused] is not None:
        raise ValueError(
            f"{unused} does not apply to representation={representation!r}; set {needed}"
        )
    width = given[needed]
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(
            f"{needed} must be a positive int for representation={representation!r}, got {needed}={width!r}"
        )
    if isinstance(temperature, torch.Tensor):
        raise TypeError("temperature must be a float: the capture temperature is one number")
    check_temperature(temperature)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got seed={seed!r}")
    if values_dtype not in _VALUE_DTYPES:
        raise ValueError(
            f"values_dtype must be one of {sorted(_VALUE_DTYPES)}, got {values_dtype!r}"
        )
    if representation == "sampled" and width > _EXACT_COUNTS[values_dtype]:
        raise ValueError(
            f"num_samples={width} counts are not exact in {values_dtype} (at most "
            f"{_EXACT_COUNTS[values_dtype]}); use fewer samples or values_dtype='float16'"
        )
    return Request(representation, width, float(temperature), seed, values_dtype)


class _Entry(NamedTuple):
    """What the capture remembers of an example between its two reads: not its tokens."""

    key: str
    content_hash: str
    length: int


def _scan(dataset: Sequence[Mapping[str, Any]], vocab_size: int) -> list[_Entry]:
    """Every example validated and keyed, in dataset order."""
    entries: list[_Entry] = []
    first_of_key: dict[str, int] = {}
    for index in range(len(dataset)):
        example = read_example(dataset[index], index, vocab_size)
        earlier = first_of_key.setdefault(example.key, index)
        if earlier != index and entries[earlier].content_hash != example.content_hash:
            raise ValueError(
                f"dataset[{earlier}] and dataset[{index}] share the id {example.key!r} but hold "
                "different tokens; sample ids must be unique"
            )
        entries.append(_Entry(example.key, example.content_hash, example.input_ids.numel()))
    return entries


def _settings(
    capture: CaptureBackend,
    entries: list[_Entry],
    tokenizer: Any,
    request: Request,
    shard_size: int,
) -> dict[str, Any]:
    described = capture.describe()
    sampled = request.representation == "sampled"
    return {
        "format": manifest_file.FORMAT,
        "version": manifest_file.VERSION,
        "teacher": {
            "name": described.get("name"),
            "weights_sha256": described.get("weights_sha256"),
            "backend": described.get("backend", type(capture).__name__),
        },
        "vocabulary": {
            "size": capture.vocab_size,
            "tokenizer_sha256": None if tokenizer is None else tokenizer_hash(tokenizer),
            "output_layer_shape": described.get("output_layer_shape"),
        },
        "dataset": {
            "fingerprint": fingerprint(entries),
            "sequences": len(entries),
            "positions": sum(entry.length for entry in entries),
        },
        "representation": request.representation,
        "k": None if sampled else request.width,
        "num_samples": request.width if sampled else None,
        "width": request.width,
        "temperature": request.temperature,
        "seed": request.seed if sampled else None,
        "shard_size": shard_size,
        "ids": {"encoding": id_encoding(capture.vocab_size), "padding": -1},
        "values": {
            "dtype": request.values_dtype,
            "meaning": "counts" if sampled else "log_probs",
            "padding": 0.0,
        },
    }


def _existing_capture(folder: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The finished manifest if ``folder`` holds this very capture; None to capture or resume;
    a ValueError for a folder holding anything else."""
    for name in (manifest_file.MANIFEST, manifest_file.PLAN):
        if (folder / name).is_file():
            recorded = manifest_file.read_json(folder / name)
            changed = manifest_file.differences(manifest_file.settings_of(recorded), settings)
            if changed:
                raise ValueError(
                    f"{folder} holds a teacher cache captured with other settings ({name}); "
                    f"use another folder, or delete it to recapture. Differences: "
                    + "; ".join(changed)
                )
            return recorded if name == manifest_file.MANIFEST else None
    if folder.exists():
        if not folder.is_dir():
            raise ValueError(f"path {folder} exists and is not a folder")
        others = sorted(entry.name for entry in folder.iterdir() if not entry.name.startswith("."))
        if others:
            raise ValueError(
                f"{folder} is not empty and holds no teacher cache capture ({', '.join(others[:5])}"
                f"{', ...' if len(others) > 5 else ''}); choose an empty or new folder"
            )
    return None


def _start(folder: Path, settings: dict[str, Any]) -> None:
    """Record the settings (a resume compares against them) and drop the temporary files of
    an interrupted run."""
    folder.mkdir(parents=True, exist_ok=True)
    for pattern in (
        ".shard-*.tmp*",
        f".{manifest_file.PLAN}.tmp*",
        f".{manifest_file.MANIFEST}.tmp*",
    ):
        for stale in folder.glob(pattern):  # what _files.atomic_path leaves behind a kill
            stale.unlink(missing_ok=True)
    if not (folder / manifest_file.PLAN).is_file():
        _write_json(folder / manifest_file.PLAN, settings)


@dataclass
class _Job:
    """One capture: what to run, over what, into where."""

    capture: CaptureBackend
    dataset: Sequence[Mapping[str, Any]]
    entries: list[_Entry]
    folder: Path
    request: Request
    settings: dict[str, Any]
    batch_size: int

    @property
    def shard_count(self) -> int:
        return math.ceil(len(self.entries) / self.settings["shard_size"])

    def indices(self, shard: int) -> range:
        size = self.settings["shard_size"]
        return range(shard * size, min((shard + 1) * size, len(self.entries)))

    def capture_shards(self, processes: Processes, progress: bool) -> torch.Tensor:
        """Capture (or find on disk) this process's shards; their records as an int64 table
        ``(shards, 65)``: SHA-256 of the file and of its header as bytes, then the file size."""
        table = torch.zeros(self.shard_count, 65, dtype=torch.int64)
        mine = range(processes.rank, self.shard_count, processes.world_size)
        paths = {j: self.folder / shard_name(j, self.shard_count) for j in mine}
        todo = [j for j in mine if not paths[j].is_file()]
        show = progress and processes.rank == 0 and sys.stderr.isatty()
        total = sum(len(self.indices(j)) for j in todo)
        with tqdm(total=total, unit="seq", desc="teacher cache", disable=not show) as bar:
            for j in mine:
                info = {
                    "first_index": self.indices(j)[0],
                    "keys": [self.entries[i].key for i in self.indices(j)],
                    "content_hashes": [self.entries[i].content_hash for i in self.indices(j)],
                }
                if j not in todo:
                    table[j] = _existing_record(paths[j], info)
                    continue
                data = self.shard_bytes(self.indices(j), info, bar.update)
                try:
                    write_durably(paths[j], data)
                except DiskFull as error:  # atomic: the shards before it are whole
                    done = len(list(self.folder.glob("shard-*.safetensors")))
                    error.kept = (
                        f"the {done} shards written before it are complete and kept: free "
                        "space and run the same capture again to continue"
                    )
                    raise
                sha256 = hashlib.sha256(data).hexdigest()
                table[j] = _record(sha256, data[: header_length(data)], len(data))
        return table

    def shard_bytes(self, indices: range, info: dict[str, Any], on_batch) -> bytes:
        """The safetensors bytes of one shard, captured now."""
        examples = []
        for i in indices:
            example = read_example(self.dataset[i], i, self.capture.vocab_size)
            if example.content_hash != self.entries[i].content_hash:
                raise ValueError(
                    f"dataset[{i}] changed during the capture (its content hash differs)"
                )
            examples.append(example)
        targets = capture_sequences(
            self.capture, examples, self.request, batch_size=self.batch_size, on_batch=on_batch
        )
        offsets = torch.tensor([0] + [ids.shape[0] for ids, _ in targets]).cumsum(0)
        ids = encode_ids(torch.cat([ids for ids, _ in targets]), self.settings["ids"]["encoding"])
        values = torch.cat([values for _, values in targets])
        return serialize_shard(
            ids, values.to(_VALUE_DTYPES[self.request.values_dtype]), offsets, info
        )

    def manifest(self, table: torch.Tensor) -> dict[str, Any]:
        """The settings, the shard records of every process, and the bytes per token."""
        shards = []
        for j, row in enumerate(table.tolist()):
            shards.append({
                "file": shard_name(j, self.shard_count),
                "first_index": self.indices(j)[0],
                "sequences": len(self.indices(j)),
                "positions": sum(self.entries[i].length for i in self.indices(j)),
                "bytes": row[64],
                "sha256": bytes(row[:32]).hex(),
                "header_sha256": bytes(row[32:64]).hex(),
            })  # fmt: skip
        payload = manifest_file.payload_bytes_per_token(
            self.request.width, self.settings["ids"]["encoding"], self.request.values_dtype
        )
        on_disk = sum(shard["bytes"] for shard in shards) / self.settings["dataset"]["positions"]
        return {
            **self.settings,
            "bytes_per_token": {"payload": payload, "on_disk": round(on_disk, 3)},
            "shards": shards,
        }


def _existing_record(path: Path, info: dict[str, Any]) -> torch.Tensor:
    """The record of a shard a previous run wrote, after checking it is the one expected here."""
    raw, header = read_header(path)
    if shard_info(header, path) != info:
        raise ValueError(
            f"{path} holds other sequences than this capture expects there; delete it to recapture"
        )
    return _record(file_sha256(path), raw, path.stat().st_size)


def _record(sha256: str, header: bytes, size: int) -> torch.Tensor:
    digests = bytes.fromhex(sha256) + hashlib.sha256(header).digest()
    return torch.tensor([*digests, size], dtype=torch.int64)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    write_durably(path, (json.dumps(data, indent=2) + "\n").encode())
