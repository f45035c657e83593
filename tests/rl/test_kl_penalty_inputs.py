"""Reductions, masks, precision and bad input of ``dk.rl.kl_penalty``."""

from __future__ import annotations

import pytest
import torch

import darkknowledge as dk


def _tokens(seed: int = 0, shape=(4, 6)):
    generator = torch.Generator().manual_seed(seed)
    logprobs = -torch.rand(shape, generator=generator) * 3
    ref_logprobs = -torch.rand(shape, generator=generator) * 3
    return logprobs, ref_logprobs


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_penalty_reductions_follow_the_mask_and_normalizer(estimator):
    logprobs, ref_logprobs = _tokens()
    mask = torch.rand(4, 6, generator=torch.Generator().manual_seed(1)) > 0.3
    per_token = dk.rl.kl_penalty(logprobs, ref_logprobs, estimator=estimator, reduction="none")
    log_ratio = (ref_logprobs - logprobs).double()
    formula = {"k1": -log_ratio, "k2": 0.5 * log_ratio**2, "k3": log_ratio.exp() - 1 - log_ratio}
    torch.testing.assert_close(per_token.double(), formula[estimator], rtol=1e-5, atol=1e-6)
    kept = torch.where(mask, formula[estimator], 0.0)
    options = {"estimator": estimator, "mask": mask}
    cases = {
        "mean": (dk.rl.kl_penalty(logprobs, ref_logprobs, **options), kept.sum() / mask.sum()),
        "sum": (dk.rl.kl_penalty(logprobs, ref_logprobs, reduction="sum", **options), kept.sum()),
        "normalizer": (
            dk.rl.kl_penalty(logprobs, ref_logprobs, normalizer=40, **options),
            kept.sum() / 40,
        ),
        "none": (dk.rl.kl_penalty(logprobs, ref_logprobs, reduction="none", **options), kept),
    }
    for name, (got, expected) in cases.items():
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("gradient", ["unbiased", "estimator"])
def test_kl_penalty_masked_padding_with_infinite_logprobs_stays_finite(gradient):
    logprobs, ref_logprobs = _tokens()
    logprobs[0, :2] = float("-inf")  # padding gathered from a masked vocabulary entry
    ref_logprobs[1, 3] = float("-inf")
    mask = torch.isfinite(logprobs) & torch.isfinite(ref_logprobs)
    leaf = logprobs.clone().requires_grad_()
    value = dk.rl.kl_penalty(leaf, ref_logprobs, mask=mask, gradient=gradient)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(leaf.grad).all()
    assert (leaf.grad[~mask] == 0).all() and (leaf.grad[mask] != 0).any()
    all_masked = dk.rl.kl_penalty(
        logprobs.requires_grad_(), ref_logprobs, mask=torch.zeros_like(mask)
    )
    all_masked.backward()
    assert all_masked.item() == 0.0 and (logprobs.grad == 0).all()


def test_kl_penalty_bfloat16_input_is_computed_in_float32():
    logprobs, ref_logprobs = _tokens()
    low = dk.rl.kl_penalty(logprobs.bfloat16(), ref_logprobs.bfloat16(), reduction="none")
    assert low.dtype == torch.float32
    exact = dk.rl.kl_penalty(
        logprobs.bfloat16().double(), ref_logprobs.bfloat16().double(), reduction="none"
    )
    torch.testing.assert_close(low.double(), exact, rtol=1e-6, atol=1e-7)


def test_kl_penalty_reference_gets_no_gradient():
    logprobs, ref_logprobs = _tokens()
    logprobs.requires_grad_()
    ref_logprobs.requires_grad_()
    for gradient in ("unbiased", "estimator"):
        dk.rl.kl_penalty(logprobs, ref_logprobs, gradient=gradient).backward()
    assert ref_logprobs.grad is None and logprobs.grad is not None


LOGPROBS, REF = _tokens()
BAD_INPUT = [
    ({"estimator": "k4"}, ValueError, "unknown estimator 'k4'"),
    ({"gradient": "pathwise"}, ValueError, "unknown gradient 'pathwise'"),
    ({"reduction": "batchmean"}, ValueError, "reduction must be one of"),
    (
        {"ref_logprobs": REF[:, :5]},
        ValueError,
        r"ref_logprobs must have the shape of logprobs, \(4, 6\)",
    ),
    ({"logprobs": LOGPROBS.long()}, TypeError, "logprobs must be a floating-point tensor"),
    ({"ref_logprobs": [0.0]}, TypeError, "ref_logprobs must be a floating-point torch.Tensor"),
    ({"mask": torch.ones(4, 5, dtype=torch.bool)}, ValueError, "mask must have"),
    ({"mask": torch.ones(4, 6)}, TypeError, "mask must be a boolean tensor"),
    ({"importance_weights": torch.ones(6)}, ValueError, "importance_weights must have the shape"),
    ({"importance_weights": -torch.ones(4, 6)}, ValueError, "finite and >= 0"),
    ({"policy_logits": torch.zeros(4, 6, 3)}, ValueError, "used only by estimator='full'"),
    ({"estimator": "full"}, ValueError, "missing: policy_logits, ref_logits"),
    (
        {"estimator": "full", "policy_logits": torch.zeros(4, 6, 3)},
        ValueError,
        "missing: ref_logits",
    ),
    (
        {
            "estimator": "full",
            "policy_logits": torch.zeros(4, 6, 3),
            "ref_logits": torch.zeros(4, 6, 2),
        },
        ValueError,
        "same class dimension",
    ),
    (
        {
            "estimator": "full",
            "policy_logits": torch.zeros(4, 5, 3),
            "ref_logits": torch.zeros(4, 5, 3),
        },
        ValueError,
        r"logprobs must have the logits' shape without the vocabulary dimension, \(4, 5\)",
    ),
    (
        {
            "estimator": "full",
            "policy_logits": torch.zeros(4, 6, 3),
            "ref_logits": torch.zeros(4, 6, 3),
            "importance_weights": torch.ones(4, 6),
        },
        ValueError,
        "does not use",
    ),
]


@pytest.mark.parametrize(("override", "error", "message"), BAD_INPUT)
def test_kl_penalty_rejects_bad_input_naming_the_argument(override, error, message):
    arguments = {"logprobs": LOGPROBS, "ref_logprobs": REF, **override}
    with pytest.raises(error, match=message):
        dk.rl.kl_penalty(arguments.pop("logprobs"), arguments.pop("ref_logprobs"), **arguments)


def test_kl_penalty_k2_gradient_is_the_same_in_both_modes_token_by_token():
    """∇k2 = δ ∇log π is the surrogate's gradient exactly (docs/rl.md), while k1 and k3 differ."""
    logprobs, ref_logprobs = _tokens()
    grads = {}
    for estimator in ("k1", "k2", "k3"):
        for gradient in ("estimator", "unbiased"):
            leaf = logprobs.clone().requires_grad_()
            dk.rl.kl_penalty(leaf, ref_logprobs, estimator=estimator, gradient=gradient).backward()
            grads[estimator, gradient] = leaf.grad
    torch.testing.assert_close(grads["k2", "estimator"], grads["k2", "unbiased"])
    for estimator in ("k1", "k3"):
        assert not torch.allclose(grads[estimator, "estimator"], grads[estimator, "unbiased"])
