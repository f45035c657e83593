"""Atomic file writes: the one place darkknowledge puts a file on disk.

Every writer goes through :func:`atomic_path`: the content is written to a temporary file in
the same folder and renamed onto the target, so a crash or a reader never sees half a file.
A full disk (or quota) while writing raises :class:`DiskFull`, naming the file.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# ENOSPC: no space left on device; EDQUOT: disk quota exceeded.
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class DiskFull(OSError):
    """No space left on the device (or quota exceeded) while writing ``filename``. ``kept``
    says what survived (e.g. the last good checkpoint); ``str()`` is the whole explanation.

    >>> str(DiskFull("runs/x/model.safetensors", kept="the last good checkpoint is runs/x/step-2"))
    'no space left on device while writing runs/x/model.safetensors; the last good checkpoint is runs/x/step-2'
    """

    def __init__(self, filename: str | os.PathLike, kept: str = "") -> None:
        super().__init__(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))
        self.kept = kept

    def __str__(self) -> str:
        text = f"no space left on device while writing {self.filename}"
        return f"{text}; {self.kept}" if self.kept else text


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error`` is a full disk or quota: an ``OSError`` with ENOSPC/EDQUOT, or the
    error of a writer that reports the OS error in its message (safetensors' Rust writer:
    ``... No space left on device (os error 28)``).

    >>> is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    True
    >>> is_disk_full(RuntimeError("I/O error: No space left on device (os error 28)"))
    True
    >>> is_disk_full(OSError(errno.EACCES, "Permission denied"))
    False
    """
    if isinstance(error, OSError):
        return error.errno in DISK_FULL_ERRNOS
    return any(f"(os error {number})" in str(error) for number in DISK_FULL_ERRNOS)


@contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Turn a full disk inside the block into :class:`DiskFull` naming ``path``."""
    try:
        yield
    except DiskFull:
        raise
    except Exception as error:
        if is_disk_full(error):
            raise DiskFull(path) from error
        raise


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds,
    delete it if it fails. Creates the parent folder.

    >>> import tempfile
    >>> target = Path(tempfile.mkdtemp()) / "out.txt"
    >>> with atomic_path(target) as temporary:
    ...     _ = temporary.write_text("done")
    >>> target.read_text()
    'done'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A plain name (not mkstemp), so the file gets the usual umask permissions; the pid keeps
    # two processes writing the same target from sharing a temporary file.
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}{path.suffix}")
    try:
        with writing(path):
            yield temporary
            os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)  # on a full disk, this gives the space back
        raise


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike, data: Any, *, indent: int = 2) -> Path:
    """Write ``data`` as JSON to ``path`` atomically (objects JSON cannot hold become strings)."""
    return write_text(path, json.dumps(data, indent=indent, default=str))


def save_figure(figure: Any, path: str | os.PathLike, **savefig_options: Any) -> Path:
    """Save a matplotlib figure to ``path`` atomically."""
    with atomic_path(path) as temporary:
        figure.savefig(temporary, **savefig_options)
    return Path(path)
