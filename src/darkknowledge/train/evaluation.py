"""Evaluation over processes: each takes its share of the batches, sums are added up.

Process ``r`` of ``W`` evaluates batches ``r, r + W, r + 2W, ...`` of the ``N`` batches, and
every process runs the same number of forwards, ``ceil(N / W)``: one with fewer batches runs
the first batch again and drops the result. Under FSDP every forward is a collective (it
all-gathers the sharded parameters), so a process with one forward more than another would
wait for it until the process group's timeout; under DDP the extra forward is harmless.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import send_to_device

from .distributed import sum_over_processes


def round_robin(data: Iterable, rank: int, world_size: int) -> Iterator[tuple[Any, bool]]:
    """Process ``rank``'s batches of ``data`` as ``(batch, True)``, then ``(first batch,
    False)`` as often as it falls short of ``ceil(N / world_size)`` (at most once). Every
    process iterates all of ``data``, so each knows ``N`` without communicating.

    >>> list(round_robin(["a", "b", "c", "d", "e"], rank=1, world_size=2))
    [('b', True), ('d', True), ('a', False)]
    >>> list(round_robin(["a"], rank=1, world_size=2)), list(round_robin([], rank=0, world_size=2))
    ([('a', False)], [])
    """
    first, seen, mine = None, 0, 0
    for index, batch in enumerate(data):
        if index == 0:
            first = batch
        seen += 1
        if index % world_size == rank:
            mine += 1
            yield batch, True
    for _ in range(math.ceil(seen / world_size) - mine):
        yield first, False


@torch.no_grad()
def evaluate_task(
    accelerator: Accelerator, task: Any, student: torch.nn.Module, data: Iterable
) -> dict[str, float]:
    """Means over ``data`` and all processes of ``task.eval_sums(student, batch)``: each sum
    divided by the summed ``count`` (``correct`` becomes ``accuracy``), and ``count``."""
    was_training = student.training
    student.eval()
    sums: dict[str, float] = {}
    try:
        shares = round_robin(data, accelerator.process_index, accelerator.num_processes)
        for batch, counted in shares:
            batch_sums = task.eval_sums(student, send_to_device(batch, accelerator.device))
            for name, value in batch_sums.items() if counted else ():
                sums[name] = sums.get(name, 0.0) + float(value)
    finally:
        student.train(was_training)
    sums = sum_over_processes(accelerator, sums)
    count = sums.get("count", 0.0)
    metrics = {
        ("accuracy" if n == "correct" else n): v / max(count, 1.0)
        for n, v in sums.items()
        if n != "count"
    }
    return {**metrics, "count": count}
