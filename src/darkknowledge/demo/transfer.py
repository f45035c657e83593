"""Two pieces of Hinton et al. (2015) that the demo needs beyond the plain Distiller.

1. A *transfer set* with few labels: every example carries the teacher's soft targets, only some
   carry a label (the others have ``ignore_index``). The per-example objective is

       l_i = alpha · T^2 · D(p_i, q_i) + (1 - alpha) · CE(z_i, y_i) · [y_i is known]

   averaged over all examples of the step. It is ``dk.ClassificationTask(distill_unlabelled=True)``
   (configs: ``distill.unlabelled: distill``); :class:`TransferSetTask` is its short name here.

2. The omitted-class bias correction (section 3 of the paper): a student that never saw class
   ``c`` under-predicts it; raising the bias of output ``c`` by ``delta`` restores it. ``delta``
   is chosen, from inputs alone, so that a held-out set gets the class's prior share of
   predictions.
"""

from __future__ import annotations

import torch

from ..train.task import ClassificationTask


class TransferSetTask(ClassificationTask):
    """Soft targets on every example, hard targets where the label is known: the
    :class:`ClassificationTask` with ``distill_unlabelled=True`` (see it for the formula).

    Batches are ``(inputs, labels)`` with ``labels == ignore_index`` for unlabelled examples.
    Without a teacher (``loss_fn=None``) it is the cross-entropy of the labelled examples,
    divided by the number of all examples.

    >>> import torch
    >>> task = TransferSetTask()
    >>> int(task.count_valid((torch.randn(4, 3), torch.tensor([0, -100, -100, 2]))))
    4
    """

    def __init__(self, *, ignore_index: int = -100) -> None:
        super().__init__(ignore_index=ignore_index, distill_unlabelled=True)


def bias_for_share(logits: torch.Tensor, target_class: int, share: float) -> float:
    """The smallest ``delta >= 0`` such that adding ``delta`` to ``logits[:, target_class]``
    makes at least ``share`` of the rows predict ``target_class``.

    Row i switches to the class once ``delta > max_{j != c} z_ij - z_ic`` (its margin); the
    predicted share is a step function of delta, so the exact 1-D search is a quantile of the
    margins. Ties go to the lower index in ``argmax``, so a tiny epsilon is added.

    >>> z = torch.tensor([[2.0, 0.0], [1.0, 0.5], [0.0, 3.0]])
    >>> round(bias_for_share(z, 1, 2 / 3), 2)
    0.5
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be (N, C), got shape {tuple(logits.shape)}")
    if not 0 < share <= 1:
        raise ValueError(f"share must be in (0, 1], got share={share!r}")
    others = logits.clone()
    others[:, target_class] = float("-inf")
    margins = (
        (others.max(dim=1).values - logits[:, target_class]).clamp_min(0).sort().values
    )  # (N,)
    needed = max(1, round(share * len(margins)))
    delta = float(margins[needed - 1])
    return delta + 1e-4 * max(1.0, abs(delta)) if delta > 0 else 0.0
