"""Curriculum temperature distillation (CTKD; Li et al., AAAI 2023).

The temperature is learned *adversarially*: the student's optimizer updates it, but through a
gradient-reversal layer, so where the student descends the distillation loss the temperature
ascends it, and the task gets harder as training goes on. The strength of the reversal,
lambda, rises from 0 to ``lambda_max`` along a cosine curriculum, so the temperature starts
fixed at ``initial`` and is let loose gradually.

    tau = minimum + t_range · sigmoid(theta),   tau in (minimum, minimum + t_range)

theta starts at ``logit((initial - minimum) / t_range)``, so tau starts at ``initial``. The
global version learns one theta; the per-sample version predicts theta for each position from
the (detached) teacher and student logits with a small MLP.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .losses import _checks
from .schedules import cosine

__all__ = ["GradientReversal", "LearnableTemperature", "grad_reverse"]


class GradientReversal(torch.autograd.Function):
    """Identity in the forward pass; multiplies the gradient by ``-strength`` in the backward.

    ``strength`` (lambda) is a Python float, not a tensor: it is a schedule value, not learned.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, strength: float) -> torch.Tensor:
        ctx.strength = strength
        # view_as: a new autograd node on the same data, so backward below runs instead of
        # the gradient flowing straight through.
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad_output * -ctx.strength, None


def grad_reverse(tensor: torch.Tensor, strength: float) -> torch.Tensor:
    """``tensor`` unchanged, with its gradient multiplied by ``-strength`` on the way back.

    >>> x = torch.ones(3, requires_grad=True)
    >>> grad_reverse(x, 0.5).sum().backward()
    >>> x.grad
    tensor([-0.5000, -0.5000, -0.5000])
    """
    return GradientReversal.apply(tensor, float(strength))


class LearnableTemperature(nn.Module):
    """A temperature the student's optimizer learns adversarially (CTKD).

    Args:
        initial: the temperature at the start, strictly inside ``(minimum, minimum + t_range)``.
        minimum: the lowest temperature (CTKD uses 1).
        t_range: the width of the allowed range (CTKD: 1 + 19 gives temperatures in (1, 20)).
        lambda_max: the final strength of the gradient reversal (CTKD: 1).
        curriculum_steps: optimizer steps over which lambda rises from 0 to ``lambda_max``
            along a half cosine; it stays at ``lambda_max`` afterwards.
        per_sample: predict one temperature per position from the logits instead of one global.
        num_classes: C, the logits' last dimension; required with ``per_sample=True``.
        hidden: width of the per-sample MLP ``2C -> hidden -> 1``.

    ``forward(student_logits=None, teacher_logits=None, step=0)`` returns a 0-dim tensor (global)
    or a ``(...)`` tensor for logits ``(..., C)`` (per sample). Add its parameters to the
    student's optimizer; pass it as ``dk.DistillationLoss(temperature=...)``, which calls it with
    the logits and the step.

    >>> import torch, darkknowledge as dk
    >>> temperature = dk.LearnableTemperature(initial=4.0, curriculum_steps=100)
    >>> round(float(temperature(step=0).detach()), 4), temperature.current_lambda(50)
    (4.0, 0.5)
    >>> loss_fn = dk.DistillationLoss(temperature=temperature, alpha=0.9)
    >>> loss = loss_fn(torch.randn(2, 5), torch.randn(2, 5), torch.tensor([0, 1]), step=10)
    """

    def __init__(
        self,
        initial: float = 4.0,
        *,
        minimum: float = 1.0,
        t_range: float = 19.0,
        lambda_max: float = 1.0,
        curriculum_steps: int = 1000,
        per_sample: bool = False,
        num_classes: int | None = None,
        hidden: int = 64,
    ) -> None:
        super().__init__()
        self.minimum = _checks.check_positive(minimum, "minimum")
        self.t_range = _checks.check_positive(t_range, "t_range")
        initial = _checks.check_positive(initial, "initial")
        upper = self.minimum + self.t_range
        if not self.minimum < initial < upper:
            raise ValueError(
                f"initial must be strictly inside (minimum, minimum + t_range) = "
                f"({self.minimum:g}, {upper:g}), got initial={initial!r}"
            )
        if isinstance(lambda_max, bool) or not isinstance(lambda_max, int | float):
            raise TypeError(f"lambda_max must be a number >= 0, got {type(lambda_max).__name__}")
        if not (math.isfinite(lambda_max) and lambda_max >= 0):
            raise ValueError(f"lambda_max must be finite and >= 0, got lambda_max={lambda_max!r}")
        self.curriculum = cosine(
            0.0, float(lambda_max), _checks.check_count(curriculum_steps, "curriculum_steps")
        )
        self.per_sample = bool(per_sample)
        self.num_classes = num_classes

        fraction = (initial - self.minimum) / self.t_range
        theta0 = math.log(fraction) - math.log1p(-fraction)  # logit: sigmoid(theta0) = fraction
        if self.per_sample:
            if num_classes is None:
                raise ValueError("per_sample=True needs num_classes, the logits' last dimension")
            _checks.check_count(num_classes, "num_classes")
            _checks.check_count(hidden, "hidden")
            self.mlp = nn.Sequential(
                nn.Linear(2 * num_classes, hidden), nn.ReLU(), nn.Linear(hidden, 1)
            )
            # Zero output weights and bias theta0: every position starts exactly at `initial`,
            # and the output layer's weights still receive gradients from the first step.
            nn.init.zeros_(self.mlp[-1].weight)
            nn.init.constant_(self.mlp[-1].bias, theta0)
        else:
            self.theta = nn.Parameter(torch.tensor(theta0, dtype=torch.float32))

    def current_lambda(self, step: int) -> float:
        """The gradient-reversal strength at ``step``: ``lambda_max · (1 - cos(π r)) / 2``."""
        return self.curriculum(step)

    def forward(
        self,
        student_logits: torch.Tensor | None = None,
        teacher_logits: torch.Tensor | None = None,
        step: int = 0,
    ) -> torch.Tensor:
        strength = self.current_lambda(step)
        if self.per_sample:
            theta = self._predict_theta(student_logits, teacher_logits)  # (...)
        else:
            theta = self.theta  # ()
        temperature = self.minimum + self.t_range * torch.sigmoid(theta)
        return grad_reverse(temperature, strength)

    def _predict_theta(
        self, student_logits: torch.Tensor | None, teacher_logits: torch.Tensor | None
    ) -> torch.Tensor:
        if student_logits is None or teacher_logits is None:
            raise ValueError(
                "a per-sample LearnableTemperature needs student_logits and teacher_logits, got None"
            )
        if (
            student_logits.shape != teacher_logits.shape
            or student_logits.shape[-1] != self.num_classes
        ):
            raise ValueError(
                f"student_logits and teacher_logits must both have shape (..., {self.num_classes}), "
                f"got {tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
            )
        weight = self.mlp[0].weight
        # Detached: the temperature reads the logits, it does not train the networks that made them.
        features = torch.cat(
            [teacher_logits.detach(), student_logits.detach()], dim=-1
        )  # (..., 2C)
        features = features.to(weight.dtype).clamp_min(-1e4)  # masked -inf logits stay finite
        # float(): under autocast the MLP answers in bf16; the temperature itself stays float32.
        return self.mlp(features).squeeze(-1).float()  # (...)

    def extra_repr(self) -> str:
        kind = f"per_sample, num_classes={self.num_classes}" if self.per_sample else "global"
        return (
            f"{kind}, range=({self.minimum:g}, {self.minimum + self.t_range:g}), "
            f"lambda={self.curriculum.end:g} after {self.curriculum.steps} steps"
        )
