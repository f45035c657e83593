"""Atomic file writes: the one place darkknowledge puts a file on disk, fsyncs it or checksums it.

Every writer goes through :func:`atomic_path`: the content is written to a temporary file in
the same folder and renamed onto the target, so a crash or a reader never sees half a file.
A full disk (or quota) while writing raises :class:`DiskFull`, naming the file. Where a power
cut must not lose a write (checkpoints, cache shards), :func:`fsync_file` and
:func:`fsync_folder` put the data and the rename on disk; :func:`file_sha256` and
:func:`file_crc32` checksum what was written.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# ENOSPC: no space left on device; EDQUOT: disk quota exceeded.
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# Files are checksummed in pieces of this size, so that a large one never sits in memory.
_READ_BYTES = 8 * 2**20


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


def write_durably(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically and durably (cache shards and manifests): fsync the
    file before the rename, and the folder after it, so a crash leaves the old state or the
    whole new file."""
    with atomic_path(path) as temporary, open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    fsync_folder(path.parent)


def fsync_file(path: str | os.PathLike) -> None:
    """Put a written file's data on disk (for files written by another library, e.g.
    safetensors, whose handle we never see)."""
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_folder(folder: str | os.PathLike) -> None:
    """fsync a folder, so that the names in it (a rename) are on disk. Not every platform
    can open a folder (Windows cannot); there the rename is as durable as the OS makes it."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of a file, read in 8 MiB pieces.

    >>> import tempfile
    >>> target = Path(tempfile.mkdtemp()) / "abc"
    >>> _ = target.write_bytes(b"abc")
    >>> file_sha256(target)[:16], file_crc32(target) == zlib.crc32(b"abc")
    ('ba7816bf8f01cfea', True)
    """
    hasher = hashlib.sha256()
    for piece in _pieces(path):
        hasher.update(piece)
    return hasher.hexdigest()


def file_crc32(path: str | os.PathLike) -> int:
    """CRC-32 of a file (as ``zlib.crc32``), read in 8 MiB pieces."""
    value = 0
    for piece in _pieces(path):
        value = zlib.crc32(piece, value)
    return value


def _pieces(path: str | os.PathLike) -> Iterator[bytes]:
    with open(path, "rb") as handle:
        while piece := handle.read(_READ_BYTES):
            yield piece
