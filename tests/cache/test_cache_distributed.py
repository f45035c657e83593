"""A capture across two torchrun processes (gloo, CPU) writes what one process writes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from cachekit import files
from capture_worker import capture

import darkknowledge as dk

WORKER = Path(__file__).with_name("capture_worker.py")


def test_write_teacher_cache_two_processes_equal_one_process(tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(WORKER), str(two),
    ]  # fmt: skip
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    capture(one)

    two_cache, one_cache = dk.cache.TeacherCache(two), dk.cache.TeacherCache(one)
    assert len(two_cache.manifest["shards"]) > 2  # both processes had shards to write
    keys = one_cache.keys()
    assert two_cache.keys() == keys
    for key in keys:
        for name in ("ids", "values"):
            assert torch.equal(two_cache.get(key)[name], one_cache.get(key)[name]), (key, name)
    # Stronger still: shard assignment does not depend on the number of processes.
    assert files(two) == files(one)
