"""Teacher-assistant chains (Mirzadeh et al., "Improved Knowledge Distillation via Teacher
Assistant", AAAI 2020).

A large gap between teacher and student hurts distillation; an intermediate "assistant" bridges
it. The chain ``teacher -> assistant_1 -> ... -> student`` is a sequence of ordinary
distillations: stage k distils its teacher into ``students[k]``, then the trained
``students[k]`` is frozen and becomes stage k+1's teacher.

>>> import torch
>>> from torch import nn
>>> teacher, assistant, student = nn.Linear(4, 3), nn.Linear(4, 3), nn.Linear(4, 3)
>>> seen = []
>>> def fit(index, student, teacher):  # a stand-in for dk.Distiller(...).fit()
...     seen.append((index, teacher))
...     return {"stage": index}
>>> stages = distill_chain(teacher, [assistant, student], fit)
>>> seen[1][1] is assistant, assistant.training, stages[1].result
(True, False, {'stage': 1})
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn


@dataclass(frozen=True)
class Stage:
    """One link of the chain: who taught whom, and what the training returned."""

    index: int
    teacher: nn.Module
    student: nn.Module
    result: Any


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode and no gradients: a trained student ready to teach."""
    model.eval()
    model.requires_grad_(False)
    return model


def distill_chain(
    teacher: nn.Module,
    students: Sequence[nn.Module],
    fit: Callable[[int, nn.Module, nn.Module], Any],
) -> list[Stage]:
    """Train ``students`` in turn, each taught by the previous one (the first by ``teacher``).

    Args:
        teacher: the trained teacher; frozen here.
        students: the assistants, then the final student, in order.
        fit: ``fit(index, student, teacher) -> result`` trains ``student`` in place, e.g. by
            building a :class:`darkknowledge.Distiller` and calling ``.fit()``.

    Returns one :class:`Stage` per student. Every trained student is frozen (eval mode,
    ``requires_grad=False``), the last one included.
    """
    if not students:
        raise ValueError("students must list at least one model (the final student), got none")
    stages = []
    current = freeze(teacher)
    for index, student in enumerate(students):
        if student is current:
            raise ValueError(
                f"students[{index}] is its own teacher; give each stage a separate model"
            )
        result = fit(index, student, current)
        stages.append(Stage(index, current, student, result))
        current = freeze(student)
    return stages
