"""``dk distill CONFIG [key=value ...]``: distil the teacher into the student (or along a
teacher-assistant chain when the config lists ``stages``)."""

from __future__ import annotations

from ..config import load_config
from ._run import add_config_arguments, run_config


def add_arguments(parser) -> None:
    add_config_arguments(parser)


def run(args) -> int:
    run_config(load_config(args.config, args.overrides), distill=True)
    return 0
