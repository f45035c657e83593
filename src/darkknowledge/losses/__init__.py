"""Loss functions: pure functions of tensors, no state."""

from .divergences import per_position_divergence
from .fused import fused_linear_kd_loss
from .hard import fused_linear_cross_entropy, hard_only_loss
from .kd import DistillationLoss, KDLoss, divergence, kd_loss
from .reduction import count_valid, reduce_positions, valid_positions

__all__ = [
    "DistillationLoss",
    "KDLoss",
    "count_valid",
    "divergence",
    "fused_linear_cross_entropy",
    "fused_linear_kd_loss",
    "hard_only_loss",
    "kd_loss",
    "per_position_divergence",
    "reduce_positions",
    "valid_positions",
]
