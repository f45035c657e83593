"""Checkpoint folders on disk: layout, crash-safe writing, discovery, verification, pruning.

Layout of ``<output_dir>/checkpoints/step-<step:08d>/`` (what goes into the files is
:mod:`darkknowledge.train.resume`'s business)::

    student.safetensors       the student's state dict
    temperature.safetensors   the LearnableTemperature's state dict (when there is one)
    optimizer.safetensors     every tensor of the optimizer's state dict, keyed by its path
    optimizer.json            the rest of the optimizer's state dict, tensors replaced by their keys
    state.json                step, data position, world size, grad scaler, config hash, last records
    config.json               the run's resolved config (when the Distiller was given one)
    sharded/                  under FSDP, instead of student.* and optimizer.*: the shards of
                              both, one file per process (torch.distributed.checkpoint)
    rng-rank<r>.json          python and numpy RNG states of process r
    rng-rank<r>.safetensors   torch CPU (and CUDA) RNG states of process r
    manifest.json             size and CRC-32 of every other file (sub-folders included);
                              written last

Writing (:func:`start`, then the files, then :func:`finish`): leftovers of a killed save
(``.tmp-*``, ``.old-*``) are removed, the files go into ``.tmp-step-<step>``, each is fsynced,
then the manifest, the folder, the rename to ``step-<step>`` and the parent folder. So a folder
named ``step-*`` is complete, a power cut included, and a kill at any moment leaves at worst a
``.tmp-*`` folder that the next save removes. Checkpoints written before manifests existed
have none; they are checked for their required files only.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .._files import file_crc32, fsync_file, fsync_folder, writing
from .tree import (  # noqa: F401  (re-exported: the checkpoint format's helpers)
    decode_tree,
    encode_tree,
    plain_state_dict,
    rng_state,
    set_rng_state,
)

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
# Files every checkpoint has had since the first version (for checkpoints without a manifest).
REQUIRED = ("state.json", "student.safetensors", "optimizer.json", "optimizer.safetensors")
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated or corrupted; the message names the file."""


def checkpoint_dir(output_dir: str | os.PathLike, step: int) -> Path:
    return Path(output_dir) / CHECKPOINTS / f"step-{step:08d}"


def complete_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Every published checkpoint under ``output_dir``, the newest (highest step) first."""
    root = Path(output_dir) / CHECKPOINTS
    found = [(int(m.group(1)), p) for p in root.glob("step-*") if (m := _STEP_DIR.match(p.name))]
    return [path for _, path in sorted(found, reverse=True)]


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The published checkpoint with the highest step under ``output_dir``, or None."""
    found = complete_checkpoints(output_dir)
    return found[0] if found else None


# ---- writing -----------------------------------------------------------------------------


def start(final: Path) -> Path:
    """Remove leftovers of interrupted saves and create the temporary folder for ``final``
    (main process only; the others write into it after a barrier)."""
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    for leftover in [*root.glob(".tmp-*"), *root.glob(".old-*")]:
        shutil.rmtree(leftover, ignore_errors=True)
    temporary = root / f".tmp-{final.name}"
    temporary.mkdir()
    return temporary


def write_json(path: Path, obj: Any) -> None:
    """Write JSON into a checkpoint's temporary folder and fsync it (the folder is published
    by a rename once complete, so the file itself needs no rename). A full disk raises
    :class:`darkknowledge._files.DiskFull` naming the file."""
    with writing(path), open(path, "w", encoding="utf-8") as handle:
        json.dump(obj, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    with writing(path):  # safetensors reports a full disk as its own error: made a DiskFull
        save_file(tensors, str(path))
        fsync_file(path)


def finish(temporary: Path, final: Path) -> Path:
    """Write the manifest of every file in ``temporary``, then publish it as ``final``."""
    files = sorted(p for p in temporary.rglob("*") if p.is_file())
    manifest = {
        name: {"bytes": p.stat().st_size, "crc32": file_crc32(p)}
        for p in files
        if (name := p.relative_to(temporary).as_posix()) != MANIFEST
    }
    write_json(temporary / MANIFEST, manifest)
    for folder in sorted(p for p in temporary.rglob("*") if p.is_dir()):
        fsync_folder(folder)  # sub-folders (FSDP's sharded/) hold names too
    fsync_folder(temporary)
    publish(temporary, final)
    return final


def publish(temporary: Path, final: Path) -> None:
    """Rename a finished temporary folder to its final name (replacing an older copy), and
    fsync the parent so that the rename survives a power cut."""
    if final.exists():
        old = final.with_name(f".old-{final.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(temporary, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(temporary, final)
    fsync_folder(final.parent)


def prune(output_dir: str | os.PathLike, keep_last: int | None) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints (None or 0: keep all). Each is
    renamed to ``.old-*`` first, so a kill while deleting never leaves a half-deleted folder
    that looks complete. Returns the deleted paths."""
    if not keep_last:
        return []
    removed = complete_checkpoints(output_dir)[keep_last:]
    for path in removed:
        doomed = path.with_name(f".old-{path.name}")
        os.replace(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    return removed


# ---- reading -----------------------------------------------------------------------------


def verify(path: Path) -> None:
    """Raise :class:`CheckpointError` naming the first missing or corrupted file of the
    checkpoint at ``path`` (every file the manifest lists, with its size and CRC-32)."""
    manifest_path = path / MANIFEST
    if not manifest_path.exists():
        for name in REQUIRED:  # a checkpoint from before manifests existed
            if not (path / name).is_file():
                raise CheckpointError(f"checkpoint file {path / name} is missing")
        return
    manifest = read_json(manifest_path)
    for name, expected in manifest.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint file {file} is missing")
        size = file.stat().st_size
        if size != expected["bytes"]:
            raise CheckpointError(
                f"checkpoint file {file} is corrupted: {size} bytes, {expected['bytes']} were written"
            )
        if file_crc32(file) != expected["crc32"]:
            raise CheckpointError(
                f"checkpoint file {file} is corrupted: its CRC-32 differs from the one written"
            )


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {path} is missing") from None
    except (ValueError, UnicodeDecodeError) as error:
        raise CheckpointError(f"checkpoint file {path} is corrupted: {error}") from None


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not Path(path).is_file():
        raise CheckpointError(f"checkpoint file {path} is missing")
    try:
        return load_file(str(path), device="cpu")
    except Exception as error:  # safetensors raises its own SafetensorError (and OSError)
        raise CheckpointError(f"checkpoint file {path} is corrupted: {error}") from None
