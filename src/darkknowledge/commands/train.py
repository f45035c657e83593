"""``dk train CONFIG [key=value ...] [--resume | --overwrite]``: the baseline, the same student trained from labels alone.

The config's ``teacher`` and ``distill`` sections are not used; with ``stages``, the last stage
(the final student) is trained.
"""

from __future__ import annotations

from ..config import load_config
from ._run import add_run_arguments, run_config


def add_arguments(parser) -> None:
    add_run_arguments(parser)


def run(args) -> int:
    config = load_config(args.config, args.overrides)
    run_config(config, distill=False, resume=args.resume, overwrite=args.overwrite)
    return 0
