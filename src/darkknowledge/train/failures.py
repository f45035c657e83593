"""Why a training run stopped, said in one line: a non-finite loss, a lost or stuck process.

Every such error derives from :class:`RunFailure`; ``dk distill`` and ``dk train`` print its
message as one line (``dk distill: error: ...``) and exit with 1. Each message says what is
kept (the last good checkpoint) and how to go on. A full disk is
:class:`darkknowledge._files.DiskFull` (an ``OSError``), which the command reports the same way.
"""

from __future__ import annotations

import re
from types import TracebackType


class RunFailure(Exception):
    """A run stopped for a reason its message explains (what happened, what is kept, what to
    do); the ``dk`` command prints it in one line and exits with 1."""


class NonFiniteLoss(RunFailure, FloatingPointError):
    """A step's loss or gradients held NaN or Inf (``on_nonfinite="stop"``, the default)."""


class CollectiveFailure(RunFailure, RuntimeError):
    """A collective failed, so the process group is unusable: the process should end without
    tearing it down (gloo may abort a process whose peers are gone), as ``dk`` does."""


class PeerLost(CollectiveFailure):
    """Another process of a multi-process run is gone (crashed or killed) during a collective."""


class CollectiveTimeout(CollectiveFailure):
    """A collective waited for the other processes until the process group's timeout."""


# gloo's words when the other end of a connection went away (the process died).
_PEER_GONE = re.compile(r"Connection (?:closed|reset) by peer(?: \[[^\]]*\]:\d+)?")


def peer_gone(error: BaseException) -> str | None:
    """gloo's phrase naming the peer whose connection closed (``Connection closed by peer
    [127.0.0.1]:21915``), or None when ``error`` is something else.

    >>> peer_gone(RuntimeError("[pair.cc:553] Connection closed by peer [127.0.0.1]:21915. This is"))
    'Connection closed by peer [127.0.0.1]:21915'
    >>> peer_gone(RuntimeError("CUDA out of memory")) is None
    True
    """
    found = _PEER_GONE.search(str(error))
    return found.group(0) if found else None


def collective_name(traceback: TracebackType | None) -> str | None:
    """The ``torch.distributed`` collective an error was raised in (``all_reduce``,
    ``barrier``, ...: the outermost frame of ``distributed_c10d.py`` in the traceback), or
    DDP's gradient all-reduce when the error came out of a backward pass; None if neither."""
    in_backward = False
    while traceback is not None:
        code = traceback.tb_frame.f_code
        filename = code.co_filename.replace("\\", "/")
        if filename.endswith("distributed/distributed_c10d.py"):
            return code.co_name
        in_backward = in_backward or (code.co_name == "backward" and "/torch/" in filename)
        traceback = traceback.tb_next
    return "the gradient all-reduce of backward (DDP)" if in_backward else None
