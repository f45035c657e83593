"""The end of a multi-process program (torchrun, ``accelerate launch``).

gloo's worker threads can abort a finished process during the interpreter's finalization, even
after the process group is destroyed: the process prints "terminate called without an active
exception" and dies of SIGABRT (exit -6) after all its work is done, and torchrun then reports
the whole run as failed (seen about once in 25 two-process launches on a 2-core machine; the
cause, work objects that gloo's threads still hold while Python is torn down, is described in
pytorch/pytorch PR 179291, which proposed an ``atexit`` hook and was abandoned). The only
reliable way out is to skip finalization: flush, then ``os._exit``. ``dk`` does this itself;
a script of your own that trains under torchrun ends with :func:`end_processes`.

This module never imports torch itself: it looks torch.distributed up in ``sys.modules``,
where it is if any process group was ever made.
"""

from __future__ import annotations

import os
import sys
from typing import NoReturn


def leave_process_group() -> None:
    """Destroy the default process group, if one is left."""
    distributed = sys.modules.get("torch.distributed")  # never import torch just for this
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        distributed.destroy_process_group()


def launched_with_several_processes() -> bool:
    """Whether a launcher started this process as one of several (``WORLD_SIZE`` > 1)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def end_processes(code: int = 0, *, destroy_group: bool = True) -> NoReturn:
    """End this process with exit status ``code`` without the interpreter's finalization.

    Destroys the default process group first (unless ``destroy_group=False``: after a failed
    collective the group is broken, and tearing it down can itself abort), then flushes stdout
    and stderr and calls ``os._exit(code)``. Call it last, after every file is written and
    closed: ``atexit`` handlers and ``finally`` blocks further up do not run.

    >>> end_processes("0")
    Traceback (most recent call last):
    TypeError: end_processes: code must be an int exit status 0-255, got '0' (str)
    >>> end_processes(256)
    Traceback (most recent call last):
    ValueError: end_processes: code must be an exit status 0-255, got 256
    """
    if isinstance(code, bool) or not isinstance(code, int):
        raise TypeError(
            f"end_processes: code must be an int exit status 0-255, got {code!r} "
            f"({type(code).__name__})"
        )
    if not 0 <= code <= 255:
        raise ValueError(f"end_processes: code must be an exit status 0-255, got {code}")
    if destroy_group:
        leave_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
