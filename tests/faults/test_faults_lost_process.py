"""Two ``dk distill`` processes (gloo on CPU) and one of them killed or frozen: the other exits
with one line naming the collective and what happened, within seconds, instead of waiting
forever."""

from __future__ import annotations

import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from faultkit import DK, launch_two

from darkknowledge.train import checkpoint as ckpt
from darkknowledge.train.failures import collective_name, peer_gone

CONFIG = {
    "teacher": {"hidden": [32], "train_steps": 0},
    "student": {"hidden": [8]},
    "data": {"name": "digits", "batch_size": 16, "eval_batch_size": 512},
    "train": {"max_steps": 100_000, "save_every": 20, "log_every": 10, "progress": False},
}


def _launch(tmp_path: Path, timeout_s: str) -> tuple[list[subprocess.Popen], Path]:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    run = tmp_path / "run"
    command = [*DK, "distill", str(config), f"train.output_dir={run}"]
    processes = launch_two(command, {"DK_COLLECTIVE_TIMEOUT_S": timeout_s})
    deadline = time.monotonic() + 240
    while not ckpt.complete_checkpoints(run / "student") and time.monotonic() < deadline:
        if any(p.poll() is not None for p in processes):
            pytest.fail("a process ended before training: " + processes[0].communicate()[1][-2000:])
        time.sleep(0.05)
    return processes, run


def _survivor_says(survivor: subprocess.Popen, within: float) -> tuple[float, str, str]:
    """Seconds until the survivor exited, its last stderr line, and the tail of its stderr (a
    failed check shows the tail: the line alone hid the cause of one failure under load)."""
    start = time.monotonic()
    try:
        _, stderr = survivor.communicate(timeout=within)
    except subprocess.TimeoutExpired:
        survivor.kill()
        pytest.fail(f"the surviving process still waits {within} s after its peer was lost")
    assert survivor.returncode == 1, stderr[-3000:]
    return time.monotonic() - start, stderr.strip().splitlines()[-1], stderr[-3000:]


@pytest.mark.faults
def test_lost_process_killed_peer_is_named_within_seconds(tmp_path):
    """Process 0 (which also hosts the rendezvous store) killed with SIGKILL mid-training."""
    (victim, survivor), run = _launch(tmp_path, timeout_s="600")
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    seconds, line, tail = _survivor_says(survivor, within=30)
    found = re.match(
        r"^dk distill: error: Distiller\.fit on process 1 of 2 lost another process in "
        r"(.+) \(Connection (closed|reset) by peer( \[[\d.]+\]:\d+)?\): it crashed or was killed; "
        r"stop every process and start them all again with resume; the last good checkpoint "
        r"is (\S+)$",
        line,
    )
    assert found, tail
    # The loop's collectives: valid counts (all_reduce), the non-finite monitor's bulk look
    # (all_gather), evaluation sums (all_gather_object), checkpoints (barrier), DDP's backward.
    collectives = ("all_reduce", "all_gather", "all_gather_object", "barrier",
                   "the gradient all-reduce of backward (DDP)")  # fmt: skip
    assert found[1] in collectives, found[1]
    assert Path(found[4]).parent == run / "student" / ckpt.CHECKPOINTS
    ckpt.verify(Path(found[4]))
    print(f"lost peer: the survivor exited {seconds:.1f} s after the kill: {line}")


@pytest.mark.faults
def test_lost_process_frozen_peer_times_out_with_a_clear_error(tmp_path):
    """Process 1 frozen with SIGSTOP (a hung node: its connections stay open), a 5 s
    collective timeout (DK_COLLECTIVE_TIMEOUT_S): process 0 stops after it."""
    (survivor, frozen), _ = _launch(tmp_path, timeout_s="5")
    frozen.send_signal(signal.SIGSTOP)
    try:
        seconds, line, tail = _survivor_says(survivor, within=60)
    finally:
        frozen.kill()
        frozen.communicate()
    # The freeze lands anywhere in the loop: in fit's step, or inside a checkpoint's barrier.
    assert re.match(
        r"dk distill: error: Distiller\.(fit|save_checkpoint) on process 0 of 2 waited for the "
        r"other processes until the timeout in ",
        line,
    ), tail
    assert "DK_COLLECTIVE_TIMEOUT_S sets the timeout, 30 min by default" in line, tail
    assert "Timed out waiting 5000ms" in line, tail  # gloo's own words: the timeout given
    print(f"frozen peer: the survivor exited {seconds:.1f} s after the freeze: {line}")


def test_lost_process_error_inside_backward_is_ddps_gradient_all_reduce():
    """DDP all-reduces gradients from autograd's engine: a peer lost then surfaces from
    ``backward`` with no ``torch.distributed`` frame; it is named as such."""

    class LosesItsPeer(torch.autograd.Function):
        @staticmethod
        def forward(ctx, inputs):
            return inputs.clone()

        @staticmethod
        def backward(ctx, grad):
            raise RuntimeError("[pair.cc:553] Connection closed by peer [127.0.0.1]:4242. This")

    with pytest.raises(RuntimeError) as caught:
        LosesItsPeer.apply(torch.ones(2, requires_grad=True)).sum().backward()
    assert (
        collective_name(caught.value.__traceback__) == "the gradient all-reduce of backward (DDP)"
    )
    assert peer_gone(caught.value) == "Connection closed by peer [127.0.0.1]:4242"
