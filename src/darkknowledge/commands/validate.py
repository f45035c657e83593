"""``dk validate CONFIG [key=value ...]``: check a config and list every problem at once.

Exit code 0 when the config is valid, 2 otherwise (one line per problem, each naming its field).
"""

from __future__ import annotations

import sys

from ..config import ConfigError, apply_overrides, check_config, read_yaml
from ._run import add_config_arguments


def add_arguments(parser) -> None:
    add_config_arguments(parser)


def run(args) -> int:
    try:
        raw = apply_overrides(read_yaml(args.config), args.overrides)
    except ConfigError as error:
        problems = error.errors
    else:
        _, problems = check_config(raw)
    if problems:
        print(f"{args.config}: {len(problems)} problem(s)", file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        return 2
    print(f"{args.config}: ok")
    return 0
