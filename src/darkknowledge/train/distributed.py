"""The one place where counts and metrics cross processes.

Normalisation rule: each process divides its summed loss by ``global_count / world_size``, where
``global_count`` counts the valid positions of all micro-batches of the optimizer step on all
processes. DDP then *averages* gradients over processes, which gives exactly the gradient of
``Σ loss / global_count``, as one big batch would.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from .._files import DiskFull
from .failures import (
    CollectiveTimeout,
    PeerLost,
    RunFailure,
    collective_name,
    peer_gone,
)

Method = TypeVar("Method", bound=Callable[..., Any])


def reduce_sum(accelerator: Accelerator, tensor: torch.Tensor) -> torch.Tensor:
    """Sum of ``tensor`` over processes (the tensor itself in a single process)."""
    if accelerator.num_processes == 1:
        return tensor
    return accelerator.reduce(tensor, reduction="sum")


def global_count_and_stop(
    accelerator: Accelerator, local_count: torch.Tensor, stop: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The step's valid count over all processes, and whether any process was asked to stop
    (SIGINT/SIGTERM), in one all-reduce. A single process skips both: no collective, and no
    host-to-device copy of the flag."""
    if accelerator.num_processes == 1:
        return local_count, None
    flag = torch.tensor(float(stop), device=local_count.device)
    reduced = reduce_sum(accelerator, torch.stack([local_count.float(), flag]))  # (2,)
    return reduced[0], reduced[1] > 0


def step_normalizer(accelerator: Accelerator, global_count: torch.Tensor) -> torch.Tensor:
    """``max(global_count, 1) / world_size`` as float32: an all-ignored step gives a zero loss,
    never NaN."""
    return global_count.clamp_min(1).float() / accelerator.num_processes


def sum_over_processes(accelerator: Accelerator, sums: dict[str, float]) -> dict[str, float]:
    """Each named host-side sum added up over processes (the dict itself in one process)."""
    if accelerator.num_processes == 1:
        return sums
    total: dict[str, float] = {}
    for part in gather_object([sums]):
        for name, value in part.items():
            total[name] = total.get(name, 0.0) + value
    return total


def explain_failures(method: Method) -> Method:
    """Decorate a Distiller method that runs collectives or writes files, so that it fails
    with a message that says what happened and what is kept:

    - a collective that timed out (gloo raises ``RuntimeError: ... Timed out waiting ...``)
      becomes a :class:`CollectiveTimeout` saying what every process must do;
    - a collective whose peer is gone (gloo: ``Connection closed by peer``: the process crashed
      or was killed) becomes a :class:`PeerLost` naming the collective and the peer;
    - a :class:`DiskFull` learns the last good checkpoint.

    NCCL's watchdog ends the process instead of raising."""

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except DiskFull as error:
            error.kept = error.kept or _kept(self._last_checkpoint)
            raise
        except RunFailure:
            raise
        except RuntimeError as error:
            failure = _explained(self, method.__name__, error)
            if failure is None:
                raise
            raise failure from error

    return wrapper  # type: ignore[return-value]


def _explained(distiller: Any, name: str, error: RuntimeError) -> RunFailure | None:
    acc = distiller.accelerator
    if acc.num_processes == 1:
        return None
    where = f"Distiller.{name} on process {acc.process_index} of {acc.num_processes}"
    collective = collective_name(error.__traceback__) or "a collective"
    peer = peer_gone(error)
    if peer is not None:
        return PeerLost(
            f"{where} lost another process in {collective} ({peer}): it crashed or was killed; "
            f"stop every process and start them all again with resume; "
            f"{_kept(distiller._last_checkpoint)}"
        )
    if "Timed out waiting" not in str(error):  # gloo's words
        return None
    return CollectiveTimeout(
        f"{where} waited for the other processes until the timeout in {collective}: every "
        "process must call fit, evaluate, save_checkpoint and export_student, in the same "
        "order (a call on the main process alone waits for the others forever), and keep up "
        "with the others (a frozen process looks the same; DK_COLLECTIVE_TIMEOUT_S sets the "
        f"timeout, 30 min by default); {str(error).splitlines()[0]}"
    )


def _kept(checkpoint: Any) -> str:
    if checkpoint is None:
        return "no checkpoint was saved before it"
    return f"the last good checkpoint is {checkpoint}"
