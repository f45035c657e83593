"""``kill -9`` at 20 random moments of one ``dk distill`` run (10 of them while a checkpoint
is being written), each followed by ``dk distill --resume``: after every kill each published
checkpoint verifies and holds the uninterrupted run's state at its step, and the run ends
with the uninterrupted run's weights, logs and results, bit for bit."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import yaml
from faultkit import DK, ENV, check_checkpoints, kill_summary, records
from kill_harness import Zygote, random_plan, run_with_kills, temporary_folders

from darkknowledge.cli import main
from same_files import assert_same_file

# The uninterrupted reference runs in this process and is compared byte for byte with
# what the killed subprocesses (OMP_NUM_THREADS=1) wrote: the same thread count.
pytestmark = pytest.mark.usefixtures("one_thread")

KILLS = 20
# A teacher stage and a student stage, a checkpoint every 3 steps (the newest 2 kept), dropout
# and shuffling: a resume must restore weights, optimizer, RNG and data position exactly.
CONFIG = {
    "teacher": {"hidden": [32], "train_steps": 30, "dropout": 0.1},
    "student": {"hidden": [8]},
    "data": {"name": "digits", "batch_size": 32, "eval_batch_size": 512},
    "distill": {"temperature": 3.0, "alpha": 0.7},
    "train": {
        "max_steps": 400, "save_every": 3, "keep_last": 2, "log_every": 1, "eval_every": 100,
        "progress": False,
    },
}  # fmt: skip
THROUGHPUT = ("steps_per_s", "positions_per_s", "seconds")


@pytest.mark.faults
def test_kill_resume_ends_bitwise_equal_to_an_uninterrupted_run(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    # every checkpoint kept: each one the killed run publishes is compared with it
    assert main(["distill", str(config), f"train.output_dir={reference}",
                 "train.keep_last=null"]) == 0  # fmt: skip

    command = [*DK, "distill", str(config), f"train.output_dir={killed}"]
    checked = []

    def after_kill(attempt) -> None:
        checked.append(sum(check_checkpoints(killed / stage, reference / stage)
                           for stage in ("teacher", "student") if (killed / stage).exists()))  # fmt: skip

    plan = random_plan(seed=8, kills=KILLS, max_delay=0.03)  # short: 20 kills fit a fast machine
    with Zygote(ENV) as zygote:  # each attempt a fork of a process that imported darkknowledge
        attempts = run_with_kills(
            command, [*command, "--resume"], killed, plan, after_kill=after_kill, timeout=300,
            zygote=zygote,
        )  # fmt: skip
    summary = kill_summary(attempts)
    print("dk distill:", json.dumps(summary), f"checkpoints checked: {sum(checked)}")
    assert summary["kills"] == KILLS, [(a.kill, a.killed, a.seconds) for a in attempts]
    assert summary["moments"] == {"save": KILLS // 2, "after a delay": KILLS // 2}
    assert summary["cut_a_write"] >= KILLS // 2  # every kill at "save" cut a checkpoint write
    assert not temporary_folders(killed)  # the last run cleaned up after the killed saves
    for stage in ("teacher", "student"):
        assert_same_file(
            killed / stage / "model.safetensors", reference / stage / "model.safetensors"
        )
        assert records(killed / stage / "metrics.jsonl") == records(
            reference / stage / "metrics.jsonl"
        ), stage
        assert len(list((killed / stage / "checkpoints").iterdir())) == 2  # keep_last
    assert _records_of(killed) == _records_of(reference)


def _records_of(run: Path) -> list[dict]:
    rows = json.loads((run / "results.json").read_text())
    return [{k: v for k, v in row.items() if k not in (*THROUGHPUT, "weights")} for row in rows]


@pytest.mark.parametrize("signum", ["SIGINT", "SIGTERM"])
def test_kill_resume_signal_prints_where_the_checkpoint_is(tmp_path, signum):
    import signal
    import subprocess
    import time

    config = tmp_path / "config.yaml"
    raw = {**CONFIG, "train": {**CONFIG["train"], "max_steps": 100_000, "eval_every": 0}}
    raw["teacher"] = {**raw["teacher"], "train_steps": 5}
    config.write_text(yaml.safe_dump(raw))
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "darkknowledge.cli",
        "distill",
        str(config),
        f"train.output_dir={run}",
    ]
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 120
    while not list(run.glob("student/checkpoints/step-*")) and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(getattr(signal, signum))
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + getattr(signal, signum)
    line = stderr.strip().splitlines()[-1]
    assert line.startswith("interrupted at step ") and line.endswith("; rerun with --resume")
    step = int(line.split()[3].rstrip(";"))
    assert f"checkpoint saved to {run / 'student' / 'checkpoints' / f'step-{step:08d}'}" in line
    assert (
        json.loads(
            (run / "student" / "checkpoints" / f"step-{step:08d}" / "state.json").read_text()
        )["step"]
        == step
    )
