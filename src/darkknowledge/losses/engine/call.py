"""The description of one distillation-loss call: its options, typed, apart from its tensors.

The public functions validate their arguments and build a :class:`KDCall`; objectives read
its fields (``call.alpha``, ``call.divergence``) instead of a dictionary of options.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SoftScale = str | float


def resolve_soft_scale(
    soft_scale: SoftScale, temperature: float | torch.Tensor
) -> float | torch.Tensor:
    """The factor on the soft term: ``"T2"`` gives T^2, ``"none"`` gives 1, a float itself."""
    if isinstance(soft_scale, str):
        if soft_scale == "T2":
            return temperature * temperature
        if soft_scale == "none":
            return 1.0
        raise ValueError(f'soft_scale must be "T2", "none" or a float, got {soft_scale!r}')
    if isinstance(soft_scale, bool) or not isinstance(soft_scale, int | float):
        raise TypeError(
            f'soft_scale must be "T2", "none" or a float, got {type(soft_scale).__name__}'
        )
    if not math.isfinite(soft_scale) or soft_scale < 0:
        # A negative weight would push the student away from the teacher.
        raise ValueError(f"soft_scale must be a finite float >= 0, got soft_scale={soft_scale!r}")
    return float(soft_scale)


@dataclass(frozen=True)
class KDCall:
    """``L = (1 − alpha)·CE + alpha·soft_scale·D(p, q)``: the options of one call.

    The temperature is not here: it may be a tensor with a gradient, which the engine passes
    to autograd beside the student's tensors. Nor is the reduction: the engine divides every
    chunk's sums by one normalizer (the global count of valid rows for a mean, 1 for a sum).
    """

    alpha: float
    divergence: str = "forward_kl"
    soft_scale: SoftScale = "T2"
    ignore_index: int = -100
    beta: float = 0.5
    lam: float = 0.1

    def soft_weight(self, temperature: float) -> float:
        """``alpha · soft_scale`` at a float temperature."""
        return self.alpha * float(resolve_soft_scale(self.soft_scale, temperature))
