"""Two CPU processes under torchrun (gloo), as the multi-process tests start them.

A failed launch fails the test with each process's own stderr: torchrun's console output ends
with its agent's traceback, and a bare tail of it (what these tests printed before) can hide
which process failed first and why.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

PROCESS_TAIL = 2500  # characters of each process's stderr in a failure message


def torchrun(
    *arguments: object,
    logs: Path,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 300,
) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone --nproc_per_node 2 *arguments``, one
    intra-op thread per process; each process's stderr is also kept under ``logs``."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "--log-dir", str(logs), "--tee", "2", *map(str, arguments),
    ]  # fmt: skip
    environment = {
        **os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {}),
    }  # fmt: skip
    done = subprocess.run(
        command, env=environment, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    if done.returncode != 0:
        pytest.fail(_failure(done, logs), pytrace=False)
    return done


def _failure(done: subprocess.CompletedProcess, logs: Path) -> str:
    parts = [f"torchrun exited with {done.returncode}"]
    for log in sorted(logs.glob("**/stderr.log")):
        rank = log.parent.name
        parts.append(f"--- process {rank} stderr (last {PROCESS_TAIL} characters):")
        parts.append(log.read_text(errors="replace")[-PROCESS_TAIL:])
    parts.append("--- torchrun's own stderr (last 1000 characters):")
    parts.append(done.stderr[-1000:])
    return "\n".join(parts)
