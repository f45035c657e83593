"""The library at two commits, timed in one run: did a change make the losses slower?

Each measurement is one worker subprocess of ``benchmarks/kd_loss.py`` (case ``kd_loss``) or
``benchmarks/fused_kd.py`` (case ``fused``), the workers of this checkout, run with
``PYTHONPATH`` pointing at one commit's ``src/`` (a ``git worktree`` of ``--base``, or this
checkout). Only the library changes between the two; the harness, the inputs and the machine
are the same. Rounds are interleaved, alternating which commit goes first, and medians of CPU
time are compared (CPU time is less noisy than wall time on a shared machine).

    python benchmarks/compare_commits.py --base 516f4ce --repeats 5
    python benchmarks/compare_commits.py --base 516f4ce --benchmarks fused --fused-args "--vocab 32000"
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKERS = {
    # benchmark -> (script, worker arguments)
    "kd_loss": ("kd_loss.py", ["--_case", "kd_loss"]),
    "fused": ("fused_kd.py", ["--worker", "fused", "--chunk-size", "256"]),
}


def _worktree(revision: str, parent: Path) -> Path:
    """A detached checkout of ``revision`` under ``parent`` (removed by the caller)."""
    path = parent / f"tree-{revision}"
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", "--force", str(path), revision],
        check=True,
        capture_output=True,
    )
    return path


def _measure(benchmark: str, src: Path, extra: list[str]) -> dict:
    script, worker = WORKERS[benchmark]
    env = {**os.environ, "PYTHONPATH": str(src)}
    command = [sys.executable, str(ROOT / "benchmarks" / script), *extra, *worker]
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{benchmark} at {src}: {done.stderr.strip()[-500:]}")
    return json.loads(lines[-1])


def _probe(src: Path) -> str:
    """Which darkknowledge a worker with this PYTHONPATH imports (guards against the venv's)."""
    code = "import darkknowledge, os; print(os.path.dirname(darkknowledge.__file__))"
    env = {**os.environ, "PYTHONPATH": str(src)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    return done.stdout.strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="516f4ce", help="the commit to compare against")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds")
    parser.add_argument(
        "--benchmarks", default="kd_loss,fused", help=f"comma-separated: {', '.join(WORKERS)}"
    )
    parser.add_argument("--kd-args", default="", help="extra arguments for kd_loss.py's worker")
    parser.add_argument("--fused-args", default="", help="extra arguments for fused_kd.py's worker")
    args = parser.parse_args(argv)
    benchmarks = [b for b in args.benchmarks.split(",") if b]
    unknown = sorted(set(benchmarks) - set(WORKERS))
    if unknown:
        parser.error(f"unknown benchmarks {unknown}; valid: {', '.join(WORKERS)}")
    extra = {"kd_loss": shlex.split(args.kd_args), "fused": shlex.split(args.fused_args)}

    with tempfile.TemporaryDirectory(prefix="dk-compare-") as scratch:
        base_tree = _worktree(args.base, Path(scratch))
        try:
            trees = {"base": base_tree / "src", "head": ROOT / "src"}
            for name, src in trees.items():
                found = _probe(src)
                if not found.startswith(str(src)):
                    raise RuntimeError(f"{name}: a worker imports {found}, not {src}")
            runs = {(b, t): [] for b in benchmarks for t in trees}
            for round_ in range(args.repeats):
                order = list(trees) if round_ % 2 == 0 else list(trees)[::-1]
                for benchmark in benchmarks:
                    for tree in order:
                        result = _measure(benchmark, trees[tree], extra[benchmark])
                        runs[benchmark, tree].append(result)
                        print(
                            f"round {round_ + 1}/{args.repeats} {benchmark} {tree}: "
                            f"{result['cpu_seconds']:.3f} s CPU, {result['seconds']:.3f} s wall",
                            file=sys.stderr,
                            flush=True,
                        )
        finally:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base_tree)],
                check=False,
                capture_output=True,
            )

    head = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    print(f"command: python benchmarks/compare_commits.py {shlex.join(argv or sys.argv[1:])}")
    print(f"base {args.base}, head {head} (plus uncommitted changes), {args.repeats} rounds\n")
    print(
        "| benchmark | base CPU s (median) | head CPU s (median) | head / base | loss base, head |"
    )
    print("| --- | --- | --- | --- | --- |")
    for benchmark in benchmarks:
        base = statistics.median(r["cpu_seconds"] for r in runs[benchmark, "base"])
        new = statistics.median(r["cpu_seconds"] for r in runs[benchmark, "head"])
        losses = (
            f"{runs[benchmark, 'base'][0]['loss']:.6f}, {runs[benchmark, 'head'][0]['loss']:.6f}"
        )
        print(f"| {benchmark} | {base:.3f} | {new:.3f} | **{new / base:.3f}** | {losses} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
