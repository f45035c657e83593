"""The stateful face of the distillation loss: :class:`DistillationLoss`, an ``nn.Module``.

It holds what changes over training (a temperature schedule or a learnable temperature module,
an alpha schedule) and the fixed options, and calls the pure :func:`~.kd.kd_loss` at each step.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

from .. import schedules
from . import _checks
from .kd import KDLoss, kd_loss


class DistillationLoss(torch.nn.Module):
    """``nn.Module`` over :func:`kd_loss`. Temperature and alpha may be schedules.

    ``temperature`` is a float, a schedule ``step -> float``, or a module returning a tensor
    temperature (``LearnableTemperature``); ``alpha`` a float or a schedule. Call with
    ``step=`` to evaluate schedules; other keyword arguments go to :func:`kd_loss`.

    >>> import torch, darkknowledge as dk
    >>> loss_fn = dk.DistillationLoss(temperature=dk.schedules.linear(8.0, 2.0, 100), alpha=0.9)
    >>> out = loss_fn(torch.randn(2, 5), torch.randn(2, 5), torch.tensor([0, 1]), step=50)
    >>> out.total.shape
    torch.Size([])
    """

    def __init__(
        self,
        *,
        temperature: float | Callable[[int], float] | torch.nn.Module,
        alpha: float | Callable[[int], float],
        **kd_options: Any,
    ) -> None:
        super().__init__()
        # Constants are validated now, schedules when evaluated (by kd_loss at every call).
        if not callable(temperature):
            _checks.check_temperature(temperature)
        if not callable(alpha):
            _checks.check_unit_interval(alpha, "alpha")
        unknown = sorted(set(kd_options) - _KD_OPTIONS)
        if unknown:
            raise TypeError(
                f"DistillationLoss got unknown kd_loss options {unknown}; valid options are: "
                f"{', '.join(sorted(_KD_OPTIONS))}"
            )
        if "divergence" in kd_options:
            _checks.check_divergence_name(kd_options["divergence"])
        if isinstance(temperature, torch.nn.Module):
            self.temperature_module = temperature
            self._temperature = None
        else:
            self.temperature_module = None
            self._temperature = temperature
        self.alpha = alpha
        self.kd_options = kd_options

    def current_temperature(
        self,
        step: int = 0,
        student_logits: torch.Tensor | None = None,
        teacher_logits: torch.Tensor | None = None,
    ) -> float | torch.Tensor:
        """The temperature in force at ``step``: a float, or a tensor for a learned one."""
        if self.temperature_module is not None:
            return self.temperature_module(
                student_logits=student_logits, teacher_logits=teacher_logits, step=step
            )
        return schedules.value_at(self._temperature, step)

    def current_alpha(self, step: int = 0) -> float:
        return schedules.value_at(self.alpha, step)

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        step: int = 0,
        **overrides: Any,
    ) -> KDLoss:
        temperature = self.current_temperature(step, student_logits, teacher_logits)
        options = {**self.kd_options, **overrides}
        return kd_loss(
            student_logits,
            teacher_logits,
            labels,
            temperature=temperature,
            alpha=self.current_alpha(step),
            **options,
        )


_KD_OPTIONS = frozenset(inspect.signature(kd_loss).parameters) - {
    "student_logits",
    "teacher_logits",
    "labels",
    "temperature",
    "alpha",
}
