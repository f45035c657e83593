"""The digits data set and a deterministic stratified split."""

from __future__ import annotations

from importlib import resources

import numpy as np
import torch

NUM_CLASSES = 10
IMAGE_SHAPE = (1, 8, 8)


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """``(images, labels)``: images ``(1797, 64)`` float32 in [0, 1], labels ``(1797,)`` int64."""
    with resources.files(__package__).joinpath("digits.npz").open("rb") as handle:
        arrays = np.load(handle, allow_pickle=False)  # plain arrays only, never pickle
        images, labels = arrays["images"], arrays["labels"]
    return torch.from_numpy(images.astype(np.float32) / 16.0), torch.from_numpy(
        labels.astype(np.int64)
    )


def stratified_split(
    labels: torch.Tensor, fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``(rest, chosen)``: ``chosen`` holds ``round(fraction · n_c)`` (at least 1) of
    each class c, drawn with ``seed``; ``rest`` the others. Both sorted.

    >>> rest, chosen = stratified_split(torch.tensor([0, 0, 0, 0, 1, 1]), 0.5, seed=0)
    >>> sorted(torch.tensor([0, 0, 0, 0, 1, 1])[chosen].tolist())
    [0, 0, 1]
    """
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got fraction={fraction!r}")
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for label in labels.unique().tolist():
        members = (labels == label).nonzero().squeeze(1)
        members = members[torch.randperm(len(members), generator=generator)]
        chosen.append(members[: max(1, round(fraction * len(members)))])
    chosen_index = torch.cat(chosen).sort().values
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[chosen_index] = False
    return keep.nonzero().squeeze(1), chosen_index


def split_digits(test_fraction: float = 0.25, seed: int = 0):
    """``(train_images, train_labels, test_images, test_labels)``, stratified by class."""
    images, labels = load_digits()
    train, test = stratified_split(labels, test_fraction, seed)
    return images[train], labels[train], images[test], labels[test]
