"""Vet the one pickle that resuming under FSDP reads: ``torch.distributed.checkpoint``'s
``.metadata`` file, which its ``FileSystemReader`` loads with plain ``pickle.load``.

A pickle names the callables that rebuild it, so a ``.metadata`` planted in a checkpoint folder
could run any code on resume. :func:`check_metadata` walks the file first with an unpickler
that resolves only the classes a metadata file is made of (the dataclasses of
``torch.distributed.checkpoint.metadata``, its storage records, ``torch.Size``, dtypes,
layouts and memory formats, paths) and refuses anything else with a ``CheckpointError`` naming the
file and the name it asked for. What passes builds only those objects, so DCP's own load of
the same bytes runs nothing else. (A file swapped between the check and the load is outside
what this guards: keep checkpoint folders writable by you alone.)
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch

from .checkpoint import CheckpointError

METADATA_FILE = ".metadata"
# Modules whose own classes a DCP metadata file may hold (classes defined there, nothing they
# import), and single names elsewhere.
_CLASS_MODULES = ("torch.distributed.checkpoint.metadata",)
_NAMES = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),  # a lookup of torch.strided & co. by name
    ("torch", "Size"),
    ("pathlib", "Path"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
}
_TORCH_VALUES = (torch.dtype, torch.layout, torch.memory_format)


class _Refused(pickle.UnpicklingError):
    """A name the metadata unpickler does not resolve."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if "." not in name:  # dotted names reach attributes of attributes: never needed here
            if (module, name) in _NAMES:
                return super().find_class(module, name)
            if module in _CLASS_MODULES:
                found = super().find_class(module, name)
                if isinstance(found, type) and found.__module__ == module:
                    return found
            if module == "torch" and isinstance(getattr(torch, name, None), _TORCH_VALUES):
                return getattr(torch, name)
        raise _Refused(f"{module}.{name}")


def check_metadata(folder: str | Path) -> None:
    """Raise :class:`CheckpointError` (a ``ValueError``) unless ``folder/.metadata`` holds only
    DCP metadata objects."""
    path = Path(folder) / METADATA_FILE
    try:
        data = path.read_bytes()
    except OSError as error:
        raise CheckpointError(f"checkpoint file {path} cannot be read: {error}") from None
    try:
        _MetadataUnpickler(io.BytesIO(data)).load()
    except _Refused as error:
        raise CheckpointError(
            f"checkpoint file {path} is not torch.distributed.checkpoint metadata: it names "
            f"{error}, which such a file never holds; refusing to unpickle it (unpickling "
            "can run code)"
        ) from None
    except Exception as error:  # truncated or garbled bytes
        raise CheckpointError(
            f"checkpoint file {path} is damaged: {type(error).__name__}: {error}"
        ) from None
