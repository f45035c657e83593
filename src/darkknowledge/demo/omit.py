"""Hinton et al. (2015), section 3: a transfer set with no example of one class.

The teacher saw every class. The student is distilled on a transfer set from which every
example of class ``c`` was removed (soft targets and labels on all the rest, as in the paper). It can still learn
about ``c`` from the teacher's soft targets on the other digits, but its output bias for ``c``
is too low. The paper raises that bias by hand (by 3.5, chosen on the test set); here the raise
``delta`` is chosen on held-out *inputs* of the training split (no labels, never the test
split): the smallest one that makes the student predict ``c`` for the class's prior share,
1 / number of classes, of them (:func:`darkknowledge.demo.transfer.bias_for_share`).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from typing import Any

import torch

from ..data import stratified_split
from .classifier import DemoData, DemoSettings, load_data, train_student, train_teacher
from .transfer import bias_for_share

VALIDATION_FRACTION = 0.2
NUM_CLASSES = 10


def class_accuracies(
    logits: torch.Tensor, labels: torch.Tensor, target_class: int
) -> dict[str, float]:
    """Overall accuracy and accuracy on ``target_class``.

    >>> class_accuracies(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([0, 1]), 1)
    {'overall': 0.5, 'class': 0.0}
    """
    correct = logits.argmax(dim=1) == labels
    members = labels == target_class
    return {
        "overall": float(correct.float().mean()),
        "class": float(correct[members].float().mean()),
    }


@torch.no_grad()
def _logits(model: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """``(N, C)`` logits on the CPU, wherever the Distiller placed the model (CPU or GPU)."""
    model.eval()
    device = next(model.parameters()).device
    return model(inputs.to(device)).float().cpu()


def run_omit_class(
    omit: int, settings: DemoSettings, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Teacher on all classes; per seed a KD student on the transfer set without ``omit``;
    test accuracies (overall and on ``omit``) before and after the bias correction."""
    if not 0 <= omit < NUM_CLASSES:
        raise ValueError(f"omit_class must be a digit class in 0..{NUM_CLASSES - 1}, got {omit!r}")
    start = time.perf_counter()
    data = load_data(settings)
    teacher, teacher_summary = train_teacher(data, settings)
    teacher_acc = class_accuracies(_logits(teacher, data.test_x), data.test_y, omit)
    log(
        f"teacher (all classes): test accuracy {teacher_acc['overall']:.4f}, on class {omit}: {teacher_acc['class']:.4f}"
    )
    # Held-out inputs for the bias search come from the training split, never the test split.
    pool, validation = stratified_split(data.train_y, VALIDATION_FRACTION, settings.split_seed)
    keep = pool[data.train_y[pool] != omit]
    transfer = DemoData(data.train_x[keep], data.train_y[keep], data.test_x, data.test_y)
    log(
        f"transfer set: {len(keep)} images, none of class {omit}; bias search on {len(validation)} held-out inputs"
    )
    runs = []
    for seed in settings.seeds:
        # As in the paper, every transfer example keeps its label too (labelled_fraction = 1).
        student, summary = train_student(
            "kd", teacher, transfer, replace(settings, labelled_fraction=1.0), seed
        )
        delta = bias_for_share(_logits(student, data.train_x[validation]), omit, 1.0 / NUM_CLASSES)
        test_logits = _logits(student, data.test_x)  # (N, C)
        before = class_accuracies(test_logits, data.test_y, omit)
        shifted = test_logits.clone()
        shifted[:, omit] += delta  # the same as raising the output layer's bias for `omit`
        after = class_accuracies(shifted, data.test_y, omit)
        runs.append(
            {
                "seed": seed,
                "bias_delta": delta,
                "before": before,
                "after": after,
                "seconds": summary["seconds"],
            }
        )
        log(f"  seed {seed}: class {omit} {before['class']:.4f} -> {after['class']:.4f}, "
            f"overall {before['overall']:.4f} -> {after['overall']:.4f} (bias +{delta:.2f})")  # fmt: skip

    def mean(part: str, key: str) -> float:
        return statistics.fmean(run[part][key] for run in runs)

    return {
        "omit_class": omit,
        "settings": asdict(settings),
        "teacher": {**teacher_acc, "seconds": teacher_summary["seconds"]},
        "transfer_size": len(keep),
        "validation_size": len(validation),
        "runs": runs,
        "before": {"overall": mean("before", "overall"), "class": mean("before", "class")},
        "after": {"overall": mean("after", "overall"), "class": mean("after", "class")},
        "bias_delta_mean": statistics.fmean(run["bias_delta"] for run in runs),
        "seconds": time.perf_counter() - start,
    }
