"""Steps/s of ``dk.Distiller`` against a bare PyTorch loop doing the same work.

Both loops run the same teacher forward (inference mode), student forward, ``kd_loss``,
backward and AdamW step on the same MLPs and the same batches, already on the device. The
Distiller adds its bookkeeping: valid counts and their all-reduce, schedules, the gradient
meter (gradient balance) and a JSONL-free log record on every log step (``--log-every``,
default: the Distiller's default). Repeats are interleaved (bare, Distiller, Distiller, bare, ...) so that drift in the
machine's speed hits both alike; the figure is the median over repeats.

    python benchmarks/trainer_overhead.py --device cpu
    python benchmarks/trainer_overhead.py --device cuda --hidden 8192 --batch 1024
"""

from __future__ import annotations

import argparse
import inspect
import platform
import statistics
import time

import torch

import darkknowledge as dk

CLOCK = time.perf_counter  # --clock process: CPU time of this process (shared machines)


def mlp(width_in: int, hidden: int, classes: int, depth: int) -> torch.nn.Module:
    layers, width = [], width_in
    for _ in range(depth):
        layers += [torch.nn.Linear(width, hidden), torch.nn.GELU()]
        width = hidden
    return torch.nn.Sequential(*layers, torch.nn.Linear(width, classes))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bare_loop(student, teacher, batches, steps: int, device) -> float:
    """The reference: what any hand-written distillation loop does, nothing more."""
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    synchronize(device)
    start = CLOCK()
    for step in range(steps):
        inputs, labels = batches[step % len(batches)]
        with torch.inference_mode():
            teacher_logits = teacher(inputs)
        loss = dk.kd_loss(
            student(inputs), teacher_logits.clone(), labels, temperature=4.0, alpha=0.9
        )
        loss.total.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    return steps / (CLOCK() - start)


def distiller_loop(student, teacher, batches, steps: int, device, log_every: int) -> float:
    distiller = dk.Distiller(
        student, teacher, batches, max_steps=steps, learning_rate=1e-4, log_every=log_every,
        progress=False,
    )  # fmt: skip
    synchronize(device)
    start = CLOCK()
    distiller.fit()
    synchronize(device)
    return steps / (CLOCK() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--width", type=int, default=512, help="input features")
    parser.add_argument(
        "--hidden", type=int, default=2048, help="teacher hidden width (student: half)"
    )
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=50, help="optimizer steps per repeat")
    parser.add_argument("--repeats", type=int, default=5)
    default_log_every = inspect.signature(dk.Distiller).parameters["log_every"].default
    parser.add_argument(
        "--log-every",
        type=int,
        default=default_log_every,
        help=f"the Distiller's log_every (default: its default, {default_log_every})",
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (0: torch's default)"
    )
    parser.add_argument("--clock", choices=("wall", "process"), default="wall")
    args = parser.parse_args()
    if args.clock == "process":  # CPU runs on a busy machine: count only this process's time
        global CLOCK
        CLOCK = time.process_time
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    torch.manual_seed(0)
    teacher = mlp(args.width, args.hidden, args.classes, depth=3).to(device).eval()
    teacher.requires_grad_(False)
    student = mlp(args.width, args.hidden // 2, args.classes, depth=2).to(device)
    batches = [
        (
            torch.randn(args.batch, args.width, device=device),
            torch.randint(args.classes, (args.batch,), device=device),
        )
        for _ in range(8)
    ]
    bare_loop(student, teacher, batches, 5, device)  # warm-up: allocator, kernels, lazy imports
    distiller_loop(student, teacher, batches, 5, device, args.log_every)

    bare, ours = [], []
    for repeat in range(args.repeats):
        order = ("bare", "distiller") if repeat % 2 == 0 else ("distiller", "bare")
        for name in order:
            if name == "bare":
                bare.append(bare_loop(student, teacher, batches, args.steps, device))
            else:
                ours.append(
                    distiller_loop(student, teacher, batches, args.steps, device, args.log_every)
                )
    bare_median, ours_median = statistics.median(bare), statistics.median(ours)
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine()
    )
    print(
        f"device: {device} ({name}), torch {torch.__version__}, threads {torch.get_num_threads()}"
    )
    print(
        f"shapes: batch {args.batch}, width {args.width}, teacher hidden {args.hidden} x3, student hidden {args.hidden // 2} x2, classes {args.classes}"
    )
    print(
        f"steps per repeat {args.steps}, repeats {args.repeats}, log_every {args.log_every}, clock {args.clock}"
    )
    print(f"bare loop   steps/s: median {bare_median:.2f}  all {[round(x, 2) for x in bare]}")
    print(f"Distiller   steps/s: median {ours_median:.2f}  all {[round(x, 2) for x in ours]}")
    print(f"ms/step: bare {1e3 / bare_median:.2f}, Distiller {1e3 / ours_median:.2f}")
    print(f"ratio Distiller / bare: {ours_median / bare_median:.3f}")


if __name__ == "__main__":
    main()
