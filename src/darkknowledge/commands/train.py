"""``dk train CONFIG [key=value ...] [--resume | --overwrite]``: the baseline, the same student trained from labels alone.

The config's ``teacher`` and ``distill`` sections are not used; with ``stages``, the last stage
(the final student) is trained.
"""

from __future__ import annotations

from ._run import add_run_arguments, run_command


def add_arguments(parser) -> None:
    add_run_arguments(parser)


def run(args) -> int:
    return run_command(args, distill=False)
