"""Time and peak memory of the vocabulary-scale distillation loss, four ways.

Every case computes the same number, forward and backward (gradients for the student's hidden
states and output weight; the teacher gets none):

    (1 - alpha)·CE(z_s, y) + alpha·T²·KL(softmax(z_t/T) ‖ softmax(z_s/T)),   z = h Wᵀ

- ``naive``: full ``(N, V)`` logits, ``log_softmax``, ``kl_div(batchmean)``, ``cross_entropy``;
- ``liger``: Liger Kernel's ``LigerFusedLinearJSDLoss(beta=0)`` (forward KL). Liger applies no
  T², so it gets ``weight_soft_loss = alpha·T²`` and ``weight_hard_loss = 1 - alpha``;
- ``fused``: ``dk.fused_linear_kd_loss``; ``fused_compile`` the same with ``compile=True``;
- ``roofline``: the matrix products alone (student and teacher logits, then the hidden and
  weight gradients), chunked like ``fused``: what the loss costs without its softmax work.

Each run of a case is its own subprocess, so its peak memory is its own: on CPU the peak RSS
(``getrusage``) above the RSS after the inputs were created and the bytes of the gradients
(hidden and weight) the case must return; on CUDA ``max_memory_allocated`` above the same.
Runs are interleaved (naive, liger, fused, roofline, naive, ...) and medians reported.

    python benchmarks/fused_kd.py                            # 2048 x 512 x 128,256 float32, CPU
    python benchmarks/fused_kd.py --dtype bfloat16 --repeats 1
    python benchmarks/fused_kd.py --device cuda --repeats 5 --threads 0
    python benchmarks/fused_kd.py --cases fused --chunk-sizes 64,128,256,512   # tune chunk_size
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
import time

CASES = ("naive", "liger", "fused", "fused_compile", "roofline")
# Run from a checkout without installing the package (e.g. on a GPU box with its own torch).
sys.path.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "src"))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _make_step(case: str, inputs: dict, args: argparse.Namespace, chunk_size: int):
    """A function running one forward + backward of ``case``; it returns the loss value."""
    import torch
    import torch.nn.functional as F

    import darkknowledge as dk

    hs, ws, ht, wt, labels = (inputs[k] for k in ("hs", "ws", "ht", "wt", "labels"))
    temperature, alpha = args.temperature, args.alpha

    if case == "naive":

        def step():
            student = hs @ ws.T  # (N, V)
            with torch.no_grad():
                teacher = ht @ wt.T
            log_q = F.log_softmax(student.float() / temperature, dim=-1)
            log_p = F.log_softmax(teacher.float() / temperature, dim=-1)
            soft = F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)
            hard = F.cross_entropy(student.float(), labels)
            loss = (1 - alpha) * hard + alpha * temperature**2 * soft
            loss.backward()
            return loss.item()

    elif case == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        loss_fn = LigerFusedLinearJSDLoss(
            weight_hard_loss=1 - alpha,
            weight_soft_loss=alpha * temperature**2,  # Liger has no T² factor of its own
            beta=0.0,  # Liger's beta weights the teacher in the mixture: 0 is KL(teacher ‖ student)
            temperature=temperature,
            compiled=not args.liger_eager,
            chunk_size=args.liger_chunk_size or chunk_size,
        )

        def step():
            loss = loss_fn(hs, ws, ht, wt, labels)
            loss.backward()
            return loss.item()

    elif case in ("fused", "fused_compile"):
        compile = case == "fused_compile"

        def step():
            loss = dk.fused_linear_kd_loss(
                hs, ws, ht, wt, labels, temperature=temperature, alpha=alpha, chunk_size=chunk_size,
                compile=compile,
            )  # fmt: skip
            loss.total.backward()
            return loss.total.item()

    elif case == "roofline":
        math_dtype = torch.promote_types(hs.dtype, torch.float32)

        def step():
            with torch.no_grad():
                grad_hidden = torch.empty_like(hs)
                grad_weight = torch.zeros(ws.shape, dtype=math_dtype, device=ws.device)
                for start in range(0, hs.shape[0], chunk_size):
                    rows = slice(start, start + chunk_size)
                    logits = hs[rows] @ ws.T  # stands in for the gradient of the logits
                    teacher = ht[rows] @ wt.T
                    torch.mm(logits, ws, out=grad_hidden[rows])
                    if hs.dtype == math_dtype:
                        grad_weight.addmm_(logits.T, hs[rows])
                    else:
                        grad_weight += logits.T @ hs[rows]
                    del logits, teacher
                hs.grad, ws.grad = grad_hidden, grad_weight.to(ws.dtype)
            return float("nan")

    else:
        raise ValueError(f"unknown case {case!r}; valid cases are: {', '.join(CASES)}")
    return step


def _worker(args: argparse.Namespace) -> dict:
    """Run one case in this fresh process: warm-up runs, then one timed run."""
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator(device=args.device).manual_seed(0)

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen, device=args.device)).to(dtype)

    inputs = {
        "hs": randn(args.tokens, args.hidden).requires_grad_(),
        "ws": randn(args.vocab, args.hidden, scale=args.hidden**-0.5).requires_grad_(),
        "ht": randn(args.tokens, args.teacher_hidden),
        "wt": randn(args.vocab, args.teacher_hidden, scale=args.teacher_hidden**-0.5),
        "labels": torch.randint(args.vocab, (args.tokens,), generator=gen, device=args.device),
    }
    grad_bytes = sum(inputs[k].numel() * inputs[k].element_size() for k in ("hs", "ws"))
    step = _make_step(args.worker, inputs, args, args.chunk_size)

    def run_once():
        inputs["hs"].grad = inputs["ws"].grad = None
        if cuda:
            torch.cuda.synchronize()
        start, cpu_start = time.perf_counter(), time.process_time()
        value = step()
        if cuda:
            torch.cuda.synchronize()
        return value, time.perf_counter() - start, time.process_time() - cpu_start

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    # A compiled case always gets one untimed run: compilation is not what is measured.
    compiled = args.worker == "fused_compile" or (args.worker == "liger" and not args.liger_eager)
    for _ in range(max(args.warmup, int(compiled))):
        run_once()
    value, seconds, cpu_seconds = run_once()
    peak = torch.cuda.max_memory_allocated() if cuda else _peak_rss_bytes()
    extra = peak - base - grad_bytes
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "extra_bytes": extra, "loss": value}


def _spawn(case: str, chunk_size: int, args: argparse.Namespace) -> dict:
    command = [
        sys.executable,
        __file__,
        *args.argv,
        "--worker",
        case,
        "--chunk-size",
        str(chunk_size),
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        error = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        return {"error": error[:200]}
    return json.loads(lines[-1])


def _table(results: dict, args: argparse.Namespace) -> str:
    """A markdown table of medians and ratios against naive, Liger and the roofline."""
    summary = {}
    for key, runs in results.items():
        good = [r for r in runs if "error" not in r]
        if not good:
            summary[key] = {"error": runs[0]["error"]}
            continue
        summary[key] = {
            "seconds": statistics.median(r["seconds"] for r in good),
            "cpu": statistics.median(r["cpu_seconds"] for r in good),
            "extra": statistics.median(r["extra_bytes"] for r in good),
            "loss": good[0]["loss"],
            "runs": len(good),
        }

    def ratio(key, reference, field):
        if reference == "roofline":  # the roofline with the same chunk size, else the first
            same = ("roofline", key[1])
            reference = same if same in summary else roofline
        if reference not in summary or "error" in summary[reference] or "error" in summary[key]:
            return "-"
        denominator = summary[reference][field]
        return f"{summary[key][field] / denominator:.2f}" if denominator > 0 else "-"

    naive = next((k for k in summary if k[0] == "naive"), None)
    liger = next((k for k in summary if k[0] == "liger"), None)
    roofline = next((k for k in summary if k[0] == "roofline"), None)
    lines = [
        "| case | chunk | time (s) | CPU time (s) | memory above inputs+grads (MB) | loss | "
        "time / naive | time / liger | time / roofline | CPU time / roofline | memory / naive |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, row in summary.items():
        name, chunk = key
        if "error" in row:
            lines.append(f"| {name} | {chunk} | failed: {row['error']} | | | | | | | | |")
            continue
        lines.append(
            f"| {name} | {chunk} | {row['seconds']:.2f} | {row['cpu']:.1f} | {row['extra'] / 2**20:.0f} | "
            f"{row['loss']:.6g} | "
            f"{ratio(key, naive, 'seconds')} | {ratio(key, liger, 'seconds')} | "
            f"{ratio(key, 'roofline', 'seconds')} | {ratio(key, 'roofline', 'cpu')} | "
            f"{ratio(key, naive, 'extra')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--teacher-hidden", type=int, default=None, help="default: --hidden")
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--threads", type=int, default=2, help="torch threads on CPU; 0 keeps the default"
    )
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument(
        "--chunk-sizes", default=None, help="comma-separated; default: the library's"
    )
    parser.add_argument(
        "--liger-chunk-size",
        type=int,
        default=None,
        help="one Liger run at this chunk size; default: each of --chunk-sizes",
    )
    parser.add_argument("--liger-eager", action="store_true", help="Liger without torch.compile")
    parser.add_argument(
        "--repeats", type=int, default=3, help="interleaved rounds; medians reported"
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="untimed runs in each subprocess (compiled cases: >= 1)",
    )
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--chunk-size", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.teacher_hidden = args.teacher_hidden or args.hidden
    if args.worker:
        print(json.dumps(_worker(args)))
        return 0

    from darkknowledge.losses.fused import DEFAULT_CHUNK_SIZE

    raw = sys.argv[1:] if argv is None else argv
    args.argv = _drop_values(raw, ("--cases", "--chunk-sizes", "--repeats"))
    chunk_sizes = (
        [int(c) for c in args.chunk_sizes.split(",")] if args.chunk_sizes else [DEFAULT_CHUNK_SIZE]
    )
    keys = []
    for case in args.cases.split(","):
        if case not in CASES:
            parser.error(f"unknown case {case!r}; valid cases are: {', '.join(CASES)}")
        if case == "naive":
            keys.append((case, "-"))
        elif case == "liger" and args.liger_chunk_size:
            keys.append((case, args.liger_chunk_size))
        else:
            keys += [(case, c) for c in chunk_sizes]
    results = {key: [] for key in keys}
    for round_ in range(args.repeats):
        for key in keys:
            chunk = chunk_sizes[0] if key[1] == "-" else key[1]
            result = _spawn(key[0], chunk, args)
            results[key].append(result)
            print(
                f"round {round_ + 1}/{args.repeats} {key[0]} chunk={key[1]}: {result}",
                file=sys.stderr,
            )
    import torch

    print(f"command: python benchmarks/fused_kd.py {shlex.join(raw)}")
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, {args.threads or 'default'} threads, device {args.device}"
    )
    print(
        f"workload: N={args.tokens} tokens, H_s={args.hidden}, H_t={args.teacher_hidden}, "
        f"V={args.vocab}, {args.dtype}, T={args.temperature}, alpha={args.alpha}, "
        f"{args.repeats} interleaved runs, {args.warmup} warm-up run(s) each"
    )
    print(_table(results, args))
    return 0


def _drop_values(argv: list[str], options: tuple[str, ...]) -> list[str]:
    """``argv`` without the driver-only options (and their values) the workers must not see."""
    kept, skip = [], False
    for item in argv:
        if skip:
            skip = False
            continue
        if item in options:
            skip = True
            continue
        if item.startswith(tuple(o + "=" for o in options)):
            continue
        kept.append(item)
    return kept


if __name__ == "__main__":
    sys.exit(main())
