"""What the default ``on_nonfinite="stop"`` costs a step on the CPU (docs/reliability.md).

1. The Distiller of ``benchmarks/trainer_overhead.py`` (its CPU shapes) with the monitor as
   it is and with its calls replaced by no-ops, interleaved, 12 repeats of 40 steps each,
   process CPU time: the medians, and every repeat.
2. The monitor's own calls alone, on the tensors a step gives it, 20,000 steps in the
   pattern of ``log_every=10`` (10 steps, then the log step's snapshot and its read).

    OMP_NUM_THREADS=1 python tests/faults/nonfinite_cost.py
"""

from __future__ import annotations

import importlib
import statistics
import sys
import time
from pathlib import Path

import torch

import darkknowledge as dk
from darkknowledge.train.nonfinite import NonFiniteMonitor

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"

WIDTH, HIDDEN, CLASSES, BATCH = 256, 1024, 100, 128


def distiller_ms_per_step(student, teacher, batches, monitor: bool, steps: int = 40) -> float:
    run = dk.Distiller(student, teacher, batches, max_steps=steps, learning_rate=1e-4,
                       progress=False)  # fmt: skip
    if not monitor:
        run._nonfinite.check_step = lambda *args, **kwargs: False
        run._nonfinite.snapshot = lambda *args, **kwargs: None
    start = time.process_time()
    run.fit()
    return (time.process_time() - start) / steps * 1000


class _OneProcess:
    scaler, num_processes = None, 1


def monitor_us_per_step(steps: int = 20_000) -> float:
    monitor = NonFiniteMonitor("stop")
    parts = dk.KDLoss(torch.tensor(1.0), torch.tensor(0.5), torch.tensor(0.2))
    outputs = [dk.train.TaskOutput(loss=parts)]
    start = time.process_time()
    for step in range(1, steps + 1):
        monitor.check_step(_OneProcess, step, outputs, None, list)
        if step % 10 == 0:
            monitor.snapshot(_OneProcess)
            monitor.stop_if_seen(None)
    return (time.process_time() - start) / steps * 1e6


def main() -> None:
    sys.path.insert(0, str(BENCHMARKS))
    bench = importlib.import_module("trainer_overhead")  # the benchmark's models
    torch.set_num_threads(1)
    torch.manual_seed(0)
    teacher = bench.mlp(WIDTH, HIDDEN, CLASSES, depth=3).eval().requires_grad_(False)
    student = bench.mlp(WIDTH, HIDDEN // 2, CLASSES, depth=2)
    batches = [(torch.randn(BATCH, WIDTH), torch.randint(CLASSES, (BATCH,))) for _ in range(8)]
    for monitor in (True, False):  # warm-up
        distiller_ms_per_step(student, teacher, batches, monitor, steps=5)
    times: dict[bool, list[float]] = {True: [], False: []}
    for repeat in range(12):
        for monitor in (True, False) if repeat % 2 == 0 else (False, True):
            times[monitor].append(distiller_ms_per_step(student, teacher, batches, monitor))
    for monitor, label in ((True, "with the monitor"), (False, "monitor as no-ops")):
        values = sorted(round(t, 2) for t in times[monitor])
        print(f"Distiller ms/step {label}: median {statistics.median(values):.2f}, all {values}")
    print(f"the monitor alone, log_every=10 pattern: {monitor_us_per_step():.1f} us per step")


if __name__ == "__main__":
    main()
