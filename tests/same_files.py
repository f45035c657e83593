"""Byte-for-byte file comparison with a short failure message.

``assert a.read_bytes() == b.read_bytes()`` prints both files in full when it fails (pytest
does not truncate on CI): tens of kilobytes of escaped bytes and the test's name lost above
them. This names the two files and, for safetensors files, which tensors differ and by how
much (a last-bit difference points at thread counts, a large one at lost state)."""

from __future__ import annotations

import filecmp
from pathlib import Path

from safetensors.torch import load_file


def _tensor_differences(ours: Path, theirs: Path) -> str:
    mine, other = load_file(str(ours)), load_file(str(theirs))
    if mine.keys() != other.keys():
        return f"tensor names differ: {sorted(mine.keys() ^ other.keys())}"
    parts = []
    for name in sorted(mine):
        a, b = mine[name], other[name]
        if a.shape != b.shape or a.dtype != b.dtype:
            parts.append(f"{name}: {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}")
        elif not a.equal(b):
            gap = (a.double() - b.double()).abs().max().item()
            parts.append(f"{name}: max |difference| {gap:.3g}")
    return "; ".join(parts) or "same tensors, different bytes (metadata)"


def assert_same_file(ours: Path, theirs: Path) -> None:
    """Fail unless the two files hold the same bytes."""
    if filecmp.cmp(ours, theirs, shallow=False):
        return
    detail = f"{ours.stat().st_size} vs {theirs.stat().st_size} bytes"
    if ours.suffix == ".safetensors":
        detail = _tensor_differences(ours, theirs)
    raise AssertionError(f"{ours} differs from {theirs}: {detail}")


def assert_same_folder(ours: Path, theirs: Path) -> None:
    """Fail unless both folders hold the same file names with the same bytes."""
    names = sorted(p.name for p in ours.iterdir())
    assert names == sorted(p.name for p in theirs.iterdir()), (ours, theirs)
    for name in names:
        assert_same_file(ours / name, theirs / name)
