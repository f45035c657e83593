"""The sampled reverse KL on the chunk engine against a float64 reference, dk.rl.kl_penalty and
the exact reverse-KL gradient it estimates."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import darkknowledge as dk
from darkknowledge.llm import sampled_reverse_kl_loss, token_logprobs

sys.path.insert(0, str(Path(__file__).parents[1]))
import reference


def _logits(hidden, weight, bias, scale, softcap):
    z = scale * (hidden.double() @ weight.double().T + (0 if bias is None else bias.double()))
    return z if softcap is None else softcap * torch.tanh(z / softcap)


def _reference(
    hidden, weight, bias, tokens, teacher_logprobs, *, temperature, weight_soft, scale, softcap
):
    """Value and surrogate in float64, written from the formulas: a = log q(x) − log p(x)."""
    z = _logits(hidden, weight, bias, scale, softcap)  # (N, V)
    valid = tokens != -100
    log_q = reference.softmax(z, temperature).log()  # (N, V)
    picked = log_q.gather(-1, tokens.clamp_min(0).unsqueeze(-1)).squeeze(-1)  # (N,)
    advantage = (picked - teacher_logprobs.double()) * valid
    count = valid.sum().clamp_min(1)
    value = weight_soft * advantage.sum() / count
    surrogate = weight_soft * (advantage.detach() * picked * valid).sum() / count
    return value, surrogate


@pytest.mark.parametrize(
    "temperature, scale, softcap, use_bias",
    [(1.0, 1.0, None, False), (2.0, 0.5, None, True), (0.7, 1.0, 3.0, True)],
)
def test_sampled_reverse_kl_matches_the_float64_reference(temperature, scale, softcap, use_bias):
    torch.manual_seed(0)
    rows, width, vocab = 11, 6, 13  # chunk_size 4: a leftover chunk of 3
    hidden = torch.randn(rows, width, requires_grad=True)
    weight = torch.randn(vocab, width, requires_grad=True)
    bias = torch.randn(vocab, requires_grad=True) if use_bias else None
    tokens = torch.randint(vocab, (rows,))
    tokens[[2, 7]] = -100
    teacher = token_logprobs(
        torch.randn(rows, 9), torch.randn(vocab, 9), tokens, temperature=temperature
    )
    loss = sampled_reverse_kl_loss(
        hidden, weight, tokens, teacher, bias=bias, temperature=temperature, soft_weight=0.45,
        logit_scale=scale, softcap=softcap, chunk_size=4,
    )  # fmt: skip
    inputs = [t for t in (hidden, weight, bias) if t is not None]
    grads = torch.autograd.grad(loss.total, inputs)
    leaves = [t.detach().double().requires_grad_() for t in inputs]
    value, surrogate = _reference(
        leaves[0], leaves[1], leaves[2] if use_bias else None, tokens, teacher,
        temperature=temperature, weight_soft=0.45, scale=scale, softcap=softcap,
    )  # fmt: skip
    expected = torch.autograd.grad(surrogate, leaves)
    torch.testing.assert_close(loss.total.double(), value, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss.soft.double(), value / 0.45, rtol=1e-5, atol=1e-6)
    assert float(loss.hard) == 0.0
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)


def test_sampled_reverse_kl_equals_kl_penalty_k1_unbiased():
    """At T = 1 it is dk.rl.kl_penalty(estimator="k1", gradient="unbiased"): hidden states are
    the logits themselves (an identity output layer), so their gradient is the logits'."""
    torch.manual_seed(1)
    logits = torch.randn(3, 5, 8, requires_grad=True)
    reference_logits = torch.randn(3, 5, 8)
    tokens = torch.randint(8, (3, 5))
    mask = torch.rand(3, 5) > 0.3
    tokens_masked = tokens.masked_fill(~mask, -100)
    ref_logprobs = (
        torch.log_softmax(reference_logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    )
    ours = sampled_reverse_kl_loss(logits, torch.eye(8), tokens_masked, ref_logprobs, chunk_size=6)
    (ours_grad,) = torch.autograd.grad(ours.total, logits)
    policy = torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    theirs = dk.rl.kl_penalty(policy, ref_logprobs, estimator="k1", gradient="unbiased", mask=mask)
    (theirs_grad,) = torch.autograd.grad(theirs, logits)
    torch.testing.assert_close(ours.total, theirs, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ours_grad, theirs_grad, rtol=1e-5, atol=1e-7)


def test_sampled_reverse_kl_expected_gradient_is_the_reverse_kl_gradient():
    """Σ_x q_T(x) · (gradient when x was sampled) = ∇ KL(q_T ‖ p_T), exactly: the estimator is
    unbiased for reverse KL at the loss temperature (no Monte Carlo needed on 6 tokens)."""
    torch.manual_seed(2)
    temperature, vocab = 1.7, 6
    student = torch.randn(1, vocab, dtype=torch.float64)
    teacher = torch.randn(1, vocab, dtype=torch.float64)
    q = reference.softmax(student, temperature)[0]
    log_p = reference.softmax(teacher, temperature).log()[0]
    expected_grad = torch.zeros(vocab, dtype=torch.float64)
    for token in range(vocab):
        hidden = student.clone().requires_grad_()
        loss = sampled_reverse_kl_loss(
            hidden, torch.eye(vocab, dtype=torch.float64), torch.tensor([token]),
            log_p[token].reshape(1), temperature=temperature,
        )  # fmt: skip
        (grad,) = torch.autograd.grad(loss.total, hidden)
        expected_grad += q[token] * grad[0]
    exact = student.clone().requires_grad_()
    kl = reference.reverse_kl(
        reference.softmax(teacher, temperature), reference.softmax(exact, temperature)
    )
    (exact_grad,) = torch.autograd.grad(kl.sum(), exact)
    torch.testing.assert_close(expected_grad, exact_grad[0], rtol=1e-10, atol=1e-12)


def test_token_logprobs_match_log_softmax():
    torch.manual_seed(3)
    hidden, weight, bias = torch.randn(2, 7, 5), torch.randn(11, 5), torch.randn(11)
    tokens = torch.randint(11, (2, 7))
    ours = token_logprobs(
        hidden,
        weight,
        tokens,
        bias=bias,
        temperature=1.5,
        logit_scale=0.8,
        softcap=2.0,
        chunk_size=3,
    )
    z = _logits(hidden, weight, bias, 0.8, 2.0)
    want = reference.softmax(z, 1.5).log().gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(ours.double(), want, rtol=1e-5, atol=1e-6)


def test_sampled_reverse_kl_all_masked_is_zero_with_zero_gradient():
    hidden = torch.randn(4, 3, requires_grad=True)
    tokens = torch.full((4,), -100)
    loss = sampled_reverse_kl_loss(hidden, torch.randn(5, 3), tokens, torch.zeros(4))
    loss.total.backward()
    assert float(loss.total.detach()) == 0.0 and torch.equal(hidden.grad, torch.zeros_like(hidden))
    with pytest.raises(ValueError, match="teacher_logprobs must be a tensor shaped like tokens"):
        sampled_reverse_kl_loss(hidden, torch.randn(5, 3), tokens, torch.zeros(3))
