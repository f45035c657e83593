"""Memory of a long distillation run: resident set size (and, optionally, the Python heap)
sampled every N steps, to show that nothing grows with the number of steps.

The run is the ``digits_kd`` preset's student stage (MLP 64-16-10 from an MLP 64-512-512-10
teacher on the embedded digits) with everything a real run does: a checkpoint every 100
steps (the newest 2 kept), a log record every 10 (``metrics.jsonl`` and TensorBoard), an
evaluation every 1,000. 20 times the classifier demo's 1,500 student steps by default:

    python benchmarks/memory_over_time.py                       # 30,000 steps, RSS
    python benchmarks/memory_over_time.py --tracemalloc         # and the Python heap
    python benchmarks/memory_over_time.py --steps 6000 --attribute --no-plot  # where it grows
    python benchmarks/memory_over_time.py --steps 3000 --json out.json --no-plot   # the suite's
    python benchmarks/memory_over_time.py --replot out.json    # draw the plot of a saved run

The teacher is the preset's architecture, untrained (memory does not depend on its weights).
Growth is judged on the steps after a warm-up (the first tenth: allocator pools, the first
checkpoint and evaluation): the median RSS of the last quarter of the samples minus that of
the first quarter. ``--leak-bytes B`` keeps B more bytes alive every step (a planted leak: the
suite checks that the measure sees one).

``cache`` mode: a teacher cache several times larger than a bound is read entry by entry in a
fresh process, whose memory is sampled every N entries (``/proc/self/status``: VmRSS, and its
anonymous and file-backed parts). The reader maps shards (``safe_open``) and keeps at most
``darkknowledge.cache.reader._OPEN_SHARDS`` (16) open, so its RSS is bounded by 16 shards
whatever the cache's size; ``--open-shards`` changes that number (a huge one shows what the
bound prevents). ``--cgroup-limit-mb`` runs the reader in a memory cgroup (v1, as root) with
that limit, which the cache exceeds several times; ``--cold`` first drops the cache's files
from the page cache (``posix_fadvise``), so that the reader's own page faults bring every page
in and are charged to its cgroup (pages still cached from the writing would be charged to the
writer):

    python benchmarks/memory_over_time.py cache --size-mb 64 --shard-mb 0.25 --no-plot
    python benchmarks/memory_over_time.py cache --size-mb 4096 --shard-mb 4 --every 256 \
        --cgroup-limit-mb 512 --cold --json bounded.json
    python benchmarks/memory_over_time.py cache ... --open-shards 1000000 --json unbounded.json
    python benchmarks/memory_over_time.py --replot bounded.json --compare unbounded.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import tempfile
import time
import tracemalloc
from pathlib import Path

import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
DEMO_STUDENT_STEPS = 1500  # darkknowledge.demo.classifier.Settings.student_steps
PLOT = ROOT / "docs" / "img" / "reliability_memory.png"
MB = 2**20


def build(steps: int, output_dir: str, callback) -> torch.nn.Module:
    """The digits_kd preset's student stage as ``dk distill`` builds it, with ``callback``."""
    from darkknowledge.chain import freeze
    from darkknowledge.commands._build import build_parts, distiller_kwargs
    from darkknowledge.config import load_config, thaw
    from darkknowledge.train import Distiller

    overrides = [f"train.max_steps={steps}", "train.eval_every=1000", "train.progress=false"]
    config = load_config("digits_kd", overrides)
    parts = build_parts(config)
    torch.manual_seed(config.train.seed)
    teacher = freeze(parts.model(config.teacher, "teacher"))
    student = parts.model(config.students[-1], "student")
    train_loader, eval_loader = parts.loaders("student", True)
    kwargs = distiller_kwargs(config, num_classes=parts.num_classes, distill=True,
                              output_dir=output_dir)  # fmt: skip
    return Distiller(
        student, teacher, train_loader, eval_data=eval_loader, task=parts.task("student", True),
        config=thaw(config), callbacks=[callback], **kwargs,
    )  # fmt: skip


def measure(
    steps: int, every: int, heap: bool, leak_bytes: int = 0, attribute: bool = False
) -> dict:
    """Train ``steps`` steps sampling memory every ``every``; with ``heap``, the Python heap
    too; with ``attribute``, the allocation sites whose memory grew from the middle to the end
    (two tracemalloc snapshots: they cost memory themselves, so the RSS of such a run is not
    the run's)."""
    process = psutil.Process()
    samples: list[dict] = []
    kept: list[bytes] = []  # the planted leak, if any
    sites: dict[str, dict] = {}
    heap = heap or attribute
    start = time.perf_counter()

    def sample(distiller, record) -> None:
        if leak_bytes:
            kept.append(bytes(leak_bytes))
        if attribute and distiller.step in (steps // 2, steps):
            sites["middle" if distiller.step < steps else "end"] = _sites()
        if distiller.step % every:
            return
        row = {"step": distiller.step, "rss_mb": process.memory_info().rss / MB,
               "seconds": round(time.perf_counter() - start, 2)}  # fmt: skip
        if heap:
            row["heap_mb"] = tracemalloc.get_traced_memory()[0] / MB
        samples.append(row)

    if heap:
        tracemalloc.start()
    with tempfile.TemporaryDirectory() as output_dir:
        distiller = build(steps, output_dir, sample)
        gc.collect()
        result = distiller.fit()
        history_records = len(result.history)
    return {
        "steps": steps, "every": every, "samples": samples, "history_records": history_records,
        "seconds": round(time.perf_counter() - start, 1), "leak_bytes": leak_bytes,
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "growth": growth(samples, "rss_mb"),
        **({"heap_growth": growth(samples, "heap_mb")} if heap else {}),
        **({"grew": _grew(sites)} if attribute else {}),
    }  # fmt: skip


def _sites() -> dict[str, tuple[int, int]]:
    """Traced bytes and blocks per allocation site (file:line), the snapshot dropped at once."""
    snapshot = tracemalloc.take_snapshot()
    return {str(s.traceback[0]): (s.size, s.count) for s in snapshot.statistics("lineno")}


def _grew(sites: dict, top: int = 6) -> list[dict]:
    """The sites whose traced memory grew most from the middle of the run to its end."""
    middle, end = sites["middle"], sites["end"]
    grown = [
        (size - middle.get(where, (0, 0))[0], count - middle.get(where, (0, 0))[1], where)
        for where, (size, count) in end.items()
        if "tracemalloc.py" not in where and __file__ not in where  # the measure's own
    ]
    return [{"where": where, "kib": round(size / 1024, 1), "blocks": count}
            for size, count, where in sorted(grown, reverse=True)[:top]]  # fmt: skip


def growth(samples: list[dict], key: str, warmup: float = 0.1) -> dict:
    """Median of the last quarter minus median of the first quarter of the samples after the
    warm-up fraction, in MB and in MB per 1,000 steps."""
    steps = samples[-1]["step"] if samples else 0
    kept = [s for s in samples if s["step"] > warmup * steps]
    quarter = max(len(kept) // 4, 1)
    first, last = kept[:quarter], kept[-quarter:]
    rise = statistics.median(s[key] for s in last) - statistics.median(s[key] for s in first)
    span = statistics.median(s["step"] for s in last) - statistics.median(s["step"] for s in first)
    return {
        "first_quarter_mb": round(statistics.median(s[key] for s in first), 2),
        "last_quarter_mb": round(statistics.median(s[key] for s in last), 2),
        "rise_mb": round(rise, 3),
        "mb_per_1000_steps": round(1000 * rise / max(span, 1), 4),
        "peak_mb": round(max(s[key] for s in samples), 2),
    }


def plot(result: dict, path: Path) -> None:
    """RSS (and heap) over the steps; on the right, their change since the warm-up."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from darkknowledge._files import save_figure

    samples = result["samples"]
    steps = [s["step"] for s in samples]
    keys = {"rss_mb": "resident set size (RSS)", "heap_mb": "Python heap (tracemalloc)"}
    keys = {key: label for key, label in keys.items() if key in samples[0]}
    warm = next(s for s in samples if s["step"] > 0.1 * result["steps"])
    figure, (whole, change) = plt.subplots(1, 2, figsize=(10, 3.6))
    for key, label in keys.items():
        whole.plot(steps, [s[key] for s in samples], label=label)
        change.plot(steps, [s[key] - warm[key] for s in samples], label=label)
    for axes in (whole, change):
        axes.axvline(warm["step"], color="grey", linestyle=":", linewidth=1)
        axes.set_xlabel("optimizer step")
    whole.set_ylabel("MiB")
    whole.set_ylim(bottom=0)
    change.set_ylabel(f"MiB since step {warm['step']:,} (end of warm-up)")
    change.legend(fontsize=8)
    figure.suptitle(
        f"digits_kd student stage, {result['steps']:,} steps: RSS "
        f"{result['growth']['rise_mb']:+.2f} MiB from the first to the last quarter"
        + (
            f", heap {result['heap_growth']['rise_mb']:+.2f} MiB" if "heap_growth" in result else ""
        ),
        fontsize=9,
    )
    figure.tight_layout()
    save_figure(figure, path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mode", nargs="?", choices=("train", "cache", "read"), default="train")
    parser.add_argument("--steps", type=int, default=20 * DEMO_STUDENT_STEPS)
    parser.add_argument("--every", type=int, default=250, help="sample every N steps/entries")
    parser.add_argument("--tracemalloc", action="store_true", help="also the Python heap")
    parser.add_argument("--attribute", action="store_true", help="where the heap grew")
    parser.add_argument("--leak-bytes", type=int, default=0, help="a planted leak per step")
    parser.add_argument("--size-mb", type=float, default=64.0, help="cache: its size")
    parser.add_argument("--shard-mb", type=float, default=0.25, help="cache: one shard's size")
    parser.add_argument("--open-shards", type=int, help="cache: shards the reader keeps open")
    parser.add_argument("--cgroup-limit-mb", type=int, help="cache: the reader's memory cgroup")
    parser.add_argument("--folder", type=Path, help="cache: where it is (written if missing)")
    parser.add_argument("--cold", action="store_true", help="cache: drop it from the page cache")
    parser.add_argument("--json", type=Path, help="write the samples and figures here")
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--replot", type=Path, help="only draw the plot of a --json file")
    parser.add_argument("--compare", type=Path, help="cache --replot: an unbounded run's json")
    args = parser.parse_args()
    from cache_memory import CACHE_PLOT, measure_cache, plot_cache, read_cache

    if args.replot:
        result = json.loads(args.replot.read_text())
        if "cache_mb" in result:
            other = json.loads(args.compare.read_text()) if args.compare else None
            plot_cache(result, args.plot or CACHE_PLOT, other)
        else:
            plot(result, args.plot or PLOT)
        return
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if args.mode == "read":  # the reader's own process (see cache_memory)
        print(json.dumps(read_cache(args.folder, args.every, args.open_shards)))
        return
    if args.mode == "cache":
        result = measure_cache(args)
        plot_figure = plot_cache
    else:
        result = measure(args.steps, args.every, args.tracemalloc, args.leak_bytes, args.attribute)
        plot_figure = plot
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    if not args.no_plot:
        plot_figure(result, args.plot or (CACHE_PLOT if args.mode == "cache" else PLOT))
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=1))


if __name__ == "__main__":
    main()
