"""The signal meter: how hard each term of the objective pulls on the student's logits.

For ``total = (1 - alpha)·hard + alpha·scale·soft`` the meter reports

    hard_grad_norm = ‖∂[(1 - alpha)·hard] / ∂z‖₂,    soft_grad_norm = ‖∂[total - (1 - alpha)·hard] / ∂z‖₂

where ``z`` are the student logits. The soft part is taken as ``total - hard part`` so that it is
right for a tensor (per-sample, learned) temperature too. The gradients are taken with
``torch.autograd.grad(..., retain_graph=True)`` and never touch ``.grad``; the Distiller asks for
them only on log steps, because each costs a backward pass through the loss head.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..losses import KDLoss


def signal_grad_norms(
    loss: KDLoss, alpha: float, logits: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(soft_grad_norm, hard_grad_norm)`` of one micro-batch's loss at the student ``logits``,
    as 0-dim float32 tensors (no host sync: the Distiller reads them when they are ready).

    >>> import torch, darkknowledge as dk
    >>> z = torch.randn(4, 3, requires_grad=True)
    >>> loss = dk.kd_loss(z, torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), temperature=2.0, alpha=1.0)
    >>> soft, hard = signal_grad_norms(loss, 1.0, z)
    >>> bool(soft > 0), float(hard)
    (True, 0.0)
    """
    (total_grad,) = torch.autograd.grad(loss.total, logits, retain_graph=True)
    if alpha >= 1.0 or not loss.hard.requires_grad:
        hard_grad = torch.zeros_like(total_grad)
    else:
        (hard_grad,) = torch.autograd.grad((1.0 - alpha) * loss.hard, logits, retain_graph=True)
    soft_norm = torch.linalg.vector_norm((total_grad - hard_grad).float())
    hard_norm = torch.linalg.vector_norm(hard_grad.float())
    return soft_norm.detach(), hard_norm.detach()


def combine_grad_norms(
    norms: Sequence[float | torch.Tensor | None], device: torch.device | str = "cpu"
) -> torch.Tensor | None:
    """Norm over the concatenation of several micro-batches' logits: ``sqrt(Σ n_i²)``, a 0-dim
    tensor on ``device``. None (a task that does not measure) stays None.

    >>> combine_grad_norms([3.0, torch.tensor(4.0)])
    tensor(5.)
    """
    if not norms or any(n is None for n in norms):
        return None
    stacked = torch.stack([torch.as_tensor(n, dtype=torch.float32, device=device) for n in norms])
    return stacked.square().sum().sqrt()
