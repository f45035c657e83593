"""Shard files: safetensors holding the sparse targets of consecutive sequences.

A shard holds, for its ``n`` sequences in dataset order, with ``P`` their total positions and
``w`` the width (k, or the number of samples):

- ``ids`` ``(P, w)``: token ids, 16-bit when the vocabulary fits (see :func:`id_encoding`);
- ``values`` ``(P, w)``: float16 or bfloat16 (log-probabilities, or counts);
- ``offsets`` ``(n + 1,)`` int64: sequence ``j`` is rows ``offsets[j]:offsets[j + 1]``;
- one metadata entry ``"darkknowledge"``: JSON with the sample keys and content hashes.

Files are written atomically and fsynced; readers check sizes and SHA-256 checksums, and parse
the header themselves first, so that anything that is not a safetensors file (a pickle, a
``torch.save`` archive, a truncated copy) gives a ``ValueError`` naming the file.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save

METADATA_KEY = "darkknowledge"
TENSORS = ("ids", "offsets", "values")
# safetensors refuses headers above 100 MB; a larger one is not a shard of ours.
_MAX_HEADER_BYTES = 100_000_000


def id_encoding(vocab_size: int) -> str:
    """How token ids are stored: ``"int16"`` when every id fits (``vocab_size <= 32768``),
    ``"uint16"`` (unsigned 16-bit values as the bits of an int16 tensor: safetensors maps
    ``U16`` to ``torch.uint16`` only since 0.6) when ``vocab_size <= 65535``, else ``"int32"``.
    The padding id is -1 in every encoding (0xFFFF for uint16, never a real id since ids are
    below 65535).

    >>> id_encoding(256), id_encoding(32768), id_encoding(50257), id_encoding(128256)
    ('int16', 'int16', 'uint16', 'int32')
    """
    if vocab_size <= 32768:
        return "int16"
    if vocab_size <= 65535:
        return "uint16"
    return "int32"


def encode_ids(ids: torch.Tensor, encoding: str) -> torch.Tensor:
    """int64 ids (-1 = padding) to their stored tensor (int16 or int32)."""
    if encoding == "int32":
        return ids.to(torch.int32)
    # uint16 and int16: the low 16 bits as two's complement; -1 stays -1 (0xFFFF).
    ids = ids.to(torch.int32)
    return torch.where(ids >= 32768, ids - 65536, ids).to(torch.int16)


def decode_ids(stored: torch.Tensor, encoding: str) -> torch.Tensor:
    """Stored ids back to int64 (-1 = padding).

    >>> ids = torch.tensor([0, 40000, 65534, -1])
    >>> decode_ids(encode_ids(ids, "uint16"), "uint16").tolist()
    [0, 40000, 65534, -1]
    """
    ids = stored.to(torch.int64)
    if encoding == "uint16":
        ids = ids & 0xFFFF
        ids = torch.where(ids == 0xFFFF, -1, ids)
    return ids


def shard_name(index: int, count: int) -> str:
    """``shard-00003-of-00012.safetensors``."""
    return f"shard-{index:05d}-of-{count:05d}.safetensors"


def serialize_shard(
    ids: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor, info: dict[str, Any]
) -> bytes:
    """The bytes of a shard file (``info`` goes into the header as sorted JSON, so the same
    content always gives the same bytes)."""
    tensors = {"ids": ids.contiguous(), "values": values.contiguous(), "offsets": offsets}
    return save(tensors, metadata={METADATA_KEY: json.dumps(info, sort_keys=True)})


def header_length(data: bytes) -> int:
    """Bytes of the safetensors header, 8-byte length prefix included."""
    return 8 + struct.unpack("<Q", data[:8])[0]


def read_header(path: Path) -> tuple[bytes, dict[str, Any]]:
    """The raw header bytes (length prefix included) and the parsed header of a shard; a
    ``ValueError`` naming the file for anything that is not one of our safetensors shards.
    Never unpickles: a pickle or ``torch.save`` file is recognised by its first bytes."""
    if not path.is_file():
        raise ValueError(f"teacher cache shard {path} is missing")
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
        if not 0 < length <= min(_MAX_HEADER_BYTES, size - 8):
            raise _not_safetensors(path, prefix, f"no valid header in its {size} bytes")
        raw = handle.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _not_safetensors(path, prefix, "unreadable header") from None
    _check_layout(path, header, size - 8 - length)
    return prefix + raw, header


def _not_safetensors(path: Path, prefix: bytes, reason: str) -> ValueError:
    # Pickle protocol 2+ starts with 0x80 then the protocol number; torch.save writes a zip.
    if (prefix[:1] == b"\x80" and prefix[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")) or (
        prefix[:4] == b"PK\x03\x04"
    ):
        return ValueError(
            f"{path} is not a safetensors file: it looks like a pickle or torch.save archive, "
            "which darkknowledge never loads (unpickling can run code); recapture the cache"
        )
    return ValueError(f"{path} is not a valid safetensors file ({reason}): truncated or damaged")


def _check_layout(path: Path, header: Any, data_bytes: int) -> None:
    """The header describes our three tensors, which fill the data section exactly."""
    if not isinstance(header, dict) or METADATA_KEY not in (header.get("__metadata__") or {}):
        raise ValueError(
            f"{path} is a safetensors file but not a darkknowledge teacher cache shard"
        )
    names = sorted(name for name in header if name != "__metadata__")
    if names != sorted(TENSORS):
        raise ValueError(f"{path} holds tensors {names}, expected {sorted(TENSORS)}")
    try:
        end = max(int(header[name]["data_offsets"][1]) for name in TENSORS)
    except (KeyError, TypeError, ValueError, IndexError):
        raise ValueError(f"{path} has a malformed safetensors header") from None
    if end != data_bytes:
        raise ValueError(
            f"{path} is truncated or padded: its header describes {end} bytes of tensors, the file "
            f"holds {data_bytes}"
        )


def shard_info(header: dict[str, Any], path: Path) -> dict[str, Any]:
    """The JSON metadata a shard's header carries (keys, content hashes, first index)."""
    try:
        return json.loads(header["__metadata__"][METADATA_KEY])
    except (KeyError, TypeError, json.JSONDecodeError):
        raise ValueError(f"{path} has unreadable darkknowledge metadata in its header") from None
