"""The processes of a capture: rank, world size, and the two collectives it needs.

A capture started by torchrun (``WORLD_SIZE`` > 1) uses the caller's process group, or
creates one for its own duration. Its collectives run on a separate gloo group with a long
timeout: the shard records are small CPU tensors whatever device the teacher is on, and one
rank may wait at the barrier for hours while another captures its last shard.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

_TIMEOUT = datetime.timedelta(hours=24)


class Processes(NamedTuple):
    rank: int
    world_size: int
    group: Any  # the gloo group, None in a single process


@contextlib.contextmanager
def capture_processes() -> Iterator[Processes]:
    """This process's place in the capture; a single process needs no process group."""
    created = False
    if not (dist.is_available() and dist.is_initialized()):
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            yield Processes(0, 1, None)
            return
        dist.init_process_group("gloo", timeout=_TIMEOUT)
        created = True
    try:
        if dist.get_world_size() == 1:
            yield Processes(0, 1, None)
            return
        group = dist.new_group(backend="gloo", timeout=_TIMEOUT)
        try:
            yield Processes(dist.get_rank(), dist.get_world_size(), group)
        finally:
            dist.destroy_process_group(group)
    finally:
        if created:
            dist.destroy_process_group()


def barrier(processes: Processes) -> None:
    if processes.world_size > 1:
        dist.barrier(group=processes.group)


def sum_over_processes(processes: Processes, table: torch.Tensor) -> torch.Tensor:
    """Element-wise sum of an int64 CPU table over processes (each fills only its own rows)."""
    if processes.world_size > 1:
        dist.all_reduce(table, op=dist.ReduceOp.SUM, group=processes.group)
    return table
