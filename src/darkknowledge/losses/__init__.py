"""The losses of darkknowledge.

Pure functions of tensors (no state; each call computes from its arguments alone):
:func:`kd_loss`, :func:`divergence`, :func:`hard_only_loss`, :func:`sparse_kd_loss` (a cached
sparse teacher), the fused losses on hidden states and output layers
(:func:`fused_linear_kd_loss`, :func:`fused_linear_cross_entropy`,
:func:`fused_linear_sparse_kd_loss`), the
per-position divergences and the masked reduction (:func:`reduce_positions`,
:func:`valid_positions`, :func:`count_valid`). The chunk engine they run on is
``darkknowledge.losses.engine``.

One stateful ``nn.Module``: :class:`DistillationLoss` (``module.py``) holds a temperature and an
alpha that change over training (schedules, a learnable temperature) and calls :func:`kd_loss`.
"""

from .divergences import per_position_divergence
from .fused import fused_linear_kd_loss
from .hard import fused_linear_cross_entropy
from .kd import KDLoss, divergence, hard_only_loss, kd_loss
from .module import DistillationLoss
from .reduction import count_valid, reduce_positions, valid_positions
from .sparse import fused_linear_sparse_kd_loss, sparse_kd_loss

__all__ = [
    "DistillationLoss",
    "KDLoss",
    "count_valid",
    "divergence",
    "fused_linear_cross_entropy",
    "fused_linear_kd_loss",
    "fused_linear_sparse_kd_loss",
    "hard_only_loss",
    "kd_loss",
    "per_position_divergence",
    "reduce_positions",
    "sparse_kd_loss",
    "valid_positions",
]
