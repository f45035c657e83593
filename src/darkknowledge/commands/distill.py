"""``dk distill CONFIG [key=value ...] [--resume | --overwrite]``: distil the teacher into the student (or along a
teacher-assistant chain when the config lists ``stages``)."""

from __future__ import annotations

from ..config import load_config
from ._run import add_run_arguments, run_config


def add_arguments(parser) -> None:
    add_run_arguments(parser)


def run(args) -> int:
    config = load_config(args.config, args.overrides)
    run_config(config, distill=True, resume=args.resume, overwrite=args.overwrite)
    return 0
