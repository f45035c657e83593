"""Interrupted captures resume into the same bytes; a folder of other settings is refused."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cachekit import files, ragged_dataset, teacher
from capture_worker import DATASET_SIZE, SETTINGS, capture

import darkknowledge as dk

WORKER = Path(__file__).with_name("capture_worker.py")
ENVIRONMENT = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("shard-*.safetensors"))


def test_write_teacher_cache_resumes_a_killed_capture_into_identical_files(tmp_path):
    """SIGKILL at a seeded moment (after a seeded number of shards, plus a seeded delay), then
    the same call again: the files equal those of a capture that was never interrupted."""
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    capture(reference)
    total = len(_shards(reference))
    rng = random.Random(12)
    after_shards, delay = rng.randint(1, total - 3), rng.uniform(0.0, 0.1)
    process = subprocess.Popen(
        [sys.executable, str(WORKER), str(interrupted), "--slow", "0.1"], env=ENVIRONMENT
    )
    deadline = time.monotonic() + 120
    while len(_shards(interrupted)) < after_shards and process.poll() is None:
        assert time.monotonic() < deadline, "the capture worker wrote no shards in 120 s"
        time.sleep(0.005)
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=30) == -signal.SIGKILL, "the worker finished before it was killed"
    kept = {path.name: path.stat().st_mtime_ns for path in _shards(interrupted)}
    assert after_shards <= len(kept) < total
    assert not (interrupted / "manifest.json").exists()
    with pytest.raises(ValueError, match="unfinished capture"):
        dk.cache.TeacherCache(interrupted)
    # What a kill in the middle of a write leaves (atomic_path's temporary file): removed.
    (
        interrupted / f".shard-{total - 1:05d}-of-{total:05d}.safetensors.tmp1.safetensors"
    ).write_bytes(b"half a shard")

    capture(interrupted)

    assert files(interrupted) == files(reference)
    # Resumed, not recaptured: the shards of the killed run are the same files.
    assert {name: (interrupted / name).stat().st_mtime_ns for name in kept} == kept


def test_write_teacher_cache_same_call_again_returns_the_manifest(tmp_path):
    first = capture(tmp_path)
    before = {path.name: path.stat().st_mtime_ns for path in tmp_path.iterdir()}
    assert capture(tmp_path) == first
    assert {path.name: path.stat().st_mtime_ns for path in tmp_path.iterdir()} == before


def test_write_teacher_cache_refuses_other_settings_naming_the_fields(tmp_path):
    capture(tmp_path)
    with pytest.raises(
        ValueError, match=r"k: recorded 5, requested 6.*width: recorded 5, requested 6"
    ):
        dk.cache.write_teacher_cache(
            teacher(), ragged_dataset(DATASET_SIZE), tmp_path, **{**SETTINGS, "k": 6}
        )
    with pytest.raises(ValueError, match=r"teacher\.weights_sha256: recorded '[0-9a-f]{64}'"):
        dk.cache.write_teacher_cache(
            teacher(seed=4), ragged_dataset(DATASET_SIZE), tmp_path, **SETTINGS
        )
    with pytest.raises(ValueError, match=r"dataset\.fingerprint"):
        dk.cache.write_teacher_cache(
            teacher(), ragged_dataset(DATASET_SIZE, seed=1), tmp_path, **SETTINGS
        )


def test_write_teacher_cache_refuses_an_unfinished_capture_of_other_settings(tmp_path):
    dk.cache.write_teacher_cache(teacher(), ragged_dataset(4), tmp_path, k=3, progress=False)
    (tmp_path / "manifest.json").rename(tmp_path / "capture.json")  # as if interrupted
    with pytest.raises(
        ValueError, match=r"capture\.json.*temperature: recorded 1\.0, requested 2\.0"
    ):
        dk.cache.write_teacher_cache(
            teacher(), ragged_dataset(4), tmp_path, k=3, temperature=2.0, progress=False
        )


def test_write_teacher_cache_refuses_a_folder_holding_other_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"not empty.*notes\.txt"):
        dk.cache.write_teacher_cache(teacher(), ragged_dataset(3), tmp_path, k=2, progress=False)
