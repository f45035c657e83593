"""dk.train.end_processes: the process group is destroyed, output flushed, and the process
leaves with the given status without the interpreter's finalization (no atexit handlers)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

import darkknowledge as dk

SCRIPT = textwrap.dedent(
    """
    import atexit, sys
    import torch.distributed as dist
    import darkknowledge as dk

    dist.init_process_group("gloo", init_method=sys.argv[1], rank=0, world_size=1)
    destroy = dist.destroy_process_group
    def noisy_destroy(*args, **kwargs):
        print("group destroyed", end=";")
        destroy(*args, **kwargs)
    dist.destroy_process_group = noisy_destroy
    atexit.register(lambda: print("finalization ran"))
    print("work done", end=";")  # no newline: only a flush gets it out before os._exit
    dk.train.end_processes(int(sys.argv[2]), destroy_group=sys.argv[3] == "destroy")
    print("after end_processes")
    """
)


def _run(tmp_path, code: int, destroy: str) -> subprocess.CompletedProcess:
    store = f"file://{tmp_path / 'store'}"
    command = [sys.executable, "-c", SCRIPT, store, str(code), destroy]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_end_processes_destroys_the_group_flushes_and_skips_finalization(tmp_path):
    done = _run(tmp_path, 5, "destroy")
    assert done.returncode == 5, done.stderr
    assert done.stdout == "work done;group destroyed;"


def test_end_processes_can_leave_a_broken_group_alone(tmp_path):
    done = _run(tmp_path, 0, "keep")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "work done;"


@pytest.mark.parametrize("code", ["0", 1.0, True, None])
def test_end_processes_refuses_a_status_that_is_not_an_int(code):
    with pytest.raises(TypeError, match="end_processes: code must be an int"):
        dk.train.end_processes(code)


@pytest.mark.parametrize("code", [-1, 256])
def test_end_processes_refuses_a_status_out_of_range(code):
    with pytest.raises(ValueError, match=f"0-255, got {code}"):
        dk.train.end_processes(code)
