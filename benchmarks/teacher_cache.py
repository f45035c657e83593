"""Training from the teacher cache on the `dk demo llm` setup (issue 12, "Measure").

Usage::

    python benchmarks/teacher_cache.py --cache-dir /tmp/dk-measure-cache --work-dir /tmp/dk-tc

The demo's recipe, corpus, teacher (trained and cached by ``dk demo llm``: run it first with the
same ``--cache-dir``), student and held-out evaluation (``darkknowledge.llm.demo``). The
training data is the demo's own: the windows its 250 student steps draw
(``RandomWindows``, epoch 0), as a dataset of 250 × 16 sequences keyed by content hash, read in
the same order by every run, so every student sees the same batches.

1. **Quality**: one student per method, the demo's 250 steps (T = 1, alpha = 0.9, its learning
   rate schedule), held-out bits per byte: full-logit KD from the live teacher; top-k caches
   with k = 8, 32, 128 (tail bucket and none); sampled caches of 12 and 50 draws; labels alone.
   ``--seeds N`` repeats each with N student initialisations.
2. **Storage**: payload and on-disk bytes per token from each cache's manifest.
3. **Speed**: training tokens per second from the caches, from the live teacher and on the
   labels alone, in short runs interleaved round by round (order rotated), each timed per step
   (median after warm-up), with the load average beside each round.

Writes ``results.json`` in ``--work-dir`` and prints markdown tables.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from torch.utils.data import DataLoader

import darkknowledge as dk
from darkknowledge.llm import demo
from darkknowledge.llm.data import RandomWindows, sequential_windows, stdlib_corpus

CACHES = {
    "topk-8": {"k": 8},
    "topk-32": {"k": 32},
    "topk-128": {"k": 128},
    "sampled-12": {"representation": "sampled", "num_samples": 12},
    "sampled-50": {"representation": "sampled", "num_samples": 50},
}
# method -> (cache name or "live" or None for labels alone, tail)
METHODS = {
    "full KD (live teacher)": ("live", None),
    "top-8, tail bucket": ("topk-8", "bucket"),
    "top-8, tail none": ("topk-8", "none"),
    "top-32, tail bucket": ("topk-32", "bucket"),
    "top-32, tail none": ("topk-32", "none"),
    "top-128, tail bucket": ("topk-128", "bucket"),
    "top-128, tail none": ("topk-128", "none"),
    "sampled, 12 draws": ("sampled-12", None),
    "sampled, 50 draws": ("sampled-50", None),
    "labels alone": (None, None),
}
TIMED = {
    "cross-entropy (labels)": (None, 1),
    "live teacher": ("live", 1),
    "cache sampled-12": ("sampled-12", 1),
    "cache top-128": ("topk-128", 1),
    "cache sampled-12, no workers": ("sampled-12", 0),
}


def _not_cached(*args, **kwargs):
    raise SystemExit("no cached demo teacher: run `dk demo llm` first (same --cache-dir)")


class Setup:
    """The demo's recipe, corpus, teacher, training windows and held-out batches."""

    def __init__(self, cache_dir: Path, work_dir: Path, steps: int | None = None) -> None:
        recipe = demo.Recipe()
        self.recipe = recipe = replace(recipe, student_steps=steps or recipe.student_steps)
        corpus = stdlib_corpus(train_bytes=recipe.train_bytes, heldout_bytes=recipe.heldout_bytes)
        self.teacher, _ = demo.cached_teacher(recipe, corpus.digest, cache_dir, _not_cached, print)
        self.teacher.eval()
        windows = RandomWindows(
            corpus.train, block_size=recipe.block_size, batch_size=recipe.batch_size,
            num_batches=recipe.student_steps, seed=recipe.seed,
        )  # fmt: skip
        self.dataset = [{"input_ids": row} for batch in windows for row in batch["input_ids"]]
        self.eval_data = sequential_windows(
            corpus.heldout, block_size=recipe.block_size, batch_size=4 * recipe.batch_size
        )
        self.work_dir = work_dir
        self.caches: dict[str, Path] = {}

    def capture(self, name: str) -> dict:
        """The cache ``name`` (captured once; a rerun reuses or resumes it)."""
        path = self.work_dir / name
        began = time.perf_counter()
        manifest = dk.cache.write_teacher_cache(
            self.teacher, self.dataset, path, batch_size=64, progress=False, **CACHES[name]
        )
        self.caches[name] = path
        return {
            "bytes_per_token": manifest["bytes_per_token"],
            "ids": manifest["ids"]["encoding"],
            "values": manifest["values"]["dtype"],
            "seconds": time.perf_counter() - began,
        }

    def distiller(self, source, *, tail=None, steps: int, seed: int, workers: int = 1, **extra):
        """The demo's Distiller for one method: ``source`` is "live", a cache name or None."""
        recipe = self.recipe
        student = demo.build_gpt2(recipe.student_layers, recipe.student_width, recipe, seed=seed)
        if source is None or source == "live":
            data = DataLoader(
                self.dataset, batch_size=recipe.batch_size, collate_fn=dk.llm.PaddingCollator()
            )
            teacher = self.teacher if source == "live" else None
            task = dk.llm.CausalLMTask()
        else:
            data = dk.cache.cached_loader(
                self.dataset, self.caches[source], batch_size=recipe.batch_size, shuffle=False,
                num_workers=workers,
            )  # fmt: skip
            teacher = dk.cache.CachedTeacher(self.caches[source])
            task = dk.llm.CachedCausalLMTask(tail=tail or "bucket")
        schedule = dk.schedules.warmup_cosine(
            recipe.learning_rate, steps // 10, steps, end=recipe.learning_rate / 10
        )
        return dk.Distiller(
            student, teacher, data, task=task, temperature=recipe.temperature,
            alpha=recipe.alpha, learning_rate=schedule, max_steps=steps, max_grad_norm=1.0,
            seed=recipe.seed, progress=False, **extra,
        )  # fmt: skip


def quality(setup: Setup, seeds: range, only: list[str]) -> dict:
    """Held-out bits per byte of each method (whose name contains one of ``only``, if given),
    for student initialisations ``recipe.seed + 1 + i``, i in ``seeds``."""
    results: dict = {}
    for method, (source, tail) in METHODS.items():
        if only and not any(part in method for part in only):
            continue
        results[method] = {}
        for index in seeds:
            distiller = setup.distiller(
                source, tail=tail, steps=setup.recipe.student_steps,
                seed=setup.recipe.seed + 1 + index,
            )  # fmt: skip
            began = time.perf_counter()
            distiller.fit()
            seconds = time.perf_counter() - began
            student = distiller.accelerator.unwrap_model(distiller.student)
            score = demo.evaluate_heldout(student, setup.eval_data)["bits_per_byte"]
            results[method][str(index)] = {"bits_per_byte": score, "train_seconds": seconds}
            print(f"{method}, seed {index}: {score:.4f} bits/byte ({seconds:.0f} s)", flush=True)
    return results


def speed(setup: Setup, rounds: int, steps: int, warmup: int) -> dict:
    """Seconds per step of each mode: one Distiller per mode, built once, trained ``steps``
    more steps per round (``fit`` again continues its data stream), the modes' order rotated
    every round, so that a busy moment of the machine falls on all of them alike."""
    names = list(TIMED)
    distillers = {}
    for name in names:
        source, workers = TIMED[name]
        stamps: list[float] = []
        distiller = setup.distiller(
            source, steps=warmup, seed=setup.recipe.seed + 1, workers=workers,
            callbacks=[_stamper(stamps)], log_every=10**9,
        )  # fmt: skip
        distiller.fit()  # warm-up: workers started, first batches prefetched
        distillers[name] = (distiller, stamps)
    per_round: dict[str, list[float]] = {name: [] for name in names}
    durations: dict[str, list[float]] = {name: [] for name in names}
    loads = []
    for number in range(rounds):
        order = names[number % len(names) :] + names[: number % len(names)]
        loads.append(os.getloadavg())
        for name in order:
            distiller, stamps = distillers[name]
            stamps.clear()
            distiller.max_steps += steps
            distiller.fit()
            taken = [b - a for a, b in itertools.pairwise(stamps)]  # fit's own set-up left out
            durations[name] += taken
            per_round[name].append(statistics.median(taken))
        print(f"round {number + 1}/{rounds}, load {loads[-1]}", flush=True)
    tokens = setup.recipe.batch_size * setup.recipe.block_size
    return {
        "rounds": per_round,
        "loadavg": loads,
        "tokens_per_step": tokens,
        "median_step_seconds": {name: statistics.median(v) for name, v in durations.items()},
        "mean_step_seconds": {name: statistics.mean(v) for name, v in durations.items()},
    }


def _stamper(stamps: list[float]):
    """A Distiller callback appending the time after every step to ``stamps``."""

    def stamp(distiller, record) -> None:
        stamps.append(time.perf_counter())

    return stamp


def tables(quality_results: dict, storage: dict, timing: dict | None) -> str:
    """Markdown: quality and storage per method (mean ± sd over seeds; the change against
    full KD paired by seed), then speed per training mode."""
    full = quality_results["full KD (live teacher)"]
    lines = [
        "| method | held-out bits/byte | vs full KD, paired by seed | payload B/token | on disk B/token |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for method, (source, _) in METHODS.items():
        if method not in quality_results:
            continue
        runs = quality_results[method]
        scores = [run["bits_per_byte"] for run in runs.values()]
        spread = f" ± {statistics.stdev(scores):.4f}" if len(scores) > 1 else ""
        changes = [
            100 * (runs[seed]["bits_per_byte"] / full[seed]["bits_per_byte"] - 1)
            for seed in runs
            if seed in full
        ]
        change = f"{statistics.mean(changes):+.2f}% ({min(changes):+.1f} to {max(changes):+.1f})"
        if source in CACHES:
            size = storage[source]["bytes_per_token"]
            payload, disk = f"{size['payload']}", f"{size['on_disk']:.2f}"
        elif source == "live":
            payload, disk = "(live; dense float16: 512)", "-"
        else:
            payload, disk = "0", "0"
        lines.append(
            f"| {method} ({len(scores)} seeds) | {statistics.mean(scores):.4f}{spread} | "
            f"{change} | {payload} | {disk} |"
        )
    if timing is None:
        return "\n".join(lines)
    base_name = "cross-entropy (labels)"
    base = timing["median_step_seconds"][base_name]
    lines += [
        "",
        "| training mode | median ms/step | tokens/s | step time / cross-entropy's | per-round ratio, quartiles |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, seconds in timing["median_step_seconds"].items():
        ratios = sorted(a / b for a, b in zip(timing["rounds"][name], timing["rounds"][base_name]))
        quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
        lines.append(
            f"| {name} | {seconds * 1e3:.1f} | {timing['tokens_per_step'] / seconds:,.0f} | "
            f"{seconds / base:.3f} | {quartiles[0]:.2f} / {quartiles[1]:.2f} / {quartiles[2]:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_cache = os.environ.get("DK_CACHE_DIR", str(Path.home() / ".cache" / "darkknowledge"))
    parser.add_argument("--cache-dir", default=default_cache, help="where dk demo llm's teacher is")
    parser.add_argument("--work-dir", default="/tmp/dk-teacher-cache-bench", type=Path)
    parser.add_argument("--steps", type=int, help="student steps (default: the demo's 250)")
    parser.add_argument("--seeds", type=int, default=1, help="student initialisations per method")
    parser.add_argument("--seed-offset", type=int, default=0, help="first initialisation index")
    parser.add_argument(
        "--only", action="append", default=[], help="methods whose name contains this (repeat)"
    )
    parser.add_argument("--rounds", type=int, default=20, help="interleaved timing rounds")
    parser.add_argument("--timed-steps", type=int, default=10, help="steps per mode and round")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own)")
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    setup = Setup(Path(args.cache_dir), args.work_dir, args.steps)
    machine = {
        "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
        "platform": platform.platform(), "torch": torch.__version__,
        "loadavg_start": os.getloadavg(), "recipe": asdict(setup.recipe),
    }  # fmt: skip
    storage = {}
    for name in CACHES:
        storage[name] = setup.capture(name)
        print(f"cache {name}: {storage[name]}", flush=True)
    _update(args.work_dir / "storage.json", {"storage": storage, "machine": machine})
    if not args.skip_quality:
        seeds = range(args.seed_offset, args.seed_offset + args.seeds)
        found = quality(setup, seeds, args.only)
        _update(args.work_dir / "quality.json", found, merge_methods=True)
    if not args.skip_speed:
        timing = speed(setup, args.rounds, args.timed_steps, args.warmup)
        timing["machine"] = {**machine, "loadavg_end": os.getloadavg()}
        _update(args.work_dir / "speed.json", timing)
    quality_file, speed_file = args.work_dir / "quality.json", args.work_dir / "speed.json"
    if quality_file.exists() and "full KD (live teacher)" in json.loads(quality_file.read_text()):
        timing = json.loads(speed_file.read_text()) if speed_file.exists() else None
        print(tables(json.loads(quality_file.read_text()), storage, timing))
    print(f"results: {args.work_dir}/{{storage,quality,speed}}.json")


def _update(path: Path, data: dict, merge_methods: bool = False) -> None:
    """Write ``data`` to ``path``; with ``merge_methods``, add its seeds to those there."""
    if merge_methods and path.exists():
        merged = json.loads(path.read_text())
        for method, runs in data.items():
            merged.setdefault(method, {}).update(runs)
        data = merged
    path.write_text(json.dumps(data, indent=2) + "\n")


if __name__ == "__main__":
    main()
