"""Atomic file writes: the one place darkknowledge puts a file on disk.

Every writer goes through :func:`atomic_path`: the content is written to a temporary file in
the same folder and renamed onto the target, so a crash or a reader never sees half a file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


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
        yield temporary
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
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
