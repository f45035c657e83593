"""Flags that several commands share, spelled once."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path


def add_output_dir_argument(parser: argparse.ArgumentParser, default_help: str) -> None:
    """``--output-dir DIR``, the one report-folder flag of every demo; ``--output`` is its
    deprecated spelling (still accepted, with a note on stderr)."""
    parser.add_argument(
        "--output-dir", default=None, metavar="DIR", help=f"report folder ({default_help})"
    )
    parser.add_argument(
        "--output", action=_DeprecatedOutput, dest="output_dir", help=argparse.SUPPRESS
    )


def add_quick_argument(parser: argparse.ArgumentParser) -> None:
    """``--quick``: a demo's tiny models and few steps (seconds; for tests)."""
    parser.add_argument(
        "--quick", action="store_true", help="tiny models and few steps (seconds; for tests)"
    )


def add_cache_dir_argument(parser: argparse.ArgumentParser, what: str) -> None:
    """``--cache-dir DIR``, where the demos cache their trained teacher (and drafts):
    ``$DK_CACHE_DIR``, else ``~/.cache/darkknowledge``. ``what`` says what this demo keeps there."""
    parser.add_argument(
        "--cache-dir",
        default=os.environ.get("DK_CACHE_DIR", str(Path.home() / ".cache" / "darkknowledge")),
        help=f"{what} (default: $DK_CACHE_DIR or ~/.cache/darkknowledge)",
    )


def add_threads_argument(
    parser: argparse.ArgumentParser, *, default: int | None, says: str
) -> None:
    """``--threads N``: torch's CPU threads while the demo runs (:func:`torch_threads`);
    ``says`` describes the default in the help."""
    parser.add_argument("--threads", type=int, default=default, help=f"torch CPU threads ({says})")


def say(message: str) -> None:
    """A demo's progress line, flushed: its stages are minutes apart when piped."""
    print(message, flush=True)


def check_at_least_one(flags: dict[str, int | None]) -> None:
    """Refuse a counting flag below 1, naming it (None: not given). Checked before minutes
    of training.

    >>> check_at_least_one({"--steps": 3, "--threads": None})
    >>> check_at_least_one({"--steps": 0})
    Traceback (most recent call last):
    ...
    ValueError: --steps must be >= 1, got 0
    """
    for flag, value in flags.items():
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's CPU threads set to ``threads`` (None: left alone) while a demo runs, and restored
    after it: tests call ``darkknowledge.cli.main`` in their own process."""
    import torch

    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class _DeprecatedOutput(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(f"{parser.prog}: note: --output is deprecated, use --output-dir", file=sys.stderr)
        setattr(namespace, self.dest, values)
