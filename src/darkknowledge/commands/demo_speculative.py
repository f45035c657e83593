"""``dk demo speculative``: drafts trained on data, distilled per divergence, and MTP heads,
as drafts of the ``dk demo llm`` teacher; acceptance offline and in decoding, measured and
predicted speed-ups. The demo itself is :mod:`darkknowledge.llm.speculative_demo`."""

from __future__ import annotations

import argparse
import math
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

DEFAULT_OUTPUT_DIR = "reports/speculative-demo"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_quick_argument(parser)
    parser.add_argument("--draft-steps", type=int, help="training steps of every draft")
    parser.add_argument("--mtp-steps", type=int, help="training steps of the MTP heads")
    parser.add_argument(
        "--divergences",
        nargs="+",
        metavar="NAME",
        help="divergences of the distilled drafts (default: tvd forward_kl reverse_kl jsd)",
    )
    parser.add_argument(
        "--on-policy",
        nargs="*",
        metavar="NAME",
        help="divergences of drafts distilled on their own samples (default: tvd; none: skip)",
    )
    parser.add_argument("--gamma", type=int, help="draft tokens per target call")
    parser.add_argument("--temperature", type=float, help="decoding temperature of both models")
    parser.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    parser.add_argument("--prompts", type=int, help="held-out prompts decoded")
    parser.add_argument("--max-new-tokens", type=int, help="tokens decoded per prompt")
    parser.add_argument("--repeats", type=int, help="timings are medians over this many")
    parser.add_argument("--seed", type=int, help="random seed")
    add_cache_dir_argument(
        parser, "the llm demo's teacher cache; trained drafts are cached there too"
    )
    add_output_dir_argument(
        parser, f"results.json and speculative.png; default: {DEFAULT_OUTPUT_DIR}"
    )
    add_threads_argument(parser, default=None, says="default: 1")


def run(args: argparse.Namespace) -> int:
    from ..llm.speculative_demo import (
        QUICK,
        SpeculativeRecipe,
        format_tables,
        run_speculative_demo,
        with_overrides,
    )

    recipe = with_overrides(
        QUICK if args.quick else SpeculativeRecipe(),
        draft_steps=args.draft_steps, mtp_steps=args.mtp_steps, gamma=args.gamma,
        temperature=args.temperature, prompts=args.prompts, max_new_tokens=args.max_new_tokens,
        repeats=args.repeats, seed=args.seed, greedy=True if args.greedy else None,
        divergences=tuple(args.divergences) if args.divergences else None,
        on_policy=tuple(args.on_policy) if args.on_policy is not None else None,
    )  # fmt: skip
    _check(recipe, args.threads)
    output_dir = Path(args.output_dir or DEFAULT_OUTPUT_DIR)
    # One thread: at these sizes a forward pass is mostly per-call overhead, which a second
    # thread does not shorten, and the timings are steadier on a shared machine.
    with torch_threads(args.threads or 1):
        report = run_speculative_demo(
            recipe, cache_dir=Path(args.cache_dir), output_dir=output_dir, log=say, progress=True
        )
    print(format_tables(report))
    print(f"report: {output_dir / 'results.json'}, {output_dir / 'speculative.png'}")
    return 0


def _check(recipe, threads: int | None) -> None:
    """Refuse bad flags before minutes of training, naming the flag."""
    from ..losses._checks import DIVERGENCES

    counts = ("draft_steps", "mtp_steps", "gamma", "prompts", "max_new_tokens", "repeats")
    check_at_least_one({f"--{name.replace('_', '-')}": getattr(recipe, name) for name in counts})
    if not (recipe.temperature > 0 and math.isfinite(recipe.temperature)):
        raise ValueError(f"--temperature must be finite and > 0, got {recipe.temperature}")
    for flag, names in (("--divergences", recipe.divergences), ("--on-policy", recipe.on_policy)):
        unknown = [name for name in names if name not in DIVERGENCES]
        if unknown:
            raise ValueError(f"{flag}: unknown {unknown}; choose from {', '.join(DIVERGENCES)}")
    if recipe.prompt_length + recipe.max_new_tokens > recipe.teacher.block_size:
        raise ValueError(
            f"--max-new-tokens must leave room for the {recipe.prompt_length}-byte prompt in the "
            f"models' {recipe.teacher.block_size} positions, got {recipe.max_new_tokens}"
        )
    check_at_least_one({"--threads": threads})
