"""SIGINT and SIGTERM during ``Distiller.fit``: finish the step, save, stop; a second one aborts.

The first signal only sets a flag. The loop reads it at the next step boundary (after the
last step, the final evaluation and the final save too, so no signal is swallowed), saves a
checkpoint and raises :class:`Interrupted` (SIGINT, a ``KeyboardInterrupt``) or
:class:`Terminated` (SIGTERM, a ``SystemExit`` with code 143). A second signal restores the
previous handlers and aborts at once, wherever the loop is: the checkpoint being written, if
any, stays an unpublished ``.tmp-*`` folder that the next save removes.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class _StopInfo:
    step: int
    checkpoint: Path | None
    signum: int

    def _describe(self, hint: str) -> str:
        saved = (
            f"checkpoint saved to {self.checkpoint}"
            if self.checkpoint is not None
            else "no checkpoint saved (no output_dir)"
        )
        return f"interrupted at step {self.step}; {saved}; rerun with {hint}"

    def describe(self, hint: str = "fit(resume=True)") -> str:
        """``interrupted at step N; checkpoint saved to PATH; rerun with <hint>``."""
        return self._describe(hint)


class Interrupted(_StopInfo, KeyboardInterrupt):
    """SIGINT (Ctrl-C) stopped ``fit`` after saving; ``step`` and ``checkpoint`` say where."""

    def __init__(self, step: int, checkpoint: Path | None, signum: int = signal.SIGINT) -> None:
        self.step, self.checkpoint, self.signum = step, checkpoint, int(signum)
        super().__init__(self.describe())


class Terminated(_StopInfo, SystemExit):
    """SIGTERM (a scheduler's preemption) stopped ``fit`` after saving; exits with 128 + 15."""

    def __init__(self, step: int, checkpoint: Path | None, signum: int = signal.SIGTERM) -> None:
        self.step, self.checkpoint, self.signum = step, checkpoint, int(signum)
        super().__init__(128 + self.signum)

    def __str__(self) -> str:
        return self.describe()


def stop_exception(signum: int, step: int, checkpoint: Path | None) -> BaseException:
    if signum == signal.SIGINT:
        return Interrupted(step, checkpoint, signum)
    return Terminated(step, checkpoint, signum)


class StopRequests:
    """Catches SIGINT/SIGTERM while active (a context manager); ``signum`` is the first one.

    Handlers can only be installed from the main thread; elsewhere signals keep their
    previous behaviour and ``signum`` stays None.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequests:
        self.signum = None
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.restore()

    def restore(self) -> None:
        previous, self._previous = self._previous, {}
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum
            return
        # A second signal: the user does not want to wait for the save.
        self.restore()
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)
