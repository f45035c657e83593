"""The classifier demo: does dark knowledge help a small student that sees few labels?

Set-up (the setting where Hinton et al. found the gain large: a small student, few labels):

- data: the embedded digits (1797 8x8 images), a fixed stratified 75/25 train/test split;
- teacher: MLP 64-512-512-10 trained on every label of the training split;
- student: MLP 64-16-10, trained with the same optimizer and steps in three ways, per seed:
  ``labels``: from the labelled part only (``labelled_fraction`` of the training split);
  ``kd``: the transfer set is the whole training split: soft targets of the teacher on every
  image, labels on the same labelled part (see :class:`TransferSetTask`); fixed T;
  ``kd_learnable_t``: the same with a :class:`darkknowledge.LearnableTemperature`.

The omitted-class experiment (``--omit-class c``) lives in :mod:`darkknowledge.demo.omit`.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

from ..data import split_digits, stratified_split
from ..models import MLP, count_parameters
from ..temperature import LearnableTemperature
from ..train import Distiller
from .transfer import TransferSetTask

IGNORE = -100
METHODS = {
    "labels": "student, labels only",
    "kd": "student, KD (fixed T)",
    "kd_learnable_t": "student, KD + learnable T",
}


@dataclass(frozen=True)
class DemoSettings:
    seeds: tuple[int, ...] = (0, 1, 2)
    labelled_fraction: float = 0.05
    teacher_hidden: tuple[int, ...] = (512, 512)
    student_hidden: tuple[int, ...] = (16,)
    teacher_steps: int = 500
    student_steps: int = 1500
    batch_size: int = 64
    learning_rate: float = 3e-3
    temperature: float = 4.0
    alpha: float = 0.9
    eval_every: int = 50
    log_every: int = 10
    test_fraction: float = 0.25
    split_seed: int = 0


QUICK = DemoSettings(
    seeds=(0,), teacher_hidden=(64,), teacher_steps=40, student_steps=30, eval_every=10, log_every=5
)


@dataclass
class DemoData:
    train_x: torch.Tensor  # (N, 64)
    train_y: torch.Tensor  # (N,)
    test_x: torch.Tensor
    test_y: torch.Tensor


def load_data(settings: DemoSettings) -> DemoData:
    return DemoData(*split_digits(settings.test_fraction, settings.split_seed))


def loader(
    inputs: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int, shuffle: bool = True
) -> DataLoader:
    """Shuffled full training batches (a last batch of 3 would be a noisy step), or in order."""
    generator = torch.Generator().manual_seed(seed)
    batch_size = min(batch_size, len(labels))
    return DataLoader(
        TensorDataset(inputs, labels),
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        drop_last=shuffle,
    )


def distiller(
    student,
    teacher,
    train_loader,
    test_loader,
    settings: DemoSettings,
    *,
    seed: int,
    max_steps: int,
    **kwargs,
):
    """A Distiller with the demo's shared optimisation settings."""
    return Distiller(
        student, teacher, train_loader,
        learning_rate=settings.learning_rate, max_steps=max_steps, eval_data=test_loader,
        eval_every=settings.eval_every, log_every=settings.log_every, seed=seed, progress=False, **kwargs,
    )  # fmt: skip


def train_teacher(data: DemoData, settings: DemoSettings) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The teacher, trained on every label of the training split; returns it and its summary."""
    torch.manual_seed(settings.split_seed)
    teacher = MLP(data.train_x.shape[1], 10, settings.teacher_hidden)
    test = loader(data.test_x, data.test_y, 512, 0, shuffle=False)
    start = time.perf_counter()
    run = distiller(
        teacher, None, loader(data.train_x, data.train_y, settings.batch_size, 0), test, settings,
        seed=settings.split_seed, max_steps=settings.teacher_steps,
    )  # fmt: skip
    result = run.fit()
    seconds = time.perf_counter() - start
    summary = {
        "accuracy": result.final["eval_accuracy"],
        "parameters": count_parameters(teacher),
        "seconds": seconds,
        "curve": _curve(result.history),
    }
    return teacher, summary


def labelled_split(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Indices of the labelled part (stratified, drawn with ``seed``)."""
    if fraction >= 1:
        return torch.arange(len(labels))
    return stratified_split(labels, fraction, seed)[1]


def train_student(
    method: str,
    teacher: torch.nn.Module,
    data: DemoData,
    settings: DemoSettings,
    seed: int,
    *,
    train_x: torch.Tensor | None = None,
    train_y: torch.Tensor | None = None,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train one student by ``method`` (a key of :data:`METHODS`) on the transfer set
    ``(train_x, train_y)`` (default: the training split, unlabelled rows marked ``-100``)."""
    train_x = data.train_x if train_x is None else train_x
    if train_y is None:
        labelled = labelled_split(data.train_y, settings.labelled_fraction, seed)
        train_y = torch.full_like(data.train_y, IGNORE)
        train_y[labelled] = data.train_y[labelled]
    known = train_y != IGNORE
    torch.manual_seed(1000 + seed)  # the student's initial weights depend on the seed only
    student = MLP(train_x.shape[1], 10, settings.student_hidden)
    test = loader(data.test_x, data.test_y, 512, 0, shuffle=False)
    if method == "labels":
        run = distiller(
            student, None, loader(train_x[known], train_y[known], settings.batch_size, seed), test, settings,
            seed=seed, max_steps=settings.student_steps,
        )  # fmt: skip
    elif method in ("kd", "kd_learnable_t"):
        temperature: Any = settings.temperature
        if method == "kd_learnable_t":
            temperature = LearnableTemperature(
                settings.temperature, curriculum_steps=settings.student_steps
            )
        run = distiller(
            student, teacher, loader(train_x, train_y, settings.batch_size, seed), test, settings,
            seed=seed, max_steps=settings.student_steps, task=TransferSetTask(ignore_index=IGNORE),
            temperature=temperature, alpha=settings.alpha,
        )  # fmt: skip
    else:
        raise ValueError(f"unknown method {method!r}; valid methods are: {', '.join(METHODS)}")
    start = time.perf_counter()
    result = run.fit()
    summary = {
        "accuracy": result.final["eval_accuracy"],
        "seconds": time.perf_counter() - start,
        "labelled": int(known.sum()),
        "transfer": len(train_x) if method != "labels" else int(known.sum()),
        "curve": _curve(result.history),
        "gradient_balance": _series(result.history, "soft_grad_norm", "hard_grad_norm"),
        "temperature": _series(result.history, "temperature"),
    }
    return student, summary


def _curve(history: list[dict]) -> dict[str, list]:
    evals = [r for r in history if r["kind"] == "eval"]
    return {"step": [r["step"] for r in evals], "accuracy": [r["accuracy"] for r in evals]}


def _series(history: list[dict], *names: str) -> dict[str, list]:
    rows = [r for r in history if r["kind"] == "train" and all(r.get(n) is not None for n in names)]
    return {"step": [r["step"] for r in rows], **{n: [float(r[n]) for r in rows] for n in names}}


def run_classifier_demo(
    settings: DemoSettings, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Train the teacher and every (method, seed) student; return the results (JSON-ready)."""
    start = time.perf_counter()
    data = load_data(settings)
    log(f"digits: {len(data.train_y)} training images, {len(data.test_y)} test images")
    teacher, teacher_summary = train_teacher(data, settings)
    log(f"teacher MLP {_arch(settings.teacher_hidden)}: test accuracy {teacher_summary['accuracy']:.4f} "
        f"({teacher_summary['seconds']:.1f} s)")  # fmt: skip
    runs: dict[str, list[dict[str, Any]]] = {method: [] for method in METHODS}
    for seed in settings.seeds:
        for method in METHODS:
            _, summary = train_student(method, teacher, data, settings, seed)
            runs[method].append(summary)
            log(
                f"  seed {seed} {METHODS[method]:<28} accuracy {summary['accuracy']:.4f} ({summary['seconds']:.1f} s)"
            )
    return {
        "settings": asdict(settings),
        "teacher": teacher_summary,
        "student_parameters": count_parameters(MLP(64, 10, settings.student_hidden)),
        "methods": {
            method: _aggregate(runs[method], teacher_summary["accuracy"], runs["labels"])
            for method in METHODS
        },
        "runs": runs,
        "seconds": time.perf_counter() - start,
    }


def _aggregate(runs: list[dict], teacher_accuracy: float, baseline: list[dict]) -> dict[str, Any]:
    accuracies = [r["accuracy"] for r in runs]
    base = statistics.fmean(r["accuracy"] for r in baseline)
    mean = statistics.fmean(accuracies)
    gap = teacher_accuracy - base
    return {
        "accuracy_mean": mean,
        "accuracy_std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
        "accuracies": accuracies,
        # (acc_method - acc_base) / (acc_teacher - acc_base); undefined when the teacher is no better.
        "gap_closed": (mean - base) / gap if gap > 0 else None,
        "seconds": sum(r["seconds"] for r in runs),
    }


def _arch(hidden: tuple[int, ...]) -> str:
    return "-".join(str(n) for n in (64, *hidden, 10))


def quick(settings: DemoSettings = QUICK, **changes: Any) -> DemoSettings:
    return replace(settings, **changes)
