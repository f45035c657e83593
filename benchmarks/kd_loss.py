"""Time and peak memory of ``dk.kd_loss`` against the plain-PyTorch KD formula.

Both compute ``(1 - alpha)·CE(z_s, y) + alpha·T²·KL(softmax(z_t/T) ‖ softmax(z_s/T))`` over
``rows x classes`` logits, forward and backward. Each timed case runs in its own subprocess so
that its peak memory is its own: on CPU the peak RSS (``resource.getrusage``) above the RSS
measured after the inputs were created; on CUDA ``torch.cuda.max_memory_allocated`` above the
inputs. Repeats are interleaved (baseline, kd_loss, baseline, ...) and the median is reported.

    python benchmarks/kd_loss.py                      # 8192 x 32000 float32 on CPU
    python benchmarks/kd_loss.py --device cuda --repeats 7
    python benchmarks/kd_loss.py --rows 512 --classes 1000 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = ("baseline", "kd_loss")
DTYPES = ("float32", "bfloat16", "float16")
RESULTS = Path(__file__).resolve().parent / "results" / "kd_loss.md"


def _rss_bytes() -> int:
    """Current resident set size (Linux /proc; falls back to psutil)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import psutil

        return psutil.Process().memory_info().rss


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _run_case(
    case: str,
    rows: int,
    classes: int,
    dtype: str,
    device: str,
    temperature: float,
    alpha: float,
    inner: int = 1,
) -> dict:
    """Forward+backward of one case, in this (fresh) process: one warm-up, then ``inner``
    timed runs (their median is this process's time)."""
    import torch
    import torch.nn.functional as F

    import darkknowledge as dk

    torch.manual_seed(0)
    cuda = device.startswith("cuda")
    dt = getattr(torch, dtype)
    # In place (mul_), so that making the inputs leaves no peak above them.
    student = torch.randn(rows, classes, device=device).mul_(3).to(dt).requires_grad_(True)
    teacher = torch.randn(rows, classes, device=device).mul_(3).to(dt)
    labels = torch.randint(classes, (rows,), device=device)

    def baseline():
        log_q = F.log_softmax(student.float() / temperature, dim=-1)
        log_p = F.log_softmax(teacher.float() / temperature, dim=-1)
        soft = F.kl_div(log_q, log_p, reduction="batchmean", log_target=True) * temperature**2
        hard = F.cross_entropy(student.float(), labels)
        return (1 - alpha) * hard + alpha * soft

    def ours():
        return dk.kd_loss(student, teacher, labels, temperature=temperature, alpha=alpha).total

    fn = baseline if case == "baseline" else ours
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_mem = torch.cuda.memory_allocated()
    else:
        # ru_maxrss cannot be reset: the peak over the warm-up and timed runs, minus the RSS
        # holding the inputs. Check that making the inputs did not leave a higher peak.
        base_mem = _rss_bytes()
        pre_peak = _peak_rss_bytes()
    fn().backward()  # warm-up: one-time initialisation is not what we measure (same peak)
    times, cpu_times = [], []
    for _ in range(inner):
        student.grad = None
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = fn()
        loss.backward()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    elapsed = statistics.median(times)
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base_mem
    else:
        peak = _peak_rss_bytes() - base_mem
        if _peak_rss_bytes() <= pre_peak:
            raise RuntimeError("the inputs' own peak hides the loss's peak; measure differently")
    return {
        "case": case,
        "seconds": elapsed,
        "cpu_seconds": statistics.median(cpu_times),  # less noisy on a shared machine
        "peak_bytes": peak,
        "loss": float(loss),
    }


def _spawn(case: str, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable, __file__, "--_case", case, "--rows", str(args.rows), "--classes",
        str(args.classes), "--dtype", args.dtype, "--device", args.device, "--temperature",
        str(args.temperature), "--alpha", str(args.alpha), "--inner", str(args.inner),
    ]  # fmt: skip
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _machine(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return (
            f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
        )
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--classes", type=int, default=32000)
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved runs of each case")
    parser.add_argument("--inner", type=int, default=1, help="timed runs per subprocess (median)")
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--alpha", type=float, default=0.9)
    parser.add_argument("--output", type=Path, default=RESULTS, help="markdown file to (over)write")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--_case", choices=CASES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args._case:
        result = _run_case(
            args._case,
            args.rows,
            args.classes,
            args.dtype,
            args.device,
            args.temperature,
            args.alpha,
            args.inner,
        )
        print(json.dumps(result))
        return 0

    runs: dict[str, list[dict]] = {case: [] for case in CASES}
    for i in range(args.repeats):
        order = CASES if i % 2 == 0 else CASES[::-1]  # interleave, alternating who goes first
        for case in order:
            runs[case].append(_spawn(case, args))
            print(
                f"repeat {i + 1}/{args.repeats} {case}: {runs[case][-1]['seconds']:.3f} s",
                flush=True,
            )

    median = {c: statistics.median(r["seconds"] for r in runs[c]) for c in CASES}
    peak = {c: statistics.median(r["peak_bytes"] for r in runs[c]) for c in CASES}
    losses = {c: runs[c][0]["loss"] for c in CASES}
    gib = 2**30
    memory_kind = "CUDA max_memory_allocated" if args.device.startswith("cuda") else "peak RSS"
    command = "python benchmarks/kd_loss.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    lines = [
        "# kd_loss vs plain PyTorch (forward + backward)",
        "",
        f"- Machine: {_machine(args.device)}",
        f"- Command: `{command.strip()}`",
        f"- Shape: {args.rows} rows x {args.classes} classes, {args.dtype}, T={args.temperature}, "
        f"alpha={args.alpha}, no ignored labels (so both compute the same number); {args.repeats} interleaved repeats, each "
        f"case in its own subprocess (one warm-up, then the median of {args.inner} timed run(s)); median over "
        f"repeats; peak memory is {memory_kind} above the inputs (logits, labels).",
        f"- Loss values: baseline {losses['baseline']:.6f}, kd_loss {losses['kd_loss']:.6f}",
        "",
        "| case | median time (s) | all times (s) | peak memory (GiB) |",
        "| --- | --- | --- | --- |",
    ]
    names = {
        "baseline": "plain PyTorch (log_softmax, kl_div batchmean, T², cross_entropy)",
        "kd_loss": "dk.kd_loss",
    }
    for c in CASES:
        times = ", ".join(f"{r['seconds']:.3f}" for r in runs[c])
        lines.append(f"| {names[c]} | {median[c]:.3f} | {times} | {peak[c] / gib:.2f} |")
    lines += [
        "",
        f"- Time ratio kd_loss / baseline: **{median['kd_loss'] / median['baseline']:.3f}** (goal <= 1.05)",
        f"- Peak memory ratio kd_loss / baseline: **{peak['kd_loss'] / max(peak['baseline'], 1):.3f}** (goal <= 1.00)",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(
            "w", dir=args.output.parent, delete=False, suffix=".tmp"
        ) as f:
            f.write(text)
        os.replace(f.name, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
