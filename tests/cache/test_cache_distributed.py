"""A capture across two torchrun processes (gloo, CPU) writes what one process writes."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from cachekit import files
from capture_worker import capture

import darkknowledge as dk
from two_processes import torchrun

WORKER = Path(__file__).with_name("capture_worker.py")


def test_write_teacher_cache_two_processes_equal_one_process(tmp_path):
    """Process 1 looks at the folder a second late: process 0 must not have written to it by
    then (a plan published between process 1's two checks of the folder made it refuse the
    folder as "not empty", once on CI)."""
    two, one, saw = tmp_path / "two", tmp_path / "one", tmp_path / "saw.json"
    torchrun(WORKER, two, "--late-look", saw, logs=tmp_path / "logs", timeout=240)
    assert json.loads(saw.read_text()) == []
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
