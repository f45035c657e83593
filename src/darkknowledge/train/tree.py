"""What a checkpoint holds besides weights, as JSON and tensors (never pickle): nested state
dicts (an optimizer's) and the random number generators of a process."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


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
    """The structure :func:`encode_tree` encoded, its tensors taken from ``tensors``."""
    if isinstance(obj, list):
        return [decode_tree(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__tuple__" in obj:
            return tuple(decode_tree(v, tensors) for v in obj["__tuple__"])
        return {decode_tree(k, tensors): decode_tree(v, tensors) for k, v in obj["__dict__"]}
    return obj


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
    """Restore what :func:`rng_state` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda.{i}"] for i in range(len(tensors) - 1) if f"cuda.{i}" in tensors]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
