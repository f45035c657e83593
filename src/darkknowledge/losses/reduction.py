"""The one masked reduction every loss in darkknowledge goes through.

Losses are computed per position (a sample, or a token), already summed over the class
dimension. This helper turns them into the requested reduction:

- ``"mean"``: sum over valid positions / number of valid positions (or / ``normalizer``);
- ``"sum"``: sum over valid positions;
- ``"none"``: the per-position values, with invalid positions set to 0.

Never divide by the number of classes: that 1/C factor is what makes
``KLDivLoss(reduction="mean")`` vanish at a 128k vocabulary.
"""

from __future__ import annotations

import torch

Normalizer = float | int | torch.Tensor | None


def reduce_positions(
    per_position: torch.Tensor,
    valid: torch.Tensor | None,
    reduction: str = "mean",
    normalizer: Normalizer = None,
) -> torch.Tensor:
    """Reduce a per-position loss over its valid positions.

    Args:
        per_position: ``(...)`` loss per position, float32.
        valid: ``(...)`` bool, True where the position counts; ``None`` means all positions.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        normalizer: with ``"mean"``, divide the sum by this global count of valid positions
            instead of the local count. Gradient accumulation over k micro-batches and several
            processes then give the same gradient as one big batch.

    All positions invalid gives 0 (with zero gradient), never NaN.

    >>> reduce_positions(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([True, False, True]))
    tensor(2.)
    >>> reduce_positions(torch.tensor([1.0, 2.0]), torch.tensor([True, True]), normalizer=4)
    tensor(0.7500)
    """
    if valid is not None:
        # where(), not multiplication: an invalid position holding inf or NaN must not leak.
        per_position = torch.where(valid, per_position, per_position.new_zeros(()))
    if reduction == "none":
        return per_position
    total = per_position.sum()
    if reduction == "sum":
        return total
    if normalizer is not None:
        if isinstance(normalizer, torch.Tensor):
            normalizer = normalizer.to(total.dtype)
        elif normalizer <= 0:
            raise ValueError(
                f"normalizer must be > 0 (a global count of valid positions), got {normalizer!r}"
            )
        return total / normalizer
    if valid is None:
        return total / max(per_position.numel(), 1)
    # clamp: an all-masked batch has sum 0 and count 0; 0 / 1 keeps it 0 with a zero gradient.
    return total / valid.sum().clamp_min(1).to(total.dtype)


def count_valid(
    labels: torch.Tensor | None = None, mask: torch.Tensor | None = None, ignore_index: int = -100
) -> torch.Tensor:
    """Number of positions that count: ``mask`` is True and ``labels != ignore_index``.

    Sum this over micro-batches (and processes, with an all-reduce) to get the ``normalizer``.

    >>> count_valid(torch.tensor([[1, -100, 2]]))
    tensor(2)
    """
    valid = valid_positions(labels, mask, ignore_index)
    if valid is None:
        raise ValueError("count_valid needs labels or mask to know the positions")
    return valid.sum()


def valid_positions(
    labels: torch.Tensor | None, mask: torch.Tensor | None, ignore_index: int = -100
) -> torch.Tensor | None:
    """The boolean ``(...)`` tensor of positions that count, or None if all of them do."""
    valid = None if labels is None else labels != ignore_index
    if mask is not None:
        valid = mask if valid is None else valid & mask
    return valid
