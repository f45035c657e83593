"""verify: the emitted tokens follow the target's distribution exactly (6-token vocabulary)."""

from __future__ import annotations

import math

import pytest
import torch

from darkknowledge.speculative import acceptance_rate, expected_tokens_per_call, verify
from darkknowledge.speculative.verify import verify_unchecked

# Target rows p_0..p_3 and draft rows q_0..q_2, all different. q_0(4) = 0 < p_0(4): only the
# residual can emit token 4; p_0(5) = 0 < q_0(5): token 5 must always be rejected at position 0.
TARGET = torch.tensor(
    [
        [0.30, 0.20, 0.15, 0.10, 0.25, 0.00],
        [0.05, 0.40, 0.05, 0.30, 0.10, 0.10],
        [0.25, 0.25, 0.00, 0.20, 0.10, 0.20],
        [0.10, 0.10, 0.10, 0.10, 0.10, 0.50],
    ]
)
DRAFT = torch.tensor(
    [
        [0.10, 0.40, 0.10, 0.20, 0.00, 0.20],
        [0.30, 0.20, 0.20, 0.10, 0.10, 0.10],
        [0.20, 0.30, 0.30, 0.05, 0.10, 0.05],
    ]
)
ALPHAS = (0.5, 0.6, 0.65)  # Σ min(p_i, q_i), by hand
GAMMA, CALLS = 3, 20_000
# 0.999 quantiles of the chi-square distribution by degrees of freedom (scipy.stats.chi2.ppf).
CHI2_CRITICAL = {3: 16.266, 4: 18.467, 5: 20.515}


@pytest.fixture(scope="module")
def draws():
    """20k calls of verify at a fixed seed: (emitted tokens, number accepted) per call."""
    draft_generator = torch.Generator().manual_seed(0)
    draft_tokens = torch.multinomial(DRAFT, CALLS, replacement=True, generator=draft_generator)
    generator = torch.Generator().manual_seed(1)
    results = [
        verify(draft_tokens[:, call], DRAFT, TARGET, generator=generator) for call in range(CALLS)
    ]
    return [tokens.tolist() for tokens, _ in results], [accepted for _, accepted in results]


def chi_square(observed: torch.Tensor, probabilities: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic and its degrees of freedom over the categories of nonzero probability;
    a category of zero probability must never be observed."""
    possible = probabilities > 0
    assert int(observed[~possible].sum()) == 0, f"impossible outcomes observed: {observed.tolist()}"
    expected = observed.sum() * probabilities[possible]
    statistic = float(((observed[possible] - expected) ** 2 / expected).sum())
    return statistic, int(possible.sum()) - 1


def test_verify_acceptance_rates_of_the_fixture():
    measured = acceptance_rate(TARGET[:GAMMA], DRAFT, reduction="none")
    torch.testing.assert_close(measured, torch.tensor(ALPHAS))


def test_verify_first_token_follows_the_target(draws):
    tokens, _ = draws
    observed = torch.bincount(torch.tensor([row[0] for row in tokens]), minlength=6).double()
    statistic, dof = chi_square(observed, TARGET[0].double())
    assert statistic < CHI2_CRITICAL[dof], (statistic, observed.tolist())


@pytest.mark.parametrize("position", range(GAMMA + 1))
def test_verify_every_position_follows_the_target(draws, position):
    """Given that the round reaches position j, the token emitted there is distributed as p_j,
    whether it is an accepted draft token, a residual token or the bonus token."""
    tokens, _ = draws
    reached = [row[position] for row in tokens if len(row) > position]
    assert len(reached) > 3000  # about 20k · 0.5 · 0.6 · 0.65 = 3900 at the last position
    observed = torch.bincount(torch.tensor(reached), minlength=6).double()
    statistic, dof = chi_square(observed, TARGET[position].double())
    assert statistic < CHI2_CRITICAL[dof], (position, statistic, observed.tolist())


def test_verify_number_accepted_is_a_truncated_geometric(draws):
    """P(n = k) = alpha_0 ... alpha_{k-1} (1 - alpha_k) for k < gamma, and the product of all alphas
    for k = gamma; its mean plus one is the tokens per call."""
    tokens, accepted = draws
    assert all(len(row) == n + 1 for row, n in zip(tokens, accepted))
    assert max(accepted) <= GAMMA
    reach = [math.prod(ALPHAS[:k]) for k in range(GAMMA + 1)]
    probabilities = torch.tensor(
        [reach[k] * (1 - ALPHAS[k]) for k in range(GAMMA)] + [reach[GAMMA]]
    )
    observed = torch.bincount(torch.tensor(accepted), minlength=GAMMA + 1).double()
    statistic, dof = chi_square(observed, probabilities.double())
    assert statistic < CHI2_CRITICAL[dof], (statistic, observed.tolist())


@pytest.mark.parametrize("position", range(GAMMA))
def test_verify_measured_acceptance_matches_acceptance_rate(draws, position):
    """Among the calls that examine draft token i, it is accepted with probability
    acceptance_rate(p_i, q_i): binomial, within 4 standard deviations."""
    _, accepted = draws
    examined = sum(1 for n in accepted if n >= position)
    kept = sum(1 for n in accepted if n > position)
    alpha = float(acceptance_rate(TARGET[position], DRAFT[position]))
    tolerance = 4 * math.sqrt(examined * alpha * (1 - alpha))
    assert abs(kept - examined * alpha) < tolerance, (kept, examined, alpha)


def test_verify_tokens_per_call_match_the_formula_with_equal_rows():
    """With the same p and q at every position, tokens per call average (1 - a^(g+1)) / (1 - a)."""
    target, draft = TARGET[1].expand(GAMMA + 1, 6), DRAFT[1].expand(GAMMA, 6)
    alpha = float(acceptance_rate(target[0], draft[0]))  # 0.6
    generator = torch.Generator().manual_seed(2)
    calls = 4000
    draft_tokens = torch.multinomial(draft, calls, replacement=True, generator=generator)
    lengths = torch.tensor(
        [
            len(verify(draft_tokens[:, call], draft, target, generator=generator)[0])
            for call in range(calls)
        ],
        dtype=torch.float64,
    )
    expected = expected_tokens_per_call(alpha, GAMMA)
    assert abs(float(lengths.mean()) - expected) < 4 * float(lengths.std()) / math.sqrt(calls)


def test_verify_identical_distributions_accept_every_draft_token():
    generator = torch.Generator().manual_seed(3)
    probs = torch.randn(5, 50, generator=generator).softmax(-1)
    for _ in range(200):
        draft_tokens = torch.multinomial(probs[:4], 1, generator=generator)[:, 0]
        tokens, accepted = verify(draft_tokens, probs[:4], probs, generator=generator)
        assert accepted == 4 and torch.equal(tokens[:4], draft_tokens)


def test_verify_zero_draft_probability():
    """q(x) = 0 < p(x): the ratio is infinite, always accepted. q(x) = p(x) = 0: always rejected,
    and the token is never emitted."""
    target = torch.tensor([[0.0, 0.5, 0.5], [1.0, 0.0, 0.0]])
    draft = torch.tensor([[0.5, 0.0, 0.5]])
    generator = torch.Generator().manual_seed(4)
    for _ in range(100):
        tokens, accepted = verify(torch.tensor([1]), draft, target, generator=generator)
        assert (tokens.tolist(), accepted) == ([1, 0], 1)
        tokens, accepted = verify(torch.tensor([0]), draft, target, generator=generator)
        assert accepted == 0 and tokens.tolist() == [1]  # residual max(0, p - q) = (0, 0.5, 0)


def test_verify_residual_that_rounds_to_zero_falls_back_to_the_target():
    """p <= q everywhere (p short of 1 by rounding): a rejection leaves max(0, p - q) = 0, which
    multinomial would refuse; the token is drawn from p instead."""
    target = torch.tensor([[0.2, 0.5], [0.5, 0.5]])
    draft = torch.tensor([[0.5, 0.5]])
    generator = torch.Generator().manual_seed(5)
    outcomes = [verify_unchecked(torch.tensor([0]), draft, target, generator) for _ in range(200)]
    rejected = [tokens.tolist() for tokens, accepted in outcomes if accepted == 0]
    assert rejected and all(len(tokens) == 1 and tokens[0] in (0, 1) for tokens in rejected)


def test_verify_greedy_one_hot_distributions_keep_the_target_argmax():
    target = torch.nn.functional.one_hot(torch.tensor([2, 0, 1]), 4).float()
    draft = torch.nn.functional.one_hot(torch.tensor([2, 3]), 4).float()
    tokens, accepted = verify(torch.tensor([2, 3]), draft, target)
    assert (tokens.tolist(), accepted) == ([2, 0], 1)


def test_verify_without_draft_tokens_samples_the_target():
    tokens, accepted = verify(
        torch.zeros(0, dtype=torch.long), torch.zeros(0, 3), torch.tensor([[0.0, 0.0, 1.0]])
    )
    assert (tokens.tolist(), accepted) == ([2], 0)


@pytest.mark.parametrize(
    ("draft_tokens", "draft_probs", "target_probs", "error", "message"),
    [
        (torch.tensor([[1]]), DRAFT[:1], TARGET[:2], ValueError, r"shape \(gamma,\)"),
        (torch.tensor([1.0]), DRAFT[:1], TARGET[:2], TypeError, "integer"),
        (torch.tensor([1]), DRAFT[:1], TARGET[:3], ValueError, r"gamma \+ 1"),
        (torch.tensor([1, 2]), DRAFT[:1], TARGET[:3], ValueError, "draft_probs must have shape"),
        (torch.tensor([6]), DRAFT[:1], TARGET[:2], ValueError, r"in \[0, 6\)"),
        (torch.tensor([1]), DRAFT[:1] * 2, TARGET[:2], ValueError, "sum to 1"),
        (torch.tensor([1]), DRAFT[:1], TARGET[:2].log(), ValueError, "finite probabilities"),
    ],
)
def test_verify_rejects_bad_input(draft_tokens, draft_probs, target_probs, error, message):
    with pytest.raises(error, match=message):
        verify(draft_tokens, draft_probs, target_probs)
