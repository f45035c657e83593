"""On-policy and mixed distillation (GKD) on the `dk demo llm` models: quality and cost.

For each λ (the share of steps whose completions the student samples) and each divergence, a
student (1 × 64 byte-level GPT-2) is distilled from the demo's teacher (3 × 128, loaded from
the demo's cache, or trained once and cached) on prompt/completion windows of the standard
library's source: 64 bytes, the first 32 the prompt, the loss on the 32 completion bytes. The
recipe is the demo's (250 steps of 16 windows, AdamW with a warm-up and cosine decay from 3e-3,
clipping at 1, T = 1, alpha = 0.9). Reported per run:

- held-out bits per byte (every byte of 32 KiB of unseen files, as the demo reports it);
- the teacher's negative log-likelihood, in bits per byte, of text the student writes itself:
  ``--sample-prompts`` held-out prompts of 32 bytes, each continued by 32 bytes sampled from the
  student at temperature 1 (the models see 64 positions, so a sample is at most 32 bytes);
- the share of the training time spent generating, and generation tokens per second.

With ``--warm-start`` every distilled student starts from the data-only student (trained
first for the same steps), as GKD distils from a supervised fine-tuned student; without it they
start from scratch, as in the demo. The teacher must be in the demo's cache (``dk demo llm``).

    python benchmarks/on_policy.py --threads 1 --warm-start --sample-prompts 256 --seed 0 --output warm0.json
    python benchmarks/on_policy.py --threads 1 --output scratch.json
    python benchmarks/on_policy.py --quick           # seconds (after dk demo llm --quick): the plumbing only
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

import darkknowledge as dk
from darkknowledge.llm import CausalLMTask, GenerateSampler, OnPolicyTask
from darkknowledge.llm.data import WindowDataset, sequential_windows, stdlib_corpus
from darkknowledge.llm.demo import QUICK, Recipe, build_gpt2, cached_teacher, evaluate_heldout
from darkknowledge.llm.on_policy import sampled_batch, split_prompts

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
FRACTIONS = (0.0, 0.5, 1.0)


class TimedSampler:
    """A Sampler that times another and counts the tokens it generates."""

    def __init__(self, sampler) -> None:
        self.sampler, self.seconds, self.tokens, self.calls = sampler, 0.0, 0, 0

    def __call__(self, model, prompt_ids, prompt_mask, *, max_new_tokens, seeds):
        began = time.perf_counter()
        out = self.sampler(
            model, prompt_ids, prompt_mask, max_new_tokens=max_new_tokens, seeds=seeds
        )
        self.seconds += time.perf_counter() - began
        self.tokens += int(out.mask.sum())
        self.calls += 1
        return out


def train_student(
    recipe, corpus, teacher, *, fraction, divergence, prompt_length, seed, start=None
):
    """Distil a student (fresh, or from the weights ``start``); returns it and its timings."""
    windows = WindowDataset(
        corpus.train, block_size=recipe.block_size, prompt_length=prompt_length, seed=seed
    )
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(windows, batch_size=recipe.batch_size, shuffle=True, generator=generator)
    sampler = TimedSampler(GenerateSampler(temperature=1.0))
    task = (
        OnPolicyTask(fraction=fraction, sampler=sampler, seed=seed)
        if teacher is not None
        else CausalLMTask()
    )
    student = build_gpt2(recipe.student_layers, recipe.student_width, recipe, seed=recipe.seed + 1)
    if start is not None:
        student.load_state_dict(start)
    steps = recipe.student_steps
    distiller = dk.Distiller(
        student, teacher, loader, task=task, temperature=recipe.temperature, alpha=recipe.alpha,
        loss_options={"divergence": divergence}, max_steps=steps, max_grad_norm=1.0,
        learning_rate=dk.schedules.warmup_cosine(
            recipe.learning_rate, steps // 10, steps, end=recipe.learning_rate / 10
        ),
        seed=seed, progress=False,
    )  # fmt: skip
    began = time.perf_counter()
    distiller.fit()
    seconds = time.perf_counter() - began
    return student, {
        "train_seconds": seconds,
        "generate_seconds": sampler.seconds,
        "generated_tokens": sampler.tokens,
        "sampled_batches": sampler.calls,
    }


@torch.no_grad()
def teacher_nll_of_samples(student, teacher, corpus, recipe, *, prompts, prompt_length, seed):
    """Bits per byte the teacher assigns to bytes the student samples after held-out prompts."""
    windows = corpus.heldout[: prompts * recipe.block_size].long().view(prompts, recipe.block_size)
    batch = {"input_ids": windows, "prompt_lengths": torch.full((prompts,), prompt_length)}
    prompt_ids, prompt_mask, lengths = split_prompts(batch)
    seeds = torch.arange(prompts) + 1_000_003 * seed
    completions = GenerateSampler(temperature=1.0)(
        student, prompt_ids, prompt_mask, max_new_tokens=int(lengths.max()), seeds=seeds
    )
    sample = sampled_batch(prompt_ids, prompt_mask, completions)
    sums = CausalLMTask().eval_sums(teacher.eval(), sample)  # completion tokens only
    return {
        "sample_nll_bits": sums["loss"] / sums["count"] / math.log(2),
        "sample_bytes": int(sums["count"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny models, a few steps")
    parser.add_argument("--fractions", type=float, nargs="+", default=list(FRACTIONS))
    parser.add_argument("--divergences", nargs="+", default=list(DIVERGENCES))
    parser.add_argument(
        "--steps", type=int, default=None, help="student steps (default: the demo's)"
    )
    parser.add_argument("--prompt-length", type=int, default=None, help="default: half a window")
    parser.add_argument("--sample-prompts", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--warm-start", action="store_true",
        help="GKD's protocol: every distilled student starts from the data-only student (trained "
        "first, the supervised fine-tuning of the paper) instead of from scratch",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--cache-dir", default=os.environ.get("DK_CACHE_DIR", "~/.cache/darkknowledge")
    )
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    parser.add_argument(
        "--table", nargs="+", metavar="JSON", help="print the Markdown table of reports"
    )
    args = parser.parse_args()
    if args.table:
        print(table([json.loads(Path(path).read_text()) for path in args.table]))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = QUICK if args.quick else Recipe()
    if args.steps is not None:
        recipe = Recipe(**{**recipe.__dict__, "student_steps": args.steps})
    prompt_length = args.prompt_length or recipe.block_size // 2
    corpus = stdlib_corpus(train_bytes=recipe.train_bytes, heldout_bytes=recipe.heldout_bytes)
    eval_data = sequential_windows(
        corpus.heldout, block_size=recipe.block_size, batch_size=4 * recipe.batch_size
    )

    def fit(model, teacher, steps, eval_every):
        raise SystemExit(
            "the demo's teacher is not cached: run `dk demo llm` first (`dk demo llm --quick` for "
            "--quick), which trains and caches it"
        )

    cache = Path(os.path.expanduser(args.cache_dir))
    teacher, info = cached_teacher(recipe, corpus.digest, cache, fit, print)
    teacher.eval()
    rows = [{"model": "teacher", **evaluate_heldout(teacher, eval_data), **teacher_nll_of_samples(
        teacher, teacher, corpus, recipe, prompts=args.sample_prompts, prompt_length=prompt_length, seed=args.seed)}]  # fmt: skip
    runs = [("data only", None, None)] + [
        (f"λ={fraction:g} {divergence}", fraction, divergence)
        for divergence in args.divergences
        for fraction in args.fractions
    ]
    start = None
    for name, fraction, divergence in runs:
        load = os.getloadavg()
        student, timing = train_student(
            recipe, corpus, None if fraction is None else teacher, fraction=fraction or 0.0,
            divergence=divergence or "forward_kl", prompt_length=prompt_length, seed=args.seed,
            start=start,
        )  # fmt: skip
        if fraction is None and args.warm_start:  # the data-only student: the others' start
            start = {k: v.detach().clone() for k, v in student.state_dict().items()}
        row = {
            "model": name, "fraction": fraction, "divergence": divergence,
            **evaluate_heldout(student, eval_data), **timing,
            **teacher_nll_of_samples(student, teacher, corpus, recipe, prompts=args.sample_prompts,
                                     prompt_length=prompt_length, seed=args.seed),
            "load_before": load, "load_after": os.getloadavg(),
        }  # fmt: skip
        rows.append(row)
        print(_line(row), flush=True)
    report = {
        "recipe": recipe.__dict__, "prompt_length": prompt_length, "warm_start": args.warm_start, "teacher_cache": info.get("cache_path"),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
        "machine": platform.machine(), "cpus": os.cpu_count(), "rows": rows,
    }  # fmt: skip
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=1))
        print(f"results written to {args.output}")


def table(reports: list[dict]) -> str:
    """A Markdown table of one or more reports (seeds): each figure is the mean over the reports
    and, with several, its range ``[min, max]``."""
    names = [row["model"] for row in reports[0]["rows"]]
    columns = (
        ("held-out bits/byte", lambda r: r["bits_per_byte"], "{:.3f}"),
        ("teacher NLL of the samples, bits/byte", lambda r: r["sample_nll_bits"], "{:.3f}"),
        ("train s", lambda r: r.get("train_seconds"), "{:.0f}"),
        ("generating, % of train time", lambda r: _share(r), "{:.0f}"),
        ("generated tokens/s", lambda r: _speed(r), "{:,.0f}"),
    )
    lines = [
        "| run | " + " | ".join(c[0] for c in columns) + " |",
        "| --- |" + " ---: |" * len(columns),
    ]
    for index, name in enumerate(names):
        cells = []
        for _, read, form in columns:
            values = [read(report["rows"][index]) for report in reports]
            if any(v is None for v in values):
                cells.append("")
                continue
            mean = sum(values) / len(values)
            spread = (
                f" [{form.format(min(values))}, {form.format(max(values))}]"
                if len(values) > 1
                else ""
            )
            cells.append(form.format(mean) + spread)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _share(row) -> float | None:
    if not row.get("train_seconds"):
        return None
    return 100 * row["generate_seconds"] / row["train_seconds"] if row["generate_seconds"] else None


def _speed(row) -> float | None:
    return (
        row["generated_tokens"] / row["generate_seconds"] if row.get("generate_seconds") else None
    )


def _line(row) -> str:
    share = row["generate_seconds"] / row["train_seconds"] if row.get("train_seconds") else 0.0
    speed = (
        row["generated_tokens"] / row["generate_seconds"] if row.get("generate_seconds") else 0.0
    )
    return (
        f"{row['model']:>24}: held-out {row['bits_per_byte']:.3f} bits/byte, teacher NLL of "
        f"samples {row['sample_nll_bits']:.3f} bits/byte, train {row['train_seconds']:.0f} s, "
        f"generating {100 * share:.0f}% at {speed:,.0f} tokens/s (load {row['load_before'][0]:.1f})"
    )


if __name__ == "__main__":
    main()
