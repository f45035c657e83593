"""Training from a teacher cache across processes: two torchrun processes (gloo) against one,
and ``kill -9`` at random moments (checkpoint writes included) then resume, bitwise."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from cachekit import teacher
from safetensors.torch import load_file
from training_worker import STEPS, VOCAB, dataset, train

import darkknowledge as dk

sys.path.insert(0, str(Path(__file__).parents[1] / "faults"))
from kill_harness import random_plan, run_with_kills, temporary_folders

from same_files import assert_same_file
from two_processes import torchrun

WORKER = Path(__file__).with_name("training_worker.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
# The single-process runs in this process compare with the subprocesses: the same thread count.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cache_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("processes") / "cache"
    dk.cache.write_teacher_cache(teacher(VOCAB), dataset(), folder, k=6, progress=False)
    return folder


def _one_process(cache_folder: Path, out: Path) -> Path:
    """The uninterrupted single-process run (on one thread, as the subprocesses are)."""
    train(cache_folder, out)
    return out / "student" / "model.safetensors"


def test_cached_training_two_processes_match_one(cache_folder, tmp_path):
    """torchrun, 2 CPU processes with 2 sequences each per micro-batch, shuffled, accumulating
    2 micro-batches: the parameters of one process on 4 sequences (float tolerance: the
    gradient all-reduce sums in another order)."""
    torchrun(
        WORKER, cache_folder, tmp_path / "two", logs=tmp_path / "logs",
        env={"PYTHONWARNINGS": "ignore"},
    )  # fmt: skip
    one = load_file(_one_process(cache_folder, tmp_path / "one"))
    two = load_file(tmp_path / "two" / "student" / "model.safetensors")
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-6, msg=name)
    records = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").open()]
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, STEPS + 1))


def test_cached_training_resumes_bitwise_after_kills(cache_folder, tmp_path):
    """Two SIGKILLs (the second aimed inside a checkpoint write) then --resume: the student's file is the
    uninterrupted run's, byte for byte (shuffled data over 4 epochs, DataLoader workers)."""
    reference = _one_process(cache_folder, tmp_path / "reference")
    killed = tmp_path / "killed"
    command = [sys.executable, str(WORKER), str(cache_folder), str(killed)]
    plan = random_plan(seed=3, kills=2, max_delay=0.3)
    attempts = run_with_kills(command, [*command, "--resume"], killed, plan, env=ENV)
    kills = [attempt for attempt in attempts if attempt.killed]
    assert len(kills) == 2, [(a.kill, a.killed, a.seconds) for a in attempts]
    assert not temporary_folders(killed)
    assert_same_file(killed / "student" / "model.safetensors", reference)
