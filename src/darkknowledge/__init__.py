"""darkknowledge: knowledge distillation for PyTorch, with the math done right.

    L_total = (1 - alpha) · L_hard + alpha · T^2 · L_soft        (Hinton et al., 2015)

>>> import torch, darkknowledge as dk
>>> loss = dk.kd_loss(torch.randn(8, 10), torch.randn(8, 10), torch.randint(10, (8,)), temperature=4.0, alpha=0.9)
>>> loss.total.dim()
0
"""

from . import analysis, rl, schedules
from .losses import DistillationLoss, KDLoss, count_valid, divergence, kd_loss, reduce_positions
from .losses.fused import fused_linear_kd_loss
from .losses.sparse import fused_linear_sparse_kd_loss, sparse_kd_loss
from .temperature import LearnableTemperature
from .train import ClassificationTask, Distiller, TrainResult

__version__ = "0.1.0"

# Submodules that import transformers (slow) load on first access: ``dk.llm``, ``dk.hf``.
_LAZY_SUBMODULES = ("cache", "hf", "llm", "mtp", "speculative")


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ClassificationTask",
    "DistillationLoss",
    "Distiller",
    "KDLoss",
    "LearnableTemperature",
    "TrainResult",
    "__version__",
    "analysis",
    "count_valid",
    "divergence",
    "fused_linear_kd_loss",
    "fused_linear_sparse_kd_loss",
    "kd_loss",
    "reduce_positions",
    "rl",
    "schedules",
    "sparse_kd_loss",
]
