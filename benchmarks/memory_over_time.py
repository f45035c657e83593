"""Memory of a long distillation run: resident set size (and, optionally, the Python heap)
sampled every N steps, to show that nothing grows with the number of steps.

The run is the ``digits_kd`` preset's student stage (MLP 64-16-10 from an MLP 64-512-512-10
teacher on the embedded digits) with everything a real run does: a checkpoint every 100
steps (the newest 2 kept), a log record every 10 (``metrics.jsonl`` and TensorBoard), an
evaluation every 1,000. 20 times the classifier demo's 1,500 student steps by default:

    python benchmarks/memory_over_time.py                       # 30,000 steps, RSS
    python benchmarks/memory_over_time.py --tracemalloc         # and the Python heap
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
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
DEMO_STUDENT_STEPS = 1500  # darkknowledge.demo.classifier.Settings.student_steps
PLOT = ROOT / "docs" / "img" / "reliability_memory.png"
CACHE_PLOT = ROOT / "docs" / "img" / "reliability_cache_memory.png"
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


def measure(steps: int, every: int, heap: bool, leak_bytes: int = 0) -> dict:
    process = psutil.Process()
    samples: list[dict] = []
    kept: list[bytes] = []  # the planted leak, if any
    start = time.perf_counter()

    def sample(distiller, record) -> None:
        if leak_bytes:
            kept.append(bytes(leak_bytes))
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
    }  # fmt: skip


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


# ---- a teacher cache larger than the reader's memory ------------------------------------------


class _CheapTeacher:
    """A capture backend with no model: fixed top-k rows, so that writing a large cache costs
    only the writing (the reader's memory does not depend on the values)."""

    vocab_size = 32000

    def describe(self) -> dict:
        return {"backend": "cheap", "name": "cheap", "weights_sha256": "0" * 64,
                "output_layer_shape": None}  # fmt: skip

    def topk(self, input_ids, attention_mask, *, k, temperature):
        ids = (input_ids[..., None] * 7 + torch.arange(k)) % self.vocab_size  # (B, T, k)
        return ids, (-0.01 * torch.arange(k, dtype=torch.float32) - 1.0).expand(ids.shape)

    def sample(self, input_ids, attention_mask, *, uniforms, temperature):
        raise NotImplementedError


def write_cache(folder: Path, size_mb: float, shard_mb: float) -> dict:
    """A top-k cache (k = 256, 16-bit ids, float16: 1 KiB a token) of about ``size_mb``, in
    shards of about ``shard_mb``, of sequences of 256 tokens."""
    from darkknowledge.cache import write_teacher_cache

    tokens, k = 256, 256
    per_sequence = tokens * k * 4  # bytes of ids and values
    sequences = max(int(size_mb * MB / per_sequence), 1)
    shard_size = max(int(shard_mb * MB / per_sequence), 1)
    generator = torch.Generator().manual_seed(0)
    dataset = [{"input_ids": torch.randint(32000, (tokens,), generator=generator), "id": i}
               for i in range(sequences)]  # fmt: skip
    return write_teacher_cache(
        _CheapTeacher(), dataset, folder, k=k, batch_size=16, shard_size=shard_size,
        backend=lambda teacher: teacher, progress=False,
    )  # fmt: skip


def _status() -> dict[str, float]:
    """VmRSS, RssAnon, RssFile of this process in MiB (Linux; elsewhere psutil's RSS)."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return {"rss_mb": psutil.Process().memory_info().rss / MB}
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    names = {"VmRSS": "rss_mb", "RssAnon": "anon_mb", "RssFile": "file_mb"}
    return {ours: int(fields[theirs].split()[0]) / 1024 for theirs, ours in names.items()}


def read_cache(folder: Path, every: int, open_shards: int | None) -> dict:
    """Read every entry of the cache at ``folder`` in order, sampling memory every ``every``."""
    from darkknowledge.cache import TeacherCache, reader

    if open_shards is not None:
        reader._OPEN_SHARDS = open_shards  # the bound under test (a benchmark knob)
    cache = TeacherCache(folder)
    gc.collect()
    samples = [{"entries": 0, **_status()}]
    start, positions = time.perf_counter(), 0
    for index in range(len(cache)):
        positions += cache[index]["ids"].shape[0]
        if (index + 1) % every == 0 or index + 1 == len(cache):
            samples.append({"entries": index + 1, **_status()})
    return {"entries": len(cache), "positions": positions, "samples": samples,
            "seconds": round(time.perf_counter() - start, 2), "open_shards": reader._OPEN_SHARDS}  # fmt: skip


def measure_cache(args) -> dict:
    """Write the cache (unless ``args.folder`` holds one), read it in a fresh process (in a
    memory cgroup with ``args.cgroup_limit_mb``), and summarise."""
    import subprocess

    folder = args.folder or Path(tempfile.mkdtemp(prefix="dk-cache-memory-"))
    if not (folder / "manifest.json").exists():
        write_cache(folder, args.size_mb, args.shard_mb)
    manifest = json.loads((folder / "manifest.json").read_text())
    if args.cold:  # out of the page cache: the reader's own reads bring every page in
        for shard in manifest["shards"]:
            descriptor = os.open(folder / shard["file"], os.O_RDONLY)
            os.fsync(descriptor)
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(descriptor)
    command = [
        sys.executable,
        __file__,
        "read",
        "--folder",
        str(folder),
        "--every",
        str(args.every),
    ]
    if args.open_shards is not None:
        command += ["--open-shards", str(args.open_shards)]
    cgroup = _cgroup(args.cgroup_limit_mb) if args.cgroup_limit_mb else None
    preexec = (lambda: (cgroup / "cgroup.procs").write_text(str(os.getpid()))) if cgroup else None
    done = subprocess.run(command, capture_output=True, text=True, preexec_fn=preexec, check=False)
    if done.returncode != 0:
        raise SystemExit(f"the reader failed ({done.returncode}): {done.stderr[-2000:]}")
    result = json.loads(done.stdout)
    shard_bytes = [shard["bytes"] for shard in manifest["shards"]]
    first = result["samples"][0]
    result.update(
        cache_mb=round(sum(shard_bytes) / MB, 1), shards=len(shard_bytes),
        largest_shard_mb=round(max(shard_bytes) / MB, 3),
        rise_mb={key: round(max(s[key] for s in result["samples"]) - first[key], 2)
                 for key in first if key.endswith("_mb")},
    )  # fmt: skip
    if cgroup is not None:
        result["cgroup"] = {
            "limit_mb": args.cgroup_limit_mb,
            "max_usage_mb": round(int((cgroup / "memory.max_usage_in_bytes").read_text()) / MB, 1),
            "limit_hits": int((cgroup / "memory.failcnt").read_text()),
        }
        cgroup.rmdir()
    return result


def _cgroup(limit_mb: int) -> Path:
    """A fresh cgroup v1 memory group with ``limit_mb`` (root only)."""
    root = Path("/sys/fs/cgroup/memory")
    if not (root / "memory.limit_in_bytes").exists():
        raise SystemExit("--cgroup-limit-mb needs a cgroup v1 memory controller at " + str(root))
    group = root / f"dk-cache-memory-{os.getpid()}"
    group.mkdir()
    (group / "memory.limit_in_bytes").write_text(str(limit_mb * MB))
    return group


def plot_cache(result: dict, path: Path, unbounded: dict | None = None) -> None:
    """The reader's memory against the MiB of cache read (and, given, a run that kept every
    shard open)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from darkknowledge._files import save_figure

    def read(run: dict) -> list[float]:
        return [s["entries"] / run["entries"] * run["cache_mb"] for s in run["samples"]]

    figure, axes = plt.subplots(figsize=(7.5, 4))
    labels = {"rss_mb": "RSS", "anon_mb": "anonymous", "file_mb": "file-backed (mapped)"}
    for key, label in labels.items():
        if key in result["samples"][0]:
            axes.plot(read(result), [s[key] for s in result["samples"]],
                      label=f"{label}, {result['open_shards']} shards open at most")  # fmt: skip
    if unbounded is not None:
        axes.plot(read(unbounded), [s["rss_mb"] for s in unbounded["samples"]], linestyle="--",
                  color="grey", label="RSS with every shard kept open")  # fmt: skip
    if "cgroup" in result:
        axes.axhline(result["cgroup"]["limit_mb"], color="red", linewidth=1,
                     label="the reader's memory limit (cgroup)")  # fmt: skip
    axes.set_xlabel("MiB of the cache read")
    axes.set_ylabel("MiB")
    axes.set_ylim(bottom=0)
    axes.set_title(
        f"reading a {result['cache_mb']:,.0f} MiB teacher cache ({result['shards']} shards): "
        f"RSS +{result['rise_mb']['rss_mb']:.0f} MiB",
        fontsize=9,
    )
    axes.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    save_figure(figure, path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mode", nargs="?", choices=("train", "cache", "read"), default="train")
    parser.add_argument("--steps", type=int, default=20 * DEMO_STUDENT_STEPS)
    parser.add_argument("--every", type=int, default=250, help="sample every N steps/entries")
    parser.add_argument("--tracemalloc", action="store_true", help="also the Python heap")
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
        result = measure(args.steps, args.every, args.tracemalloc, args.leak_bytes)
        plot_figure = plot
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    if not args.no_plot:
        plot_figure(result, args.plot or (CACHE_PLOT if args.mode == "cache" else PLOT))
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=1))


if __name__ == "__main__":
    main()
