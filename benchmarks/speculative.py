"""Speculative decoding of the `dk demo llm` teacher: acceptance and speed-up per draft, per gamma
and decoding mode (issue 11, Measure).

Runs `dk demo speculative`'s pipeline (darkknowledge.llm.speculative_demo) once per setting:
the drafts and MTP heads are trained on the first setting and cached (under --cache-dir, keyed by
what determines them), so the later settings only measure. Per draft it reports the acceptance
rate offline (held-out target samples, no decoding) and in decoding, tokens per target call, the
cost ratio c and verification cost v, the measured wall-clock speed-up over plain decoding of the
target with its KV cache (medians over --repeats, plain and speculative interleaved prompt by
prompt) and the predicted speed-ups. The 1-minute load average is recorded before and after
each measurement: compare settings only when the machine was quiet.

    python benchmarks/speculative.py --gammas 2 3 4 --modes sampled greedy --output speculative.json
    python benchmarks/speculative.py --quick           # seconds: the plumbing only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from dataclasses import replace
from pathlib import Path

import torch
import transformers

from darkknowledge.llm.speculative_demo import (
    QUICK,
    SpeculativeRecipe,
    format_tables,
    run_speculative_demo,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny models, seconds")
    parser.add_argument("--gammas", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument(
        "--modes", nargs="+", default=["sampled", "greedy"], choices=["sampled", "greedy"]
    )
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--cache-dir",
        default=os.environ.get("DK_CACHE_DIR", str(Path.home() / ".cache" / "darkknowledge")),
    )
    parser.add_argument("--output", default="speculative.json", help="all reports, as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = (
        QUICK
        if args.quick
        else replace(SpeculativeRecipe(), prompts=args.prompts, repeats=args.repeats)
    )
    reports = []
    for mode in args.modes:
        for gamma in args.gammas:
            recipe = replace(base, gamma=gamma, greedy=mode == "greedy")
            report = run_speculative_demo(
                recipe, cache_dir=Path(args.cache_dir),
                output_dir=Path(args.output).with_suffix("") / f"{mode}-gamma{gamma}",
                log=lambda line: print(line, flush=True),
            )  # fmt: skip
            print(f"\n## {mode}, gamma {gamma}\n\n{format_tables(report)}\n", flush=True)
            reports.append({"mode": mode, "gamma": gamma, "report": report})
    machine = {
        "platform": platform.platform(), "processor": platform.processor(),
        "cpus": os.cpu_count(), "threads": args.threads, "python": platform.python_version(),
        "torch": torch.__version__, "transformers": transformers.__version__,
    }  # fmt: skip
    Path(args.output).write_text(json.dumps({"machine": machine, "runs": reports}, indent=1))
    print(f"reports: {args.output}")


if __name__ == "__main__":
    main()
