"""``dk distill CONFIG [key=value ...] [--resume | --overwrite]``: distil the teacher into the student (or along a
teacher-assistant chain when the config lists ``stages``)."""

from __future__ import annotations

from ._run import add_run_arguments, run_command


def add_arguments(parser) -> None:
    add_run_arguments(parser)


def run(args) -> int:
    return run_command(args, distill=True)
