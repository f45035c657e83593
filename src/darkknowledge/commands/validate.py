"""``dk validate CONFIG [key=value ...] [--for distill|train|eval]``: every problem at once.

Checks the config itself (keys, values, schedules) and then what the command will need from
the machine: the sections it reads, the checkpoint files, and every
``package.module:callable`` (imported and checked to be callable). Exit code 0 when all is
well, 2 otherwise (one line per problem, each naming its field).
"""

from __future__ import annotations

import sys

from ..config import (
    COMMANDS,
    ConfigError,
    apply_overrides,
    check_config,
    check_environment,
    partial_config,
    read_yaml,
)
from ._run import add_config_arguments


def add_arguments(parser) -> None:
    add_config_arguments(parser)
    parser.add_argument(
        "--for",
        dest="command",
        choices=COMMANDS,
        default="distill",
        help="the command the config is meant for (default: distill, which needs a teacher)",
    )


def run(args) -> int:
    try:
        raw = apply_overrides(read_yaml(args.config), args.overrides)
    except ConfigError as error:
        problems = error.errors
    else:
        config, problems = check_config(raw)
        if not raw:
            needs = (
                "`student` and `teacher` sections" if args.command == "distill" else "a `student`"
            )
            problems = [f"config: the file is empty; dk {args.command} needs {needs}"]
        else:
            # The machine is checked for the valid part too, so that one run lists everything.
            config = config if config is not None else partial_config(raw)
            if config is not None:
                found = check_environment(config, command=args.command)
                problems += [p for p in found if not _reported(p, problems)]
    if problems:
        print(f"{args.config}: {len(problems)} problem(s)", file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        return 2
    print(f"{args.config}: ok for dk {args.command}")
    return 0


def _reported(problem: str, problems: list[str]) -> bool:
    """Whether the field of ``problem`` (or a field inside it) already has a problem: a section
    that failed its checks is left out of the partial config, and is not also "missing"."""
    field = problem.split(":", 1)[0].split(" ", 1)[0]
    return any(
        (path := other.split(":", 1)[0]) == field or path.startswith(field + ".")
        for other in problems
    )
