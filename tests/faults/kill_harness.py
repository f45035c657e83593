"""Kill a command with SIGKILL at chosen moments, restart it with its resume form, repeat.

A *kill plan* is a list of :class:`Kill`s, one per interrupted attempt: ``Kill.after(s)``
kills ``s`` seconds after the attempt shows progress (its output folder changed since the
attempt started: a log line, a checkpoint, a shard), ``Kill.at(moment)`` as soon as a file of
that moment appears that was not there when the attempt started: ``"save"`` is a
checkpoint's temporary folder (``.tmp-step-*``), i.e. the middle of writing it; a
:class:`Watch` names other moments (a shard's temporary file, a marker written while the
student generates). After the plan, the resume command runs to the end. :func:`random_plan`
draws a seeded plan, so a failure replays. ``after_kill`` runs after every kill (the caller's
check that nothing on disk is half-written). With a :class:`Zygote`, ``dk`` commands are
forked from a process that imported darkknowledge once (``zygote.py``) instead of started.

    attempts = run_with_kills(fresh, resume, output_dir, random_plan(seed=0, kills=4))

Used by ``test_faults_kill_*.py`` (20 kills each) and ``tests/onpolicy``.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

POLL_SECONDS = 0.0005
ZYGOTE = Path(__file__).with_name("zygote.py")
DK = [sys.executable, "-m", "darkknowledge.cli"]


class _Process:
    """A started command: a subprocess, or a fork of a :class:`Zygote`."""

    def __init__(self, command: Sequence[str], env, zygote: Zygote | None) -> None:
        self.zygote, self.returncode = zygote, None
        if zygote is None:
            # A session of its own: a kill takes the command's whole process group, DataLoader
            # workers included. A worker forked in the instant its parent is killed records
            # init as its parent and never sees it die; it would hold stderr open for ever.
            self.popen = subprocess.Popen(
                list(command), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                text=True, start_new_session=True,
            )  # fmt: skip
            self.pid = self.popen.pid
        else:
            self.pid = zygote.start(command)  # the zygote makes it a process group's leader

    def poll(self) -> int | None:
        if self.zygote is None:
            return self.popen.poll()
        if self.returncode is None:
            self.returncode = self.zygote.exit_code(wait=0.0)
        return self.returncode

    def kill(self) -> None:
        """SIGKILL to the command and every process it started."""
        with contextlib.suppress(ProcessLookupError):  # the group already gone
            os.killpg(self.pid, signal.SIGKILL)

    def finish(self, timeout: float) -> tuple[int, str]:
        """Wait for the end: the return code and stderr."""
        if self.zygote is None:
            try:
                _, stderr = self.popen.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                self.popen.communicate()
                raise
            return self.popen.returncode, stderr
        if self.returncode is None:
            self.returncode = self.zygote.exit_code(wait=timeout)
        if self.returncode is None:
            self.kill()
            self.zygote.exit_code(wait=60.0)
            raise subprocess.TimeoutExpired(str(self.pid), timeout)
        return self.returncode, self.zygote.stderr.read_text(errors="replace")


class Zygote:
    """Forks ``dk`` commands (``[*DK, ...]``) from ``zygote.py``, which imported darkknowledge
    and ``modules`` once; ``env`` is the environment of every command. A context manager."""

    def __init__(self, env: dict[str, str] | None = None, modules: Sequence[str] = ()) -> None:
        self.stderr = Path(tempfile.mkstemp(prefix="zygote-stderr-")[1])
        self.process = subprocess.Popen(
            [sys.executable, str(ZYGOTE), *modules], env=env, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip

    def start(self, command: Sequence[str]) -> int:
        if list(command[: len(DK)]) != DK:
            raise ValueError(f"a zygote runs dk commands ({DK} ...), got {command}")
        request = {"argv": list(command[len(DK) :]), "stderr": str(self.stderr)}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return json.loads(self._line(wait=600.0))["pid"]

    def exit_code(self, wait: float) -> int | None:
        line = self._line(wait)
        return None if line is None else json.loads(line)["exit"]

    def _line(self, wait: float) -> str | None:
        ready, _, _ = select.select([self.process.stdout], [], [], wait)
        if not ready:
            return None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the zygote ended ({self.process.wait()})")
        return line

    def __enter__(self) -> Zygote:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)
        self.process.stdout.close()
        self.stderr.unlink(missing_ok=True)


@dataclass(frozen=True)
class Kill:
    """When to kill one attempt: ``delay`` seconds after progress, or at a named moment."""

    delay: float | None = None
    moment: str | None = None

    @staticmethod
    def after(delay: float) -> Kill:
        return Kill(delay=delay)

    @staticmethod
    def at(moment: str) -> Kill:
        return Kill(moment=moment)

    @staticmethod
    def in_save() -> Kill:
        return Kill(moment="save")


@dataclass
class Attempt:
    """What happened to one run of the command."""

    kill: Kill | None
    killed: bool  # SIGKILL was sent before the process ended on its own
    left_temporary: bool  # a temporary file or folder of the moment watched was left behind
    returncode: int
    seconds: float
    stderr: str


def temporary_folders(output_dir: Path) -> list[Path]:
    """Temporary checkpoint folders (``.tmp-step-*``) of a run or of its stages."""
    return sorted(output_dir.glob("*/checkpoints/.tmp-*")) + sorted(
        output_dir.glob("checkpoints/.tmp-*")
    )


def checkpoint_progress(output_dir: Path) -> tuple:
    """Changes whenever the run writes a log line or publishes a checkpoint."""
    logs = tuple(sorted((str(p), p.stat().st_size) for p in output_dir.glob("**/metrics.jsonl")))
    saved = tuple(sorted(str(p) for p in output_dir.glob("**/checkpoints/step-*")))
    return logs, saved


@dataclass(frozen=True)
class Watch:
    """What the harness reads in the output folder: ``progress`` changes as the run goes on;
    ``moments`` maps a name to the files that exist only during that moment."""

    progress: Callable[[Path], tuple] = checkpoint_progress
    moments: dict[str, Callable[[Path], list[Path]]] = field(
        default_factory=lambda: {"save": temporary_folders}
    )


CHECKPOINTS = Watch()


def random_plan(
    seed: int,
    kills: int,
    *,
    max_delay: float = 0.5,
    save_every: int = 2,
    moments: Sequence[str] = ("save",),
) -> list[Kill]:
    """``kills`` kills: every ``save_every``-th at a moment (taking ``moments`` in turn), the
    others after a uniform delay in ``[0, max_delay)`` seconds, drawn with ``seed``."""
    rng = random.Random(seed)
    plan = []
    for i in range(kills):
        if (i + 1) % save_every == 0:
            plan.append(Kill.at(moments[((i + 1) // save_every - 1) % len(moments)]))
        else:
            plan.append(Kill.after(rng.uniform(0.0, max_delay)))
    return plan


def _safe(read: Callable[[Path], object], output_dir: Path, default):
    try:
        return read(output_dir)
    except FileNotFoundError:  # a file vanished while we looked (pruning): look again
        return default


def _identities(paths: list[Path]) -> set[tuple]:
    """Name and inode of each path: a folder deleted and created again under the same name
    (a step saved again after a resume) is a new one. Not its ctime: emptying a stale folder
    left by the previous kill changes the folder's ctime, and a kill triggered by that would
    land before the new save had begun (seen once under load: a "save" kill that cut nothing).
    A new folder that reuses the stale one's inode is missed, and the kill waits for the next
    save."""
    found = set()
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            found.add((str(path), path.stat().st_ino))
    return found


def _attempt(command, output_dir: Path, kill: Kill | None, env, timeout, watch, zygote) -> Attempt:
    start = time.monotonic()
    before = _safe(watch.progress, output_dir, ())
    existing = {
        name: _identities(_safe(files, output_dir, [])) for name, files in watch.moments.items()
    }
    process = _Process(command, env, zygote)
    killed = False
    if kill is not None:
        killed = _wait_and_kill(process, output_dir, kill, before, existing, watch,
                                start + timeout)  # fmt: skip
    returncode, stderr = process.finish(timeout=max(1.0, start + timeout - time.monotonic()))
    left = any(
        _identities(_safe(files, output_dir, [])) - existing[name]
        for name, files in watch.moments.items()
    )
    return Attempt(kill, killed, left, returncode, time.monotonic() - start, stderr)


def _wait_and_kill(process, output_dir, kill, before, existing, watch, deadline) -> bool:
    def alive() -> bool:
        return process.poll() is None and time.monotonic() < deadline

    if kill.moment is not None:
        files = watch.moments[kill.moment]
        while alive() and not (_identities(_safe(files, output_dir, [])) - existing[kill.moment]):
            time.sleep(POLL_SECONDS)
    else:
        while alive() and _safe(watch.progress, output_dir, ()) == before:
            time.sleep(0.005)
        time.sleep(kill.delay)
    if process.poll() is not None:
        return False
    process.kill()
    return True


def run_with_kills(
    fresh: Sequence[str],
    resume: Sequence[str],
    output_dir: str | os.PathLike,
    plan: Sequence[Kill],
    *,
    env: dict[str, str] | None = None,
    timeout: float = 120.0,
    watch: Watch = CHECKPOINTS,
    after_kill: Callable[[Attempt], None] | None = None,
    zygote: Zygote | None = None,
) -> list[Attempt]:
    """Run ``fresh``, then ``resume`` after every kill of ``plan``, then ``resume`` to the end;
    ``after_kill(attempt)`` after each kill. Stops early if an attempt finishes before its
    kill. Raises if the last attempt fails. With ``zygote``, the commands are forks of it
    (``env`` is then the zygote's)."""
    output_dir = Path(output_dir)
    attempts: list[Attempt] = []
    for number, kill in enumerate([*plan, None]):
        command = fresh if number == 0 else resume
        attempt = _attempt(command, output_dir, kill, env, timeout, watch, zygote)
        attempts.append(attempt)
        if not attempt.killed:
            break
        if after_kill is not None:
            after_kill(attempt)
    last = attempts[-1]
    if last.returncode != 0:
        raise AssertionError(f"the last attempt failed ({last.returncode}):\n{last.stderr[-3000:]}")
    return attempts
