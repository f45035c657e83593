"""Shared by the loss fuzzers: hypothesis settings, the float64 references, and the rule that
an input either gets an error naming an argument or a result equal to the reference."""

from __future__ import annotations

import inspect
import re
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for reference.py
import reference

__all__ = ["FUZZ", "answer", "assert_matches", "reference", "seeds", "tensor"]

FUZZ = settings(
    max_examples=60,
    derandomize=True,
    database=None,  # nothing written to disk: every run the same examples
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# Values are computed in float32 (float64 for float64 input): relative tolerances as in
# tests/losses/loss_helpers.py, plus an absolute floor for divergences near 0.
TOLERANCE = {torch.float64: (1e-9, 1e-11), torch.float32: (2e-5, 2e-5)}


def tensor(seed: int, shape: tuple[int, ...], dtype=torch.float32, scale: float = 3.0):
    generator = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=generator, dtype=torch.float64)).to(dtype)


seeds = st.integers(min_value=0, max_value=2**31 - 1)


def answer(function: Callable, *args, invalid: str | None = None, **kwargs):
    """``function(*args, **kwargs)``; a ValueError/TypeError must name one of its arguments
    (returns None), and an input the caller knows is ``invalid`` must raise."""
    names = list(inspect.signature(function).parameters)
    try:
        result = function(*args, **kwargs)
    except (ValueError, TypeError) as error:
        message = str(error)
        assert "\n" not in message.strip(), message
        assert any(re.search(rf"\b{name}\b", message) for name in names), (
            f"{function.__name__}: {message!r} names none of its arguments {names}"
        )
        return None
    assert invalid is None, f"{function.__name__} accepted an invalid input: {invalid}"
    return result


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, dtype, what: str) -> None:
    rtol, atol = TOLERANCE[dtype]
    actual, expected = actual.detach().double(), expected.detach().double()
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol * scale, msg=what)
