"""Shared pieces of the RL tests: the float64 reference module and Monte Carlo assertions."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for reference.py
import reference

__all__ = ["assert_far", "assert_within", "reference"]


def assert_within(
    mean: torch.Tensor, standard_error: torch.Tensor, target: torch.Tensor, what: str
):
    """Every entry of a Monte Carlo mean lies within 5 standard errors of its expectation."""
    z = (mean - target).abs() / standard_error.clamp_min(1e-12)
    assert float(z.max()) < 5.0, (
        f"{what}: {z.max():.1f} standard errors from the claim\n{mean}\n{target}"
    )


def assert_far(mean: torch.Tensor, standard_error: torch.Tensor, target: torch.Tensor, what: str):
    """The mean is more than 10 standard errors from ``target`` somewhere: the test can tell the
    claimed expectation from this alternative."""
    z = (mean - target).abs() / standard_error.clamp_min(1e-12)
    assert float(z.max()) > 10.0, f"{what}: only {z.max():.1f} standard errors apart"
