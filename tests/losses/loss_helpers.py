"""Shared pieces of the loss tests: logits, tolerances, and the float64 reference module."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for reference.py
import reference

__all__ = [
    "GRAD_TOLERANCE",
    "VALUE_ATOL",
    "VALUE_RTOL",
    "assert_close",
    "assert_values",
    "doc_example",
    "logits",
    "reference",
]

# Relative tolerance of gradients returned in the input dtype (the math runs in float32; the
# gradient is rounded to the input dtype on the way out: 2^-8 for bfloat16, 2^-11 for float16).
GRAD_TOLERANCE = {
    torch.float64: 1e-10,
    torch.float32: 2e-5,
    torch.bfloat16: 1e-2,
    torch.float16: 2e-3,
}
# Values are computed in float32 (float64 for float64 input) from the exact input values, so
# only float64 versus the rest matters. A float32 divergence is a difference of log-probabilities
# of size ~log C, so its error has an absolute floor of a few ulp(log C) ~ 1e-6 however small
# the divergence (at T = 100 it is ~1e-4): values get this absolute slack on top.
VALUE_RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}
VALUE_ATOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2e-6, torch.float16: 2e-6}


def logits(*shape: int, dtype=torch.float32, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=generator, dtype=torch.float64)).to(dtype)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float, what: str = "") -> None:
    """``|actual − expected| <= rel · max |expected|`` elementwise (plus float16's underflow).

    Tolerance relative to the largest expected entry: a mean over thousands of positions makes
    individual gradient entries tiny, and fp32 rounding is relative to the row's scale. A
    float16 gradient below 2^-24 rounds to a multiple of it (that is what loss scaling is for).
    """
    floor = 2.0**-24 if actual.dtype == torch.float16 else 0.0
    actual, expected = actual.double(), expected.double()
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    bound = rel * (expected.abs().max().item() + 1e-30) + floor
    error = (actual - expected).abs().max().item() if actual.numel() else 0.0
    assert error <= bound, f"{what}: max error {error:.3e} > {bound:.3e}"


def assert_values(
    actual: torch.Tensor, expected: torch.Tensor, dtype, scale: float = 1.0, what: str = ""
) -> None:
    """Loss values: relative tolerance plus the float32 absolute floor (times ``scale``, e.g. T²)."""
    actual, expected = actual.double(), expected.double()
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    torch.testing.assert_close(
        actual, expected, rtol=VALUE_RTOL[dtype], atol=VALUE_ATOL[dtype] * scale, msg=what or None
    )


def doc_example(page: str, heading: str, directory: Path) -> Path:
    """The first ```python block under ``heading`` in ``docs/<page>``, written to a script in
    ``directory`` (to run with ``runpy.run_path``: the docs' examples run as written)."""
    text = (Path(__file__).resolve().parents[2] / "docs" / page).read_text()
    section = text.split(heading, 1)[1]
    script = directory / f"{page.replace('.', '_')}_example.py"
    script.write_text(section.split("```python\n", 1)[1].split("```", 1)[0])
    return script
