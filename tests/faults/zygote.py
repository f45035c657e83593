"""A process that imports darkknowledge (torch, accelerate, transformers, ...) once, then
forks one child per ``dk`` command it is sent, so that 20 kills cost 20 forks rather than
20 interpreter starts of several seconds each.

Each child runs ``darkknowledge.cli.main(argv)`` from scratch, as ``python -m
darkknowledge.cli`` would, with its stderr in a file; the parent never runs torch code itself
(no thread pool exists when it forks). A SIGKILL to a child leaves on disk exactly what it
leaves from a fresh process. Protocol, one JSON object per line: in ``{"argv": [...],
"stderr": PATH}``; out ``{"pid": N}`` when the child started, then ``{"exit": CODE}`` when it
ended (``-9`` when killed).

    python zygote.py MODULE ...   # the modules to import first, besides darkknowledge.cli
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import sys
import traceback


def _child(argv: list[str], stderr: str) -> None:
    descriptor = os.open(stderr, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(descriptor, 2)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115  (the fd outlives the object)
    sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
    code = 1
    try:
        import torch

        from darkknowledge.cli import main

        torch.set_num_threads(1)
        code = main(argv)
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def serve(modules: list[str]) -> None:
    for name in ["darkknowledge.cli", "darkknowledge.commands._run", "torch._dynamo", *modules]:
        importlib.import_module(name)
    reply = sys.stdout
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            os.setpgid(0, 0)  # its own process group, which the harness kills whole
            _child(request["argv"], request["stderr"])
        with contextlib.suppress(OSError):  # also here: the group exists before the pid is sent
            os.setpgid(pid, pid)
        reply.write(json.dumps({"pid": pid}) + "\n")
        reply.flush()
        _, status = os.waitpid(pid, 0)
        reply.write(json.dumps({"exit": os.waitstatus_to_exitcode(status)}) + "\n")
        reply.flush()


if __name__ == "__main__":
    serve(sys.argv[1:])
