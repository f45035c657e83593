"""The gradient meter ("gradient balance"): how hard each term of the objective pulls on the
student's logits.

For ``total = (1 - alpha)·hard + alpha·scale·soft`` the meter reports

    hard_grad_norm = ‖∂[(1 - alpha)·hard] / ∂z‖₂,    soft_grad_norm = ‖∂[total - (1 - alpha)·hard] / ∂z‖₂

where ``z`` are the student logits. The soft part is taken as ``total - hard part`` so that it is
right for a tensor (per-sample, learned) temperature too. It costs one extra backward pass
through the loss (not the model): the hard part's gradient is taken at once with
``torch.autograd.grad(..., retain_graph=True)``, and the total gradient is read by a hook during
the training step's own backward pass, which computes it anyway. The Distiller asks for the
meter on log steps only (``grad_meter=True`` in ``Task.compute_loss``); it logs the two norms
as ``soft_grad_norm`` and ``hard_grad_norm``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..losses import KDLoss


def gradient_balance(
    loss: KDLoss, alpha: float, logits: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(soft_grad_norm, hard_grad_norm)`` of one micro-batch's loss at the student ``logits``,
    as 0-dim float32 tensors. ``hard_grad_norm`` is ready at once; ``soft_grad_norm`` is filled
    in when ``loss.total`` (or a multiple of it, e.g. by an fp16 grad scaler) is backpropagated.
    No host sync: the Distiller reads both after the step.

    >>> import torch, darkknowledge as dk
    >>> z = torch.randn(4, 3, requires_grad=True)
    >>> loss = dk.kd_loss(z, torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), temperature=2.0, alpha=1.0)
    >>> soft, hard = gradient_balance(loss, 1.0, z)
    >>> (1000.0 * loss.total).backward()  # a scaled backward pass, as with a grad scaler
    >>> bool(torch.isclose(soft, torch.linalg.vector_norm(z.grad / 1000.0))), float(hard)
    (True, 0.0)
    """
    if alpha >= 1.0 or not loss.hard.requires_grad:
        hard_grad = None
        hard_norm = torch.zeros((), dtype=torch.float32, device=logits.device)
    else:
        (hard_grad,) = torch.autograd.grad((1.0 - alpha) * loss.hard, logits, retain_graph=True)
        hard_norm = torch.linalg.vector_norm(hard_grad.float())
    soft_norm = torch.zeros((), dtype=torch.float32, device=logits.device)
    upstream = {}

    def on_total(grad: torch.Tensor) -> None:  # ∂(what is backpropagated)/∂total: 1, or a scale
        upstream["scale"] = grad.detach().float()

    def on_logits(grad: torch.Tensor) -> None:  # the total gradient at the logits, times that scale
        total_grad = grad.detach().float() / upstream.get("scale", 1.0)
        soft_grad = total_grad if hard_grad is None else total_grad - hard_grad.float()
        soft_norm.copy_(torch.linalg.vector_norm(soft_grad))

    loss.total.register_hook(on_total)
    logits.register_hook(on_logits)
    return soft_norm, hard_norm.detach()


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
    if len(norms) == 1 and isinstance(norms[0], torch.Tensor):
        return norms[0].float()
    stacked = torch.stack([torch.as_tensor(n, dtype=torch.float32, device=device) for n in norms])
    return stacked.square().sum().sqrt()
