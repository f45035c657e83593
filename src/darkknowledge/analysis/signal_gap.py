"""The signal gap: why the soft loss is multiplied by T^2.

With ``p = softmax(z_t / T)`` and ``q = softmax(z_s / T)``, the gradient of KL(p ‖ q) with
respect to the student logits is ``(q - p) / T``. For zero-mean logits and T large compared with
the logits, ``softmax(z / T) ≈ (1 + z / T) / N``, so

    ∂KL/∂z_s ≈ (z_s - z_t) / (N T^2)            (Hinton et al., 2015, eq. 2-4)

The unscaled soft loss therefore pushes the student ~T^2 times more weakly than at T = 1, and a
mix ``(1 - alpha)·hard + alpha·soft`` lets the hard term drown it. Multiplying the soft loss by
T^2 restores the gradient's size. This module measures both, with autograd through the
library's own losses (:func:`darkknowledge.divergence` unscaled, the soft term of
:func:`darkknowledge.kd_loss` scaled), not a re-implementation.

The gradient norm is the Frobenius norm of ∂L/∂z_s for the batch-mean loss L over a
``(batch_size, classes)`` matrix of student logits.

Command line: ``dk signal-gap`` (:mod:`darkknowledge.commands.signal_gap`). This module is pure:
math only, no argparse, no printing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from ..losses import divergence, kd_loss

__all__ = ["GradientNormSweep", "SignalGap", "gradient_norm_sweep", "signal_gap"]


class SignalGap(NamedTuple):
    """The soft loss and the size of its gradient at one temperature.

    ``soft_loss`` is KL(p ‖ q), batch-mean, before any T^2; ``grad_norm`` is ||∂soft_loss/∂z_s||.
    ``scaled_*`` are the same for ``T^2 · soft_loss`` (the soft term of ``kd_loss``, alpha = 1);
    ``ratio = scaled_grad_norm / grad_norm`` (T^2, up to rounding).
    """

    temperature: float
    soft_loss: float
    grad_norm: float
    scaled_loss: float
    scaled_grad_norm: float
    ratio: float


class GradientNormSweep(NamedTuple):
    """Gradient norms over a range of temperatures (one entry per temperature).

    ``approximation`` is the high-temperature limit ||(z_s - z_t) / (N T^2)|| of ``unscaled``.
    """

    temperatures: tuple[float, ...]
    unscaled: tuple[float, ...]
    scaled: tuple[float, ...]
    approximation: tuple[float, ...]


def _check_problem(classes: int, batch_size: int, logit_scale: float) -> None:
    if isinstance(classes, bool) or not isinstance(classes, int) or classes < 2:
        raise ValueError(f"classes must be an integer >= 2, got classes={classes!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got batch_size={batch_size!r}")
    if not (
        isinstance(logit_scale, int | float) and math.isfinite(logit_scale) and logit_scale > 0
    ):
        raise ValueError(f"logit_scale must be finite and > 0, got logit_scale={logit_scale!r}")


def _check_temperatures(temperatures: Sequence[float]) -> tuple[float, ...]:
    values = tuple(temperatures)
    if not values:
        raise ValueError("temperatures must not be empty")
    for value in values:
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value <= 0
        ):
            raise ValueError(f"temperatures must all be finite and > 0, got {value!r}")
    return tuple(float(value) for value in values)


def draw_logits(
    classes: int,
    *,
    batch_size: int = 16,
    seed: int = 0,
    logit_scale: float = 1.0,
    zero_mean: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher logits ``(batch_size, classes)``, each ``logit_scale · N(0, 1)``,
    float64, with each row's mean subtracted when ``zero_mean`` (the approximation assumes it;
    softmax itself is unchanged by the shift). Deterministic given ``seed``."""
    _check_problem(classes, batch_size, logit_scale)
    generator = torch.Generator().manual_seed(seed)
    student, teacher = logit_scale * torch.randn(
        2, batch_size, classes, generator=generator, dtype=torch.float64
    )
    if zero_mean:
        student = student - student.mean(-1, keepdim=True)
        teacher = teacher - teacher.mean(-1, keepdim=True)
    return student, teacher


def _loss_and_grad_norm(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float, *, scaled: bool
) -> tuple[float, float]:
    """The soft loss and the norm of its gradient w.r.t. the student logits.

    Unscaled: KL(p ‖ q) from :func:`divergence`. Scaled: what training optimises, the soft term
    of :func:`kd_loss` with its default T^2 factor (alpha = 1, no labels), so the measured ratio
    checks the library's scaling rather than restating it.
    """
    student = student.detach().requires_grad_(True)
    if scaled:
        loss = kd_loss(student, teacher, temperature=temperature, alpha=1.0, soft_scale="T2").total
    else:
        loss = divergence(student, teacher, kind="forward_kl", temperature=temperature)
    (grad,) = torch.autograd.grad(loss, student)
    return float(loss.detach()), float(grad.double().norm())


def signal_gap(
    classes: int = 1000,
    temperatures: Sequence[float] = (1.0, 5.0),
    seed: int = 0,
    *,
    batch_size: int = 16,
    logit_scale: float = 1.0,
    zero_mean: bool = True,
) -> list[SignalGap]:
    """Soft loss and gradient norm, without and with T^2, at each temperature.

    >>> gaps = signal_gap(classes=100, temperatures=(1, 5))
    >>> [round(gap.ratio, 3) for gap in gaps]
    [1.0, 25.0]
    >>> gaps[1].grad_norm < gaps[0].grad_norm / 10 < gaps[1].scaled_grad_norm
    True
    """
    temperatures = _check_temperatures(temperatures)
    student, teacher = draw_logits(
        classes, batch_size=batch_size, seed=seed, logit_scale=logit_scale, zero_mean=zero_mean
    )
    gaps = []
    for temperature in temperatures:
        soft_loss, grad_norm = _loss_and_grad_norm(student, teacher, temperature, scaled=False)
        scaled_loss, scaled_grad_norm = _loss_and_grad_norm(
            student, teacher, temperature, scaled=True
        )
        ratio = scaled_grad_norm / grad_norm if grad_norm > 0 else math.nan
        gaps.append(
            SignalGap(temperature, soft_loss, grad_norm, scaled_loss, scaled_grad_norm, ratio)
        )
    return gaps


def default_sweep_temperatures(count: int = 41) -> tuple[float, ...]:
    """``count`` temperatures evenly spaced in log from 1 to 100."""
    return tuple(torch.logspace(0.0, 2.0, count, dtype=torch.float64).tolist())


def gradient_norm_sweep(
    temperatures: Sequence[float] | None = None,
    classes: int = 1000,
    seed: int = 0,
    *,
    batch_size: int = 16,
    logit_scale: float = 1.0,
) -> GradientNormSweep:
    """Gradient norm of the soft loss vs temperature (default: 1 to 100, log-spaced), unscaled and
    with T^2, and the high-temperature approximation ||(z_s - z_t) / (N T^2)|| / batch_size
    (the batch mean divides each row's gradient by ``batch_size``). Logits are zero-mean.

    >>> sweep = gradient_norm_sweep(temperatures=(100.0,), classes=100)
    >>> abs(sweep.unscaled[0] / sweep.approximation[0] - 1) < 0.01
    True
    """
    temperatures = _check_temperatures(
        default_sweep_temperatures() if temperatures is None else temperatures
    )
    student, teacher = draw_logits(
        classes, batch_size=batch_size, seed=seed, logit_scale=logit_scale, zero_mean=True
    )
    difference_norm = float((student - teacher).norm())
    unscaled, scaled, approximation = [], [], []
    for temperature in temperatures:
        unscaled.append(_loss_and_grad_norm(student, teacher, temperature, scaled=False)[1])
        scaled.append(_loss_and_grad_norm(student, teacher, temperature, scaled=True)[1])
        approximation.append(difference_norm / (batch_size * classes * temperature**2))
    return GradientNormSweep(temperatures, tuple(unscaled), tuple(scaled), tuple(approximation))


def format_table(gaps: Sequence[SignalGap], *, classes: int, batch_size: int, seed: int) -> str:
    """The readable table ``dk signal-gap`` prints: for each T an unscaled column, and for
    T != 1 a T^2-scaled one; then the scaled/unscaled ratio per temperature."""
    columns: list[tuple[str, float, float]] = []  # (header, soft loss, gradient norm)
    for gap in gaps:
        columns.append((f"T={gap.temperature:g} unscaled", gap.soft_loss, gap.grad_norm))
        if gap.temperature != 1.0:
            columns.append((f"T={gap.temperature:g} scaled", gap.scaled_loss, gap.scaled_grad_norm))
    label_width = max(len("soft loss (forward KL)"), len("grad norm ||dL/dz_s||"))
    width = max(14, *(len(header) + 2 for header, _, _ in columns))
    lines = [
        f"signal gap: {classes} classes, batch of {batch_size}, logits ~ N(0, 1), seed {seed}",
        "",
        " " * label_width + "".join(f"{header:>{width}}" for header, _, _ in columns),
        f"{'soft loss (forward KL)':<{label_width}}"
        + "".join(f"{loss:>{width}.4e}" for _, loss, _ in columns),
        f"{'grad norm ||dL/dz_s||':<{label_width}}"
        + "".join(f"{norm:>{width}.4e}" for _, _, norm in columns),
        "",
    ]
    for gap in gaps:
        if gap.temperature != 1.0:
            lines.append(
                f"T={gap.temperature:g}: scaled / unscaled gradient norm = {gap.ratio:.4f} "
                f"(T^2 = {gap.temperature**2:g})"
            )
    reference = next((gap for gap in gaps if gap.temperature == 1.0), None)
    if reference is not None:
        for gap in gaps:
            if gap.temperature != 1.0:
                lines.append(
                    f"T={gap.temperature:g}: unscaled gradient is {reference.grad_norm / gap.grad_norm:.1f}x "
                    f"smaller than at T=1; scaled by T^2 it is {gap.scaled_grad_norm / reference.grad_norm:.2f}x T=1's"
                )
    return "\n".join(lines)
