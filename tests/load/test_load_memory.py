"""Load: memory does not grow over a long run, and a teacher cache larger than a reader's
memory is read with bounded memory. Shortened versions of ``benchmarks/memory_over_time.py``
(which runs them full size), each also run with a planted fault to show that it can fail."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "memory_over_time.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
# The only growth by design is TrainResult.history (about 650 bytes per log record: 0.065 MB
# per 1,000 steps at log_every 10); the RSS measured 0.19-0.36 MB per 1,000 steps over 3,000.
BOUND_MB_PER_1000_STEPS = 1.0


def _run(tmp_path: Path, *arguments: str) -> dict:
    out = tmp_path / "memory.json"
    command = [sys.executable, str(SCRIPT), *arguments, "--json", str(out), "--no-plot"]
    done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.load
def test_load_memory_does_not_grow_over_a_long_run(tmp_path):
    """3,000 steps of the digits_kd student stage (2x the demo's; the benchmark runs 20x) with
    checkpoints, logs and evaluations, RSS sampled every 100 steps: after the warm-up, the
    median of the last quarter is within 1 MB per 1,000 steps of the first quarter's."""
    result = _run(tmp_path, "--steps", "3000", "--every", "100")
    assert len(result["samples"]) == 30 and result["history_records"] == 303
    growth = result["growth"]
    print("RSS growth over 3,000 steps:", growth)
    assert growth["mb_per_1000_steps"] < BOUND_MB_PER_1000_STEPS, growth


@pytest.mark.load
def test_load_memory_measure_sees_a_planted_leak(tmp_path):
    """The same measure on a run that keeps 4 KB more alive every step (a leak of 4 MB per
    1,000 steps) finds it."""
    result = _run(tmp_path, "--steps", "1000", "--every", "50", "--leak-bytes", "4096")
    assert result["growth"]["mb_per_1000_steps"] > 2 * BOUND_MB_PER_1000_STEPS, result["growth"]


def _read(folder: Path, *arguments: str) -> dict:
    command = [sys.executable, str(SCRIPT), "read", "--folder", str(folder), "--every", "16"]
    done = subprocess.run([*command, *arguments], env=ENV, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@pytest.mark.load
def test_load_cache_larger_than_the_readers_bound_is_read_in_bounded_memory(tmp_path):
    """A 64 MiB cache in 256 shards of 0.25 MiB, every entry read in order in a fresh
    process: once the first 64 entries are read (code pages, allocator pools, the first
    shards), the other 48 MiB add less than 2 MiB of RSS, mapped file pages included (at most
    16 shards stay open). With every shard kept open the same reading grows by about the
    cache's size: what the bound prevents, and proof that the measure can fail."""
    sys.path.insert(0, str(SCRIPT.parent))
    from cache_memory import write_cache

    folder = tmp_path / "cache"
    manifest = write_cache(folder, size_mb=64, shard_mb=0.25)
    assert len(manifest["shards"]) == 256

    def rise_after_warmup(result: dict) -> float:
        warm = next(s for s in result["samples"] if s["entries"] >= 64)
        return max(s["rss_mb"] for s in result["samples"]) - warm["rss_mb"]

    bounded = _read(folder)
    assert bounded["entries"] == 256 and bounded["positions"] == 256 * 256
    print("bounded reader:", [(s["entries"], round(s["rss_mb"], 1)) for s in bounded["samples"]])
    assert rise_after_warmup(bounded) < 2.0, bounded["samples"]
    unbounded = _read(folder, "--open-shards", "1000000")
    assert rise_after_warmup(unbounded) > 30.0, unbounded["samples"]
