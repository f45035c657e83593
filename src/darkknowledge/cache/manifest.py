"""The manifest (``manifest.json``): what a teacher cache holds and how to check it.

Written last, by one process, once every shard is on disk; a folder without it is an
unfinished capture (its settings wait in ``capture.json`` for a resume). It holds no
timestamps or host names, so the same capture always gives the same bytes. Fields::

    format, version                  "darkknowledge.teacher_cache", 1
    teacher                          name, weights_sha256, backend
    vocabulary                       size, tokenizer_sha256 (or null), output_layer_shape
    dataset                          fingerprint, sequences, positions
    representation                   "topk" | "sampled"
    k, num_samples, width            width = k (topk) or num_samples (sampled)
    temperature, seed                capture temperature; seed of the draws (sampled only)
    shard_size                       sequences per shard
    ids, values                      encoding/dtype, padding and meaning of the stored tensors
    bytes_per_token                  payload = width · (id bytes + value bytes); on_disk
    shards                           file, first_index, sequences, positions, bytes, sha256,
                                     header_sha256 (of the safetensors header)

Everything but ``bytes_per_token`` and ``shards`` is the capture's *settings*: a resume must
match them all.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

FORMAT = "darkknowledge.teacher_cache"
VERSION = 1
MANIFEST = "manifest.json"
PLAN = "capture.json"
REPRESENTATIONS = ("topk", "sampled")
ID_ENCODINGS = {"int16": 2, "uint16": 2, "int32": 4}
VALUE_DTYPES = {"float16": 2, "bfloat16": 2}
_SHARD_FIELDS = {
    "file": str,
    "first_index": int,
    "sequences": int,
    "positions": int,
    "bytes": int,
    "sha256": str,
    "header_sha256": str,
}


def payload_bytes_per_token(width: int, id_encoding: str, value_dtype: str) -> int:
    """``width · (id bytes + value bytes)``: 128 · (4 + 2) = 768 with int32 ids and float16.

    >>> payload_bytes_per_token(128, "int32", "float16"), payload_bytes_per_token(128, "int16", "float16")
    (768, 512)
    """
    return width * (ID_ENCODINGS[id_encoding] + VALUE_DTYPES[value_dtype])


def settings_of(manifest: dict[str, Any]) -> dict[str, Any]:
    """The fields a resume must match (everything but the shard list and the sizes)."""
    return {
        key: value for key, value in manifest.items() if key not in ("bytes_per_token", "shards")
    }


def differences(recorded: dict[str, Any], wanted: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of the fields that differ, with both values.

    >>> differences({"k": 8, "teacher": {"name": "a"}}, {"k": 8, "teacher": {"name": "b"}})
    ["teacher.name: recorded 'a', requested 'b'"]
    """
    found = []
    for key in sorted(set(recorded) | set(wanted)):
        old, new = recorded.get(key), wanted.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            found += differences(old, new, f"{prefix}{key}.")
        elif old != new:
            found.append(f"{prefix}{key}: recorded {old!r}, requested {new!r}")
    return found


def read_json(path: Path) -> dict[str, Any]:
    """A manifest or plan file, refused with a ValueError naming it when it is not one."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not a readable teacher cache manifest: {error}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ValueError(
            f"{path} is not a teacher cache manifest: format {found!r}, expected {FORMAT!r}"
        )
    if data.get("version") != VERSION:
        raise ValueError(
            f"{path} has teacher cache format version {data.get('version')!r}; this darkknowledge "
            f"reads version {VERSION} only (recapture the cache, or use the darkknowledge that wrote it)"
        )
    return data


def read_manifest(folder: Path) -> dict[str, Any]:
    """``folder/manifest.json``, validated field by field (a ValueError names the field)."""
    path = folder / MANIFEST
    if not path.is_file():
        hint = (
            " (an unfinished capture: run the same capture again to resume it)"
            if (folder / PLAN).is_file()
            else ""
        )
        raise ValueError(f"no teacher cache at {folder}: {path} does not exist{hint}")
    manifest = read_json(path)
    problems = _problems(manifest)
    if problems:
        raise ValueError(f"{path} is not a valid teacher cache manifest: " + "; ".join(problems))
    return manifest


def _problems(manifest: dict[str, Any]) -> list[str]:
    problems = []
    if manifest.get("representation") not in REPRESENTATIONS:
        problems.append(
            f"representation {manifest.get('representation')!r} is not one of {REPRESENTATIONS}"
        )
    for field in ("width", "shard_size"):
        if not _positive_int(manifest.get(field)):
            problems.append(f"{field} {manifest.get(field)!r} is not a positive int")
    if not _positive_int((manifest.get("vocabulary") or {}).get("size")):
        problems.append("vocabulary.size is not a positive int")
    if (manifest.get("ids") or {}).get("encoding") not in ID_ENCODINGS:
        problems.append(f"ids.encoding is not one of {sorted(ID_ENCODINGS)}")
    if (manifest.get("values") or {}).get("dtype") not in VALUE_DTYPES:
        problems.append(f"values.dtype is not one of {sorted(VALUE_DTYPES)}")
    temperature = manifest.get("temperature")
    if not (
        isinstance(temperature, int | float) and math.isfinite(temperature) and temperature > 0
    ):
        problems.append(f"temperature {temperature!r} is not a number > 0")
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        return [*problems, "shards is not a list"]
    expected_first = 0
    for number, shard in enumerate(shards):
        bad = [
            field
            for field, kind in _SHARD_FIELDS.items()
            if not isinstance(shard, dict) or not isinstance(shard.get(field), kind)
        ]
        if bad:
            problems.append(f"shards[{number}] lacks valid {', '.join(bad)}")
            continue
        if Path(shard["file"]).name != shard["file"] or shard["file"].startswith("."):
            problems.append(f"shards[{number}].file {shard['file']!r} is not a plain file name")
        if shard["first_index"] != expected_first:
            problems.append(
                f"shards[{number}].first_index is {shard['first_index']}, expected {expected_first}"
            )
        expected_first = shard["first_index"] + shard["sequences"]
    if expected_first != (manifest.get("dataset") or {}).get("sequences"):
        problems.append(
            f"the shards hold {expected_first} sequences, dataset.sequences says otherwise"
        )
    return problems


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def check_compatible(
    manifest: dict[str, Any],
    where: Path,
    *,
    vocab_size: int | None = None,
    tokenizer_hash: str | None = None,
    dataset_fingerprint: str | None = None,
    representation: str | None = None,
) -> None:
    """Refuse a cache made for another vocabulary, tokenizer, dataset or representation:
    a ValueError naming the field and both values. Arguments left None are not checked."""
    checks = (
        ("vocab_size", vocab_size, manifest["vocabulary"]["size"]),
        ("tokenizer_hash", tokenizer_hash, manifest["vocabulary"].get("tokenizer_sha256")),
        ("dataset_fingerprint", dataset_fingerprint, manifest["dataset"].get("fingerprint")),
        ("representation", representation, manifest["representation"]),
    )
    for name, wanted, recorded in checks:
        if wanted is None or wanted == recorded:
            continue
        if recorded is None:
            raise ValueError(
                f"the teacher cache at {where} records no {name} (captured without a tokenizer), "
                f"so it cannot be checked against {name}={wanted!r}"
            )
        raise ValueError(
            f"the teacher cache at {where} does not match: {name} is {recorded!r} in the cache, "
            f"{wanted!r} here; use a cache captured for this {name.split('_')[0]}"
        )
