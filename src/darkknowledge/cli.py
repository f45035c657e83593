"""The ``dk`` command.

Each subcommand lives in the module that owns its work; this file only maps names to modules.
A module exposes ``add_arguments(parser)`` and ``run(args) -> int``. Modules are imported only
when their command runs, so ``dk --help`` stays fast (transformers is slow to import).

Bad input (``ValueError``, ``TypeError``, a missing file) prints one line and exits with 2; a
run stopped by a full disk, a non-finite loss or a lost process prints one line and exits with 1.

User code named in a config (``package.module:callable``) is found in the current folder and
in the config's folder, as ``python -m`` would find a module there, without ``PYTHONPATH=.``.
Installed packages come first: the folders are appended to ``sys.path``, for the command only.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import os
import sys
from collections.abc import Iterator
from typing import Any

from .processes import end_processes, launched_with_several_processes, leave_process_group

# name -> (module, one-line help). A plain dict: explicit, no import-time registration.
COMMANDS: dict[str, tuple[str, str]] = {
    "signal-gap": (
        "darkknowledge.commands.signal_gap",
        "soft-loss gradient norm vs temperature, with and without T^2",
    ),
    "distill": (
        "darkknowledge.commands.distill",
        "distil a teacher into a student from a YAML config",
    ),
    "train": (
        "darkknowledge.commands.train",
        "train the config's student from labels alone (the baseline)",
    ),
    "eval": (
        "darkknowledge.commands.eval",
        "evaluate saved student weights on the config's eval data",
    ),
    "speculate": (
        "darkknowledge.commands.speculate",
        "speculative decoding of the config's teacher by its student (or MTP heads), measured",
    ),
    "validate": (
        "darkknowledge.commands.validate",
        "check a config and list every problem at once",
    ),
    "cache-teacher": (
        "darkknowledge.commands.cache_teacher",
        "capture the config's teacher once into teacher.cache (dk distill then trains from it)",
    ),
    "demo": (
        "darkknowledge.commands.demo",
        "run a self-contained demo: classifier (default), llm, rlhf or speculative",
    ),
}

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT = 0, 1, 2


class UsageError(ValueError):
    """Bad input that the CLI reports in one line with exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dk", description="darkknowledge: knowledge distillation for PyTorch."
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        # add_help=False: "-h" must reach the full parser built in main(), not this empty one.
        sub = subparsers.add_parser(name, help=help_text, description=help_text, add_help=False)
        sub.set_defaults(_module=module_name)
        # Arguments are added lazily in main(), once we know which command runs.
    return parser


def main(argv: list[str] | None = None) -> int:
    as_program = argv is None  # the dk command itself, not a call from Python (a test)
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    known, _ = parser.parse_known_args(argv)
    if known.version:
        from darkknowledge import __version__

        print(__version__)
        return EXIT_OK
    if known.command is None:
        parser.print_help()
        return EXIT_BAD_INPUT
    module = importlib.import_module(known._module)
    sub = argparse.ArgumentParser(
        prog=f"dk {known.command}", description=COMMANDS[known.command][1]
    )
    module.add_arguments(sub)
    args = _parse(sub, argv[argv.index(known.command) + 1 :])  # exits 2 on argparse errors
    broken = False
    try:
        code, broken = _dispatch(module, args, known.command)
    finally:
        # A broken group (a collective failed) is not torn down: gloo may abort a process
        # whose peers are gone.
        if not broken:
            leave_process_group()
    if as_program and (broken or launched_with_several_processes()):
        # Every file is written and closed by now; gloo can still abort the interpreter's own
        # exit (see darkknowledge.processes), so the process leaves without it.
        end_processes(code, destroy_group=False)
    return code


def _dispatch(module: Any, args: argparse.Namespace, command: str) -> tuple[int, bool]:
    """Run the command: its exit code, with errors that explain themselves as one line, and
    whether a collective failed (the process group is then unusable)."""
    try:
        with _user_code_folders(getattr(args, "config", None)):
            return int(module.run(args) or EXIT_OK), False
    except (ValueError, TypeError, FileNotFoundError, KeyError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"dk {command}: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT, False
    except KeyboardInterrupt:
        print(f"dk {command}: interrupted", file=sys.stderr)
        return 130, False
    except Exception as error:
        if not _run_failure(error):
            raise
        print(f"dk {command}: error: {error}", file=sys.stderr)
        return EXIT_FAILURE, _collective_failure(error)


def _run_failure(error: Exception) -> bool:
    """A run that stopped for a reason its message explains in one line: a full disk (an
    OSError with ENOSPC or EDQUOT, ``darkknowledge._files.DiskFull``), a non-finite loss, a lost
    or stuck process (``darkknowledge.train.failures.RunFailure``; looked up, not imported,
    so that ``dk --help`` never imports torch)."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    failures = sys.modules.get("darkknowledge.train.failures")
    return failures is not None and isinstance(error, failures.RunFailure)


def _collective_failure(error: Exception) -> bool:
    failures = sys.modules.get("darkknowledge.train.failures")
    return failures is not None and isinstance(error, failures.CollectiveFailure)


def _parse(parser: argparse.ArgumentParser, arguments: list[str]) -> argparse.Namespace:
    """Options and ``key=value`` overrides in any order (``dk distill CONFIG --resume a=1``)."""
    try:
        return parser.parse_intermixed_args(arguments)
    except TypeError:  # a parser with a REMAINDER (dk demo) takes its arguments in order
        return parser.parse_args(arguments)


@contextlib.contextmanager
def _user_code_folders(config: str | None) -> Iterator[None]:
    """The current folder and the config's folder on ``sys.path`` while the command runs (the
    ``dk`` script's own folder is the virtual environment's bin/, so neither is there)."""
    folders = [os.getcwd()]
    if isinstance(config, str) and os.path.isfile(config):
        folders.append(os.path.dirname(os.path.abspath(config)))
    added = [f for f in dict.fromkeys(folders) if f not in sys.path]
    sys.path.extend(added)
    try:
        yield
    finally:
        for folder in added:
            with contextlib.suppress(ValueError):
                sys.path.remove(folder)


if __name__ == "__main__":
    sys.exit(main())
