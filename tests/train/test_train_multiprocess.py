"""Two CPU processes (torchrun, gloo) give the single-process result with the same global batch."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from trainkit import loader, mlp, points, teacher_mlp

import darkknowledge as dk
from doc_examples import DOCS, python_blocks
from two_processes import torchrun

# Tiny models on a shared 2-core machine: intra-op threads only spin and wait.
pytestmark = pytest.mark.usefixtures("one_thread")

HERE = Path(__file__).parent


def _two_processes(tmp_path, *mode: str) -> None:
    path = f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    torchrun(
        HERE / "train_ddp_worker.py", tmp_path, *mode, logs=tmp_path / "logs",
        env={"PYTHONPATH": path}, timeout=180,
    )  # fmt: skip


def test_distiller_two_processes_match_one(tmp_path):
    _two_processes(tmp_path)

    # One process, batches of 32 = the two processes' batches of 16, labels with uneven counts.
    student = mlp(0)
    single = dk.Distiller(
        student, teacher_mlp(), loader(points(128, ignore_every=3), 32, shuffle=True),
        alpha=0.5, optimizer="sgd", learning_rate=0.1, max_steps=6, log_every=1, progress=False,
    )  # fmt: skip
    reference = single.fit()
    two = load_file(str(tmp_path / "student" / "model.safetensors"))
    for name, value in student.state_dict().items():
        torch.testing.assert_close(two[name], value, rtol=1e-5, atol=1e-6)

    log = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in log if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    for ours, theirs in zip(train, reference.history):
        for key in ("total", "soft", "hard", "soft_grad_norm", "hard_grad_norm"):
            assert abs(ours[key] - theirs[key]) <= 1e-5 * abs(theirs[key]) + 1e-7, key
    checkpoint = tmp_path / "checkpoints" / "step-00000006"
    assert (checkpoint / "rng-rank0.json").exists() and (checkpoint / "rng-rank1.json").exists()


def test_distiller_two_processes_with_accumulation_match_one(tmp_path):
    """2 processes x 2 micro-batches of 8 (uneven ignored labels, clipping) = 1 process x 32."""
    _two_processes(tmp_path, "accumulate")
    student = mlp(0)
    reference = dk.Distiller(
        student, teacher_mlp(), loader(points(128, ignore_every=3), 32, shuffle=True),
        alpha=0.5, optimizer="sgd", learning_rate=0.1, max_steps=6, log_every=1,
        max_grad_norm=1.0, progress=False,
    ).fit()  # fmt: skip
    two = load_file(str(tmp_path / "student" / "model.safetensors"))
    for name, value in student.state_dict().items():
        torch.testing.assert_close(two[name], value, rtol=1e-5, atol=1e-6)
    log = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in log if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    for ours, theirs in zip(train, reference.history):
        for key in ("total", "soft", "hard", "soft_grad_norm", "hard_grad_norm", "grad_norm"):
            assert abs(ours[key] - theirs[key]) <= 1e-5 * abs(theirs[key]) + 1e-7, key


def test_docs_two_process_script_runs_as_written(tmp_path):
    """docs/training.md's whole train.py, under the torchrun command the page shows."""
    (script,) = python_blocks("training.md", fence="py")
    assert "torchrun --standalone --nproc_per_node 2 train.py" in (DOCS / "training.md").read_text()
    (tmp_path / "train.py").write_text(script)
    torchrun("train.py", logs=tmp_path / "logs", cwd=tmp_path, timeout=180)
    assert (tmp_path / "runs/two/student/model.safetensors").is_file()
    log = [
        json.loads(line) for line in (tmp_path / "runs/two/metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in log if r["kind"] == "train"][-1] == 20
