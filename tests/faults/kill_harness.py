"""Kill a command with SIGKILL at chosen moments, restart it with its resume form, repeat.

A *kill plan* is a list of :class:`Kill`s, one per interrupted attempt: ``Kill.after(s)``
kills ``s`` seconds after the attempt shows progress (its output folder changed since the
attempt started: a log line, a checkpoint), ``Kill.during_save()`` as soon as a checkpoint's
temporary folder (``.tmp-step-*``) appears, i.e. in the middle of writing it. After the plan,
the resume command runs to the end. :func:`random_plan` draws a seeded plan, so a failure
replays.

    attempts = run_with_kills(fresh, resume, output_dir, random_plan(seed=0, kills=4))

Used by ``test_kill_resume.py``; issue 13 scales it to 20 kills.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

POLL_SECONDS = 0.0005


@dataclass(frozen=True)
class Kill:
    """When to kill one attempt: ``delay`` seconds after progress, or mid-save."""

    delay: float | None = None
    during_save: bool = False

    @staticmethod
    def after(delay: float) -> Kill:
        return Kill(delay=delay)

    @staticmethod
    def in_save() -> Kill:
        return Kill(during_save=True)


@dataclass
class Attempt:
    """What happened to one run of the command."""

    kill: Kill | None
    killed: bool  # SIGKILL was sent before the process ended on its own
    left_temporary: bool  # a .tmp-step-* folder was left behind (the kill cut a save)
    returncode: int
    seconds: float
    stderr: str


def random_plan(
    seed: int, kills: int, *, max_delay: float = 0.5, save_every: int = 2
) -> list[Kill]:
    """``kills`` kills, every ``save_every``-th during a checkpoint write, the others after a
    uniform delay in ``[0, max_delay)`` seconds, drawn with ``seed``."""
    rng = random.Random(seed)
    return [
        Kill.in_save() if (i + 1) % save_every == 0 else Kill.after(rng.uniform(0.0, max_delay))
        for i in range(kills)
    ]


def temporary_folders(output_dir: Path) -> list[Path]:
    return sorted(output_dir.glob("*/checkpoints/.tmp-*")) + sorted(
        output_dir.glob("checkpoints/.tmp-*")
    )


def _progress_marker(output_dir: Path) -> tuple:
    """Changes whenever the run writes a log line or publishes a checkpoint."""
    logs = tuple(sorted((str(p), p.stat().st_size) for p in output_dir.glob("**/metrics.jsonl")))
    saved = tuple(sorted(str(p) for p in output_dir.glob("**/checkpoints/step-*")))
    return logs, saved


def _safe_marker(output_dir: Path) -> tuple:
    try:
        return _progress_marker(output_dir)
    except FileNotFoundError:  # a file vanished while we looked (pruning): look again
        return ()


def _attempt(command: Sequence[str], output_dir: Path, kill: Kill | None, env, timeout) -> Attempt:
    start = time.monotonic()
    before = _safe_marker(output_dir)
    process = subprocess.Popen(
        list(command), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    killed = False
    try:
        if kill is not None:
            killed = _wait_and_kill(process, output_dir, kill, before, start + timeout)
        _, stderr = process.communicate(timeout=max(1.0, start + timeout - time.monotonic()))
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise
    return Attempt(
        kill, killed, bool(temporary_folders(output_dir)), process.returncode,
        time.monotonic() - start, stderr,
    )  # fmt: skip


def _wait_and_kill(process, output_dir: Path, kill: Kill, before: tuple, deadline: float) -> bool:
    def alive() -> bool:
        return process.poll() is None and time.monotonic() < deadline

    if kill.during_save:
        while alive() and not temporary_folders(output_dir):
            time.sleep(POLL_SECONDS)
    else:
        while alive() and _safe_marker(output_dir) == before:
            time.sleep(0.005)
        time.sleep(kill.delay)
    if process.poll() is not None:
        return False
    process.send_signal(signal.SIGKILL)
    process.wait()
    return True


def run_with_kills(
    fresh: Sequence[str],
    resume: Sequence[str],
    output_dir: str | os.PathLike,
    plan: Sequence[Kill],
    *,
    env: dict[str, str] | None = None,
    timeout: float = 120.0,
) -> list[Attempt]:
    """Run ``fresh``, then ``resume`` after every kill of ``plan``, then ``resume`` to the end.
    Stops early if an attempt finishes before its kill. Raises if the last attempt fails."""
    output_dir = Path(output_dir)
    attempts: list[Attempt] = []
    for number, kill in enumerate([*plan, None]):
        attempt = _attempt(fresh if number == 0 else resume, output_dir, kill, env, timeout)
        attempts.append(attempt)
        if not attempt.killed:
            break
    last = attempts[-1]
    if last.returncode != 0:
        raise AssertionError(f"the last attempt failed ({last.returncode}):\n{last.stderr[-3000:]}")
    return attempts
