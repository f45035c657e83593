"""The bad-input catalogue: every case, how it runs, and what counts as a clear answer.

A :class:`Case` is one bad input and the call that meets it, run in a fresh scratch folder
(the current folder while it runs, shown as ``$TMP`` in messages, so the text is the same on
every machine). Its outcome is the exception's type and first line, the exit code and stderr
of a ``dk`` command run in-process, or, for inputs whose answer is a documented result (a NaN
that propagates), the result itself. ``tests/reliability/make_table.py`` writes the outcomes
into ``docs/reliability.md``; the tests check each outcome and that the doc is current.

Malicious pickles: :func:`plant_pickle` writes a pickle whose unpickling creates
``$TMP/PWNED``; after every case the runner records whether that file appeared.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MARKER = "PWNED"
# What a bad input may raise: the house rule (ValueError / TypeError naming the argument), and
# FileNotFoundError for a path that does not exist (the CLI prints all three in one line).
ALLOWED = (ValueError, TypeError, FileNotFoundError)


@dataclass(frozen=True)
class Case:
    area: str  # the table's section: "config", "CLI", "tensors", "models", "files"
    what: str  # the bad input, in Markdown
    via: str  # the function or command that meets it
    run: Callable[[Path], Any]  # meets it; gets the scratch folder (also the current folder)
    names: str = ""  # text the answer must contain: the argument, field or file it is about
    trust: bool = False  # a malicious pickle is planted: also listed under "Trust"


@dataclass(frozen=True)
class Outcome:
    kind: str  # exception type, "exit N", or "result"
    message: str
    marker: bool  # the planted pickle ran


@dataclass(frozen=True)
class Cli:
    """What an in-process ``dk`` command printed on stderr, and its exit code."""

    code: int
    stderr: str


@dataclass(frozen=True)
class Result:
    """A documented answer that is not an error (e.g. a NaN that propagates)."""

    text: str


def dk(*argv: str) -> Cli:
    """Run ``dk ARGV`` in this process (as the installed script would), capturing stderr."""
    from darkknowledge.cli import main

    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = main(list(argv))
    return Cli(code, err.getvalue())


def run_case(case: Case) -> Outcome:
    """Run ``case`` in a fresh scratch folder; exceptions outside :data:`ALLOWED` propagate."""
    with tempfile.TemporaryDirectory(prefix="dk-reliability-") as scratch:
        folder = Path(scratch).resolve()
        previous = os.getcwd()
        os.chdir(folder)
        try:
            kind, message = _meet(case, folder)
        finally:
            os.chdir(previous)
        marker = (folder / MARKER).exists()
    for spelling in (str(folder), os.path.realpath(folder)):
        message = message.replace(spelling, "$TMP")
    return Outcome(kind, message, marker)


def _meet(case: Case, folder: Path) -> tuple[str, str]:
    try:
        answer = case.run(folder)
    except ALLOWED as error:
        return type(error).__name__, str(error)
    if isinstance(answer, Cli):
        return f"exit {answer.code}", answer.stderr.strip()
    if isinstance(answer, Result):
        return "result", answer.text
    raise AssertionError(
        f"{case.what} ({case.via}): no error and no documented result, got {answer!r}"
    )


# ---- malicious files ---------------------------------------------------------------------------


class _CreatesMarker:
    """Unpickling this calls ``open(<folder>/PWNED, "w")``: proof that the pickle ran."""

    def __init__(self, folder: Path) -> None:
        self.path = str(Path(folder) / MARKER)

    def __reduce__(self):
        return (open, (self.path, "w"))


def plant_pickle(path: str | Path, *, torch_save: bool = False) -> Path:
    """Write a malicious pickle at ``path`` (raw ``pickle``, or a ``torch.save`` zip archive)
    that creates ``PWNED`` in the current folder when unpickled."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"weight": _CreatesMarker(Path.cwd())}
    if torch_save:
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))  # torch.save's own protocol
    return path


def write(path: str | Path, text: str | bytes) -> str:
    """Write a file (text or bytes), creating its folder; return its path as a string."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return str(path)


def all_cases() -> list[Case]:
    """Every case of every area, in table order."""
    from cases_config import CONFIG_CASES
    from cases_files import FILE_CASES
    from cases_models import MODEL_CASES
    from cases_tensors import TENSOR_CASES

    return [*CONFIG_CASES, *TENSOR_CASES, *MODEL_CASES, *FILE_CASES]
