"""``dk demo rlhf``: GRPO on the ``dk demo llm`` model with and without a KL penalty to the
reference. The demo itself is :mod:`darkknowledge.llm.rlhf`."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
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

DEFAULT_OUTPUT_DIR = "reports/rlhf-demo"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_quick_argument(parser)
    parser.add_argument("--steps", type=int, help="policy-gradient steps per KL coefficient")
    parser.add_argument(
        "--kl-coefficients", type=float, nargs="+", metavar="BETA", help="default: 0 0.05 0.2"
    )
    parser.add_argument("--target", help="the rewarded byte, one character (default: e)")
    parser.add_argument("--learning-rate", type=float, help="Adam learning rate of the policy")
    parser.add_argument("--seed", type=int, help="random seed")
    add_cache_dir_argument(parser, "where the llm demo's teacher is cached")
    add_output_dir_argument(
        parser, f"results.json and reward_kl.png; default: {DEFAULT_OUTPUT_DIR}"
    )
    add_threads_argument(parser, default=None, says="default: 1 with --quick, else torch's")


def run(args: argparse.Namespace) -> int:
    from ..llm.rlhf import QUICK, RLHFRecipe, run_rlhf_demo
    from ..llm.rlhf_plots import format_table

    recipe = QUICK if args.quick else RLHFRecipe()
    overrides = {
        name: getattr(args, name)
        for name in ("steps", "target", "learning_rate", "seed")
        if getattr(args, name, None) is not None
    }
    if args.kl_coefficients is not None:
        overrides["kl_coefficients"] = tuple(args.kl_coefficients)
    recipe = replace(recipe, **overrides)
    # The quick models are tiny: a second thread only adds contention.
    threads = args.threads if args.threads is not None else (1 if args.quick else None)
    check_at_least_one({"--threads": threads})
    output_dir = Path(args.output_dir or DEFAULT_OUTPUT_DIR)
    with torch_threads(threads):  # run_rlhf_demo checks the recipe before any work
        report = run_rlhf_demo(
            recipe,
            cache_dir=Path(args.cache_dir),
            output_dir=output_dir,
            log=say,
            progress=sys.stderr.isatty(),
        )
    print(format_table(report))
    print(f"report: {output_dir / 'results.json'}, {output_dir / 'reward_kl.png'}")
    return 0
