"""``estimator="full"``: the exact KL(π ‖ π_ref) from full logits, against ``dk.divergence``,
a naive float64 reference, and the fused loss on hidden states."""

from __future__ import annotations

import pytest
import torch
from rl_helpers import reference

import darkknowledge as dk


def _logits(seed: int, *shape: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return 2.0 * torch.randn(*shape, generator=generator)


@pytest.fixture
def pair():
    policy, ref = _logits(0, 3, 5, 11), _logits(1, 3, 5, 11)
    # A masked vocabulary entry (-inf in both) and a masked position.
    policy[..., 4] = ref[..., 4] = float("-inf")
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1, 2] = mask[2, 0] = False
    return policy, ref, mask


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("gradient", ["unbiased", "estimator"])
def test_kl_penalty_full_equals_divergence_and_the_float64_reference(pair, reduction, gradient):
    policy, ref, mask = pair
    results = {}
    for name in ("kl_penalty", "divergence", "reference"):
        logits = policy.clone().requires_grad_()
        if name == "kl_penalty":
            value = dk.rl.kl_penalty(
                None, None, estimator="full", gradient=gradient, policy_logits=logits,
                ref_logits=ref, mask=mask, reduction=reduction,
            )  # fmt: skip
        elif name == "divergence":
            value = dk.divergence(logits, ref, kind="reverse_kl", mask=mask, reduction=reduction)
        else:
            # KL(q ‖ p) over the vocabulary entries that are not masked (0 · log 0 = 0).
            keep = [c for c in range(ref.shape[-1]) if c != 4]
            q, p = reference.softmax(logits[..., keep]), reference.softmax(ref[..., keep])
            value = reference.reduce(reference.kl(q, p), mask, reduction)
        weights = torch.linspace(0.5, 1.5, value.numel()).view(value.shape).double()
        (value.double() * weights).sum().backward()
        results[name] = (value.detach().double(), logits.grad.double())
    expected_value, expected_grad = results["reference"]
    assert float(expected_value.abs().max()) > 0.1  # not a trivially zero comparison
    for name in ("kl_penalty", "divergence"):
        torch.testing.assert_close(results[name][0], expected_value, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(results[name][1], expected_grad, rtol=2e-5, atol=1e-7)
    torch.testing.assert_close(results["kl_penalty"][0], results["divergence"][0], rtol=0, atol=0)
    torch.testing.assert_close(results["kl_penalty"][1], results["divergence"][1], rtol=0, atol=0)


def test_kl_penalty_full_ignores_the_sampled_logprobs_and_gives_the_reference_no_gradient(pair):
    policy, ref, mask = pair
    logprobs = torch.zeros(3, 5, requires_grad=True)
    ref_logits = ref.clone().requires_grad_()
    value = dk.rl.kl_penalty(
        logprobs, torch.zeros(3, 5), estimator="full", policy_logits=policy.requires_grad_(),
        ref_logits=ref_logits, mask=mask,
    )  # fmt: skip
    value.backward()
    assert logprobs.grad is None and ref_logits.grad is None
    assert policy.grad is not None


def test_kl_penalty_full_matches_the_fused_loss_on_hidden_states():
    """docs/rl.md: at vocabulary scale the same KL comes from the fused loss on hidden states,
    with the masked tokens marked by ignore_index in the labels."""
    tokens, hidden_size, vocab = 37, 8, 50
    generator = torch.Generator().manual_seed(2)
    policy_hidden = torch.randn(tokens, hidden_size, generator=generator)
    policy_weight = torch.randn(vocab, hidden_size, generator=generator)
    ref_hidden = torch.randn(tokens, 6, generator=generator)
    ref_weight = torch.randn(vocab, 6, generator=generator)
    mask = torch.rand(tokens, generator=generator) > 0.2
    sampled = torch.randint(vocab, (tokens,), generator=generator)
    labels = sampled.masked_fill(~mask, -100)  # with alpha = 1 only their validity matters

    results = []
    for fused in (False, True):
        hidden = policy_hidden.clone().requires_grad_()
        weight = policy_weight.clone().requires_grad_()
        if fused:
            value = dk.fused_linear_kd_loss(
                hidden, weight, ref_hidden, ref_weight, labels, divergence="reverse_kl",
                alpha=1.0, soft_scale="none", temperature=1.0, chunk_size=16,
            ).total  # fmt: skip
        else:
            value = dk.rl.kl_penalty(
                None, None, estimator="full", policy_logits=hidden @ weight.T,
                ref_logits=ref_hidden @ ref_weight.T, mask=mask,
            )  # fmt: skip
        value.backward()
        results.append((value.detach(), hidden.grad, weight.grad))
    assert float(results[0][0]) > 0.1
    for direct, fused in zip(*results):
        torch.testing.assert_close(fused, direct, rtol=1e-5, atol=1e-6)
