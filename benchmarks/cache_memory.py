"""The teacher-cache half of ``benchmarks/memory_over_time.py`` (its ``cache`` and ``read``
modes, see there): write a large cache cheaply, read it entry by entry in a fresh process
(optionally in a memory cgroup), sample the reader's memory, plot it."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).with_name("memory_over_time.py")
CACHE_PLOT = ROOT / "docs" / "img" / "reliability_cache_memory.png"
MB = 2**20


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
    command = [sys.executable, str(SCRIPT), "read", "--folder", str(folder)]
    command += ["--every", str(args.every)]
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
