"""Checkpoints without pickle: tensors in safetensors, everything else in JSON.

Layout of ``<output_dir>/checkpoints/step-<step:08d>/``::

    student.safetensors       the student's state dict
    temperature.safetensors   the LearnableTemperature's state dict (when there is one)
    optimizer.safetensors     every tensor of the optimizer's state dict, keyed by its path
    optimizer.json            the rest of the optimizer's state dict, tensors replaced by their keys
    state.json                step, data position (epoch, batch index), world size, grad scaler
    rng-rank<r>.json          python and numpy RNG states of process r
    rng-rank<r>.safetensors   torch CPU (and CUDA) RNG states of process r

A checkpoint is written into ``.tmp-step-<step>`` and renamed when complete, so a directory named
``step-*`` is always whole.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .. import _files

_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_dir(output_dir: str | os.PathLike, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"step-{step:08d}"


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint with the highest step under ``output_dir``, or None."""
    root = Path(output_dir) / "checkpoints"
    found = [(int(m.group(1)), p) for p in root.glob("step-*") if (m := _STEP_DIR.match(p.name))]
    return max(found)[1] if found else None


# ---- tensors and trees -------------------------------------------------------------------


def plain_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors; tied weights (shared storage) get their own copy,
    because safetensors refuses to store two names for one buffer."""
    seen: set[tuple[int, int]] = set()
    plain = {}
    for name, tensor in state.items():
        tensor = tensor.detach()
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if key in seen:
            tensor = tensor.clone()
        seen.add(key)
        plain[name] = tensor.to("cpu").contiguous()
    return plain


def encode_tree(obj: Any, tensors: dict[str, torch.Tensor], path: str = "") -> Any:
    """JSON-able copy of a nested structure; each tensor goes into ``tensors`` under its path.

    Dicts with non-string keys (the optimizer's ``state`` is keyed by parameter index) and
    tuples are tagged so that :func:`decode_tree` gives back the same structure.

    >>> tensors = {}
    >>> tree = encode_tree({"state": {0: {"step": torch.tensor(3.0)}}, "betas": (0.9, 0.99)}, tensors)
    >>> decode_tree(tree, tensors)
    {'state': {0: {'step': tensor(3.)}}, 'betas': (0.9, 0.99)}
    """
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().to("cpu").contiguous()
        return {"__tensor__": path}
    if isinstance(obj, dict):
        items = [
            [encode_tree(k, tensors, ""), encode_tree(v, tensors, f"{path}.{k}".lstrip("."))]
            for k, v in obj.items()
        ]
        return {"__dict__": items}
    if isinstance(obj, tuple):
        return {"__tuple__": [encode_tree(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode_tree(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(
        f"cannot store a {type(obj).__name__} at {path!r} in a checkpoint (JSON or tensors only)"
    )


def decode_tree(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [decode_tree(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__tuple__" in obj:
            return tuple(decode_tree(v, tensors) for v in obj["__tuple__"])
        return {decode_tree(k, tensors): decode_tree(v, tensors) for k, v in obj["__dict__"]}
    return obj


# ---- random number generators ------------------------------------------------------------


def rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    """This process's RNG states: python and numpy as JSON, torch (and CUDA) as tensors."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return state, tensors


def set_rng_state(state: dict, tensors: dict[str, torch.Tensor]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda.{i}"] for i in range(len(tensors) - 1) if f"cuda.{i}" in tensors]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])


# ---- atomic files ------------------------------------------------------------------------


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically: a temp file in the same directory, then ``os.replace``."""
    _files.write_json(path, obj, indent=1)


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    with _files.atomic_path(path) as temporary:
        save_file(tensors, str(temporary))


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path), device="cpu")


def temp_dir_for(final: Path) -> Path:
    return final.with_name(f".tmp-{final.name}")


def publish(tmp: Path, final: Path) -> None:
    """Rename a finished temp directory to its final name (replacing an older copy)."""
    if final.exists():
        old = final.with_name(f".old-{final.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
