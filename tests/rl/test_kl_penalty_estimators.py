"""Monte Carlo checks of every cell of the estimator × gradient-mode table (docs/rl.md).

One 12-token policy π and reference π_ref; 400,000 tokens sampled from π (or from an older
policy, with importance weights). Expectations come from float64 formulas written out here
(tests/reference.py), gradients of the exact KLs from float64 autograd through them. Each
Monte Carlo mean must lie within 5 standard errors of the claim, and, where another answer is
possible, more than 10 standard errors from it (so the test can tell them apart).
"""

from __future__ import annotations

import math

import pytest
import torch
from rl_helpers import assert_far, assert_within, reference

import darkknowledge as dk

VOCAB, SAMPLES = 12, 400_000


@pytest.fixture(scope="module")
def world():
    generator = torch.Generator().manual_seed(0)
    policy_logits = torch.randn(VOCAB, generator=generator, dtype=torch.float64)
    ref_logits = torch.randn(VOCAB, generator=generator, dtype=torch.float64)
    old_logits = 0.6 * policy_logits  # a flatter, earlier policy
    exact = {}
    for name, direction in (("kl_policy_ref", (0, 1)), ("kl_ref_policy", (1, 0))):
        logits = policy_logits.clone().requires_grad_()
        pair = (reference.softmax(logits), reference.softmax(ref_logits))
        value = reference.kl(pair[direction[0]], pair[direction[1]])
        (grad,) = torch.autograd.grad(value, logits)
        exact[name] = (value.detach(), grad)
    policy, ref = reference.softmax(policy_logits), reference.softmax(ref_logits)
    exact["half_square"] = (0.5 * (policy * (policy.log() - ref.log()).square()).sum(), None)
    exact["zero"] = (None, torch.zeros(VOCAB, dtype=torch.float64))
    samples = {
        name: torch.multinomial(reference.softmax(logits), SAMPLES, True, generator=generator)
        for name, logits in (("policy", policy_logits), ("old", old_logits))
    }
    return {
        "policy_logits": policy_logits,
        "ref_logits": ref_logits,
        "old_logits": old_logits,
        "exact": exact,
        "samples": samples,
    }


def monte_carlo(world, estimator, gradient, *, sampler="policy", weighted=False):
    """Mean value and mean gradient w.r.t. the policy logits, with their standard errors."""
    tokens = world["samples"][sampler]
    logits = world["policy_logits"].clone().requires_grad_()
    log_policy = torch.log_softmax(logits, -1)
    ref_logprobs = torch.log_softmax(world["ref_logits"], -1)[tokens]
    weights = None
    if weighted:
        old_logprobs = torch.log_softmax(world["old_logits"], -1)[tokens]
        weights = (log_policy.detach()[tokens] - old_logprobs).exp()  # π(x) / π_old(x)
    options = {"estimator": estimator, "gradient": gradient, "importance_weights": weights}

    # The loss as a user computes it: the mean over tokens, backpropagated to the logits.
    loss = dk.rl.kl_penalty(log_policy[tokens], ref_logprobs, **options)
    loss.backward()

    # Per-token values and d value / d log π(x), for the standard errors. A token's value
    # depends on the logits only through log π(x), and ∂log π(x)/∂z = onehot(x) - π.
    leaf = log_policy.detach()[tokens].requires_grad_()
    per_token = dk.rl.kl_penalty(leaf, ref_logprobs, reduction="none", **options)
    per_token.sum().backward()
    onehot = torch.nn.functional.one_hot(tokens, VOCAB).double()
    per_token_grads = leaf.grad[:, None] * (onehot - log_policy.detach().exp())  # (N, V)
    # The per-token route and the reduced loss agree (up to float64 rounding).
    torch.testing.assert_close(logits.grad, per_token_grads.mean(0), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(loss.detach(), per_token.detach().mean(), rtol=1e-9, atol=1e-12)
    root = math.sqrt(SAMPLES)
    return (
        (per_token.detach().mean(), per_token.detach().std() / root),
        (per_token_grads.mean(0), per_token_grads.std(0) / root),
    )


# estimator, E[value], E[gradient] under gradient="estimator", E[gradient] under "unbiased".
TABLE = {
    "k1": ("kl_policy_ref", "zero", "kl_policy_ref"),
    "k2": ("half_square", "kl_policy_ref", "kl_policy_ref"),
    "k3": ("kl_policy_ref", "kl_ref_policy", "kl_policy_ref"),
}
CELLS = [
    (estimator, gradient, TABLE[estimator][1 if gradient == "estimator" else 2])
    for estimator in TABLE
    for gradient in ("estimator", "unbiased")
]


def test_kl_penalty_world_tells_the_claims_apart(world):
    """The two KL gradients differ, KL(π‖π_ref) is far from 0, and k2's mean is not the KL:
    otherwise the checks below could not fail."""
    exact = world["exact"]
    kl_value, kl_grad = exact["kl_policy_ref"]
    assert float(kl_value) > 0.3
    assert float((kl_grad - exact["kl_ref_policy"][1]).abs().max()) > 0.1
    assert abs(float(exact["half_square"][0] - kl_value)) > 0.05


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_penalty_value_has_the_claimed_expectation(world, estimator):
    (mean, error), _ = monte_carlo(world, estimator, "unbiased")
    claim = TABLE[estimator][0]
    assert_within(mean, error, world["exact"][claim][0], f"{estimator} value")
    if estimator == "k2":  # biased: its mean is ½ E[(log r)²], measurably not the KL
        assert_far(mean, error, world["exact"]["kl_policy_ref"][0], "k2 value vs KL")


@pytest.mark.parametrize(("estimator", "gradient", "claim"), CELLS)
def test_kl_penalty_gradient_has_the_claimed_expectation(world, estimator, gradient, claim):
    _, (mean, error) = monte_carlo(world, estimator, gradient)
    assert_within(mean, error, world["exact"][claim][1], f"{estimator}/{gradient} gradient")
    for other in {"kl_policy_ref", "kl_ref_policy", "zero"} - {claim}:
        assert_far(mean, error, world["exact"][other][1], f"{estimator}/{gradient} vs {other}")


@pytest.mark.parametrize(("estimator", "gradient", "claim"), CELLS)
def test_kl_penalty_importance_weights_recover_the_on_policy_expectations(
    world, estimator, gradient, claim
):
    (value, value_error), (grad, grad_error) = monte_carlo(
        world, estimator, gradient, sampler="old", weighted=True
    )
    label = f"{estimator}/{gradient} from π_old, weighted"
    assert_within(value, value_error, world["exact"][TABLE[estimator][0]][0], label + " value")
    assert_within(grad, grad_error, world["exact"][claim][1], label + " gradient")
    # Without the weights the same samples estimate something else.
    (unweighted, _), (unweighted_grad, _) = monte_carlo(world, estimator, gradient, sampler="old")
    assert_far(
        unweighted, value_error, world["exact"][TABLE[estimator][0]][0], label + " unweighted"
    )
    if claim != "zero":
        assert_far(unweighted_grad, grad_error, world["exact"][claim][1], label + " unweighted")


def test_kl_penalty_formulas_match_the_float64_reference(world):
    tokens = world["samples"]["policy"][:1000]
    logprobs = torch.log_softmax(world["policy_logits"], -1)[tokens].float()
    ref_logprobs = torch.log_softmax(world["ref_logits"], -1)[tokens].float()
    log_ratio = ref_logprobs.double() - logprobs.double()
    expected = {
        "k1": -log_ratio,
        "k2": 0.5 * log_ratio**2,
        "k3": (log_ratio.exp() - 1) - log_ratio,
    }
    for estimator, values in expected.items():
        for gradient in ("estimator", "unbiased"):
            got = dk.rl.kl_penalty(
                logprobs, ref_logprobs, estimator=estimator, gradient=gradient, reduction="none"
            )
            assert got.dtype == torch.float32
            torch.testing.assert_close(got.double(), values, rtol=1e-5, atol=1e-6)
