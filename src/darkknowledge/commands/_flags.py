"""Flags that several commands share, spelled once."""

from __future__ import annotations

import argparse
import sys


def add_output_dir_argument(parser: argparse.ArgumentParser, default_help: str) -> None:
    """``--output-dir DIR``, the one report-folder flag of every demo; ``--output`` is its
    deprecated spelling (still accepted, with a note on stderr)."""
    parser.add_argument(
        "--output-dir", default=None, metavar="DIR", help=f"report folder ({default_help})"
    )
    parser.add_argument(
        "--output", action=_DeprecatedOutput, dest="output_dir", help=argparse.SUPPRESS
    )


class _DeprecatedOutput(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(f"{parser.prog}: note: --output is deprecated, use --output-dir", file=sys.stderr)
        setattr(namespace, self.dest, values)
