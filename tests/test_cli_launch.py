"""The README's multi-process commands, run as written: two processes really start and train.

CPU only, gloo: ``torchrun --standalone --nproc_per_node 2`` and
``accelerate launch --multi_gpu --num_processes 2`` (on a machine without GPUs Accelerate
starts the same two CPU processes; ``--cpu`` instead would start one). Each process writes a
marker from the config's data callable, so the test sees which ranks ran, and of how many.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

HERE = Path(__file__).parent
BIN = Path(sys.executable).parent  # torchrun and accelerate are installed next to python

LAUNCHERS = {
    "torchrun": ["torchrun", "--standalone", "--nproc_per_node", "2"],
    "accelerate": ["accelerate", "launch", "--multi_gpu", "--num_processes", "2"],
}


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_cli_launchers_start_two_processes_that_train(tmp_path, launcher):
    marks = tmp_path / "marks"
    marks.mkdir()
    config = {
        "teacher": {"name": "cli_helpers:tiny_model", "args": {"width": 16}},
        "student": {"name": "cli_helpers:tiny_model", "args": {"width": 4}},
        "data": {"name": "cli_helpers:ranked_data", "args": {"marks": str(marks)}},
        "train": {"max_steps": 2, "progress": False, "output_dir": str(tmp_path / "run")},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    command, *options = LAUNCHERS[launcher]
    argv = [str(BIN / command), *options, "-m", "darkknowledge.cli", "distill", str(path)]
    env = {
        **os.environ,
        "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",  # CPU processes even on a GPU machine
    }
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in marks.iterdir()) == ["rank-0-of-2", "rank-1-of-2"]
    assert done.stdout.count("student: step=2") == 1  # one report, from rank 0
    assert (tmp_path / "run" / "student" / "model.safetensors").is_file()
