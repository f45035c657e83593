"""``dk demo llm``: distil a byte-level GPT-2 on the Python standard library, offline.

The demo itself is :mod:`darkknowledge.llm.demo`; this module reads and checks the flags,
prints each stage as it starts (training shows a progress bar when stderr is a terminal) and
ends by saying where the report went.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import asdict
from pathlib import Path

from ._flags import (
    add_cache_dir_argument,
    add_output_dir_argument,
    add_quick_argument,
    add_threads_argument,
    check_at_least_one,
    say,
    torch_threads,
)

DEFAULT_OUTPUT_DIR = "reports/llm-demo"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_quick_argument(parser)
    parser.add_argument("--teacher-steps", type=int, help="teacher training steps")
    parser.add_argument(
        "--student-steps", type=int, help="student training steps (each of the two runs)"
    )
    parser.add_argument("--temperature", type=float, help="distillation temperature")
    parser.add_argument("--alpha", type=float, help="weight of the soft (distillation) term")
    parser.add_argument("--seed", type=int, help="random seed")
    add_cache_dir_argument(parser, "where trained teachers are cached")
    add_output_dir_argument(parser, f"results.json and val_loss.png; default: {DEFAULT_OUTPUT_DIR}")
    add_threads_argument(parser, default=None, says="default: torch's own")


def run(args: argparse.Namespace) -> int:
    from ..llm.demo import QUICK, Recipe, format_table, run_demo

    recipe = QUICK if args.quick else Recipe()
    overrides = {
        name: getattr(args, name)
        for name in ("teacher_steps", "student_steps", "temperature", "alpha", "seed")
        if getattr(args, name, None) is not None
    }
    recipe = Recipe(**{**asdict(recipe), **overrides})
    _check(recipe, args.threads)
    output_dir = Path(args.output_dir or DEFAULT_OUTPUT_DIR)
    with torch_threads(args.threads):
        report = run_demo(
            recipe, cache_dir=Path(args.cache_dir), output_dir=output_dir, log=say, progress=True
        )
    print(format_table(report))
    teacher = report["models"]["teacher"]
    print(f"teacher weights: {teacher['cache_path']}")
    print(f"report: {output_dir / 'results.json'}, {output_dir / 'val_loss.png'}")
    return 0


def _check(recipe, threads: int | None) -> None:
    """Refuse bad flags before minutes of training, naming the flag."""
    check_at_least_one(
        {"--teacher-steps": recipe.teacher_steps, "--student-steps": recipe.student_steps,
         "--threads": threads}
    )  # fmt: skip
    if not 0.0 <= recipe.alpha <= 1.0:
        raise ValueError(f"--alpha must be in [0, 1], got {recipe.alpha}")
    if not (recipe.temperature > 0 and math.isfinite(recipe.temperature)):
        raise ValueError(f"--temperature must be finite and > 0, got {recipe.temperature}")
