"""acceptance_rate, expected_tokens_per_call and expected_speedup against hand computation."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import darkknowledge as dk
from darkknowledge.speculative import acceptance_rate, expected_speedup, expected_tokens_per_call


def naive_overlap(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Σ_x min(p(x), q(x)) per row, one entry at a time, in float64."""
    rows_p, rows_q = p.double().reshape(-1, p.shape[-1]), q.double().reshape(-1, q.shape[-1])
    values = [
        sum(min(a, b) for a, b in zip(rp.tolist(), rq.tolist())) for rp, rq in zip(rows_p, rows_q)
    ]
    return torch.tensor(values, dtype=torch.float64).reshape(p.shape[:-1])


def test_acceptance_rate_equals_one_minus_library_tvd():
    generator = torch.Generator().manual_seed(0)
    target_logits = 2 * torch.randn(3, 5, 11, generator=generator)
    draft_logits = 2 * torch.randn(3, 5, 11, generator=generator)
    p, q = target_logits.softmax(-1), draft_logits.softmax(-1)
    per_position = acceptance_rate(p, q, reduction="none")
    tvd = dk.divergence(draft_logits, target_logits, kind="tvd", reduction="none")
    torch.testing.assert_close(per_position, 1 - tvd, atol=1e-6, rtol=0)
    torch.testing.assert_close(per_position.double(), naive_overlap(p, q), atol=1e-6, rtol=0)
    torch.testing.assert_close(acceptance_rate(p, q), naive_overlap(p, q).mean().float())


def test_acceptance_rate_mask_averages_valid_positions():
    generator = torch.Generator().manual_seed(1)
    p = torch.randn(2, 7, 9, generator=generator).softmax(-1)
    q = torch.randn(2, 7, 9, generator=generator).softmax(-1)
    mask = torch.rand(2, 7, generator=generator) > 0.4
    expected = naive_overlap(p, q)[mask].mean()
    torch.testing.assert_close(
        acceptance_rate(p, q, mask=mask).double(), expected, atol=1e-6, rtol=0
    )
    summed = acceptance_rate(p, q, mask=mask, reduction="sum").double()
    torch.testing.assert_close(summed, naive_overlap(p, q)[mask].sum(), atol=1e-5, rtol=0)


def test_acceptance_rate_extremes():
    p = torch.tensor([[0.2, 0.3, 0.5]])
    assert float(acceptance_rate(p, p)) == pytest.approx(1.0)
    assert float(acceptance_rate(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]))) == 0.0


@pytest.mark.parametrize(
    ("target", "draft", "message"),
    [
        (torch.ones(2, 3) / 3, torch.ones(2, 4) / 4, "same shape"),
        (torch.tensor([[0.5, 0.6]]), torch.tensor([[0.5, 0.5]]), "sum to 1"),
        (torch.tensor([[1.5, -0.5]]), torch.tensor([[0.5, 0.5]]), ">= 0"),
        (torch.tensor([[1, 0]]), torch.tensor([[0.5, 0.5]]), "floating-point"),
        ([[0.5, 0.5]], torch.tensor([[0.5, 0.5]]), "torch.Tensor"),
    ],
)
def test_acceptance_rate_rejects_bad_input(target, draft, message):
    with pytest.raises((ValueError, TypeError), match=message):
        acceptance_rate(target, draft)


@pytest.mark.parametrize(
    ("alpha", "gamma", "cost_ratio", "expected"),
    [
        (0.5, 1, 0.0, 1.5),  # (1 - 0.25) / 0.5
        (0.8, 4, 0.1, (1 - 0.8**5) / (0.2 * 1.4)),  # 0.67232 / 0.28 = 2.40114...
        (0.6, 3, 0.05, (1 - 0.6**4) / (0.4 * 1.15)),  # 0.8704 / 0.46
        (0.0, 5, 0.2, 1 / 2.0),  # nothing accepted: one token per round, paying for 5 drafts
        (1.0, 3, 0.5, 4 / 2.5),  # the alpha -> 1 limit (gamma + 1) / (gamma c + 1)
    ],
)
def test_expected_speedup_hand_values(alpha, gamma, cost_ratio, expected):
    assert expected_speedup(alpha, gamma, cost_ratio) == pytest.approx(expected, rel=1e-12)


def test_expected_speedup_gamma_one_is_one_plus_alpha_over_one_plus_c():
    """gamma = 1 gives (1 + alpha) / (1 + c): above 1 exactly when alpha > c (Leviathan, Cor. 3.9)."""
    for alpha, cost_ratio in itertools.product((0.0, 0.3, 0.7, 0.999), (0.0, 0.1, 0.5)):
        speedup = expected_speedup(alpha, 1, cost_ratio)
        assert speedup == pytest.approx((1 + alpha) / (1 + cost_ratio), rel=1e-12)
        assert (speedup > 1) == (alpha > cost_ratio)


def test_expected_speedup_is_continuous_at_alpha_one():
    for gamma in (1, 4, 9):
        closed_form = (1 - 0.999999 ** (gamma + 1)) / (1 - 0.999999)
        assert expected_tokens_per_call(0.999999, gamma) == pytest.approx(closed_form, rel=1e-6)
        assert expected_tokens_per_call(1.0, gamma) == gamma + 1
        assert expected_speedup(1.0 - 1e-12, gamma, 0.1) == pytest.approx(
            expected_speedup(1.0, gamma, 0.1), rel=1e-9
        )


def test_expected_speedup_accepts_the_tensor_acceptance_rate_returns():
    p = torch.tensor([[0.5, 0.5]])
    q = torch.tensor([[0.25, 0.75]])
    alpha = acceptance_rate(p, q)  # 0.75
    assert expected_speedup(alpha, 2, 0.0) == pytest.approx(1 + 0.75 + 0.75**2)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"alpha": 1.2}, ValueError, "alpha"),
        ({"alpha": math.nan}, ValueError, "alpha"),
        ({"gamma": 0}, ValueError, "gamma"),
        ({"gamma": 2.0}, TypeError, "gamma"),
        ({"cost_ratio": -0.1}, ValueError, "cost_ratio"),
        ({"cost_ratio": "0.1"}, TypeError, "cost_ratio"),
        ({"alpha": torch.tensor([0.5, 0.5])}, TypeError, "alpha"),
    ],
)
def test_expected_speedup_rejects_bad_input(kwargs, error, message):
    arguments = {"alpha": 0.5, "gamma": 3, "cost_ratio": 0.1, **kwargs}
    with pytest.raises(error, match=message):
        expected_speedup(**arguments)
