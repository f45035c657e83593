"""Fuzz sparse_kd_loss, fused_linear_sparse_kd_loss, rl.kl_penalty and
speculative.acceptance_rate with hypothesis, as test_fuzz_losses.py does the dense losses:
valid inputs must match a float64 reference, each listed way of breaking one input must get a
ValueError/TypeError naming an argument."""

from __future__ import annotations

import math

import torch
from fuzz_helpers import FUZZ, answer, assert_matches, reference, seeds, tensor
from hypothesis import given
from hypothesis import strategies as st

import darkknowledge as dk
from darkknowledge import speculative


def sparse_teacher(seed: int, lead: tuple[int, ...], vocab: int, k: int, representation: str):
    """``(ids, values)``: the top-k ids and their T = 1 log-probabilities, or ``k`` sampled
    distinct ids and their counts; the last column of the first row padded (id -1)."""
    probs = torch.softmax(tensor(seed, (*lead, vocab), torch.float64), -1)
    if representation == "topk":
        values, ids = probs.topk(k, dim=-1)
        values = values.log()
    else:
        generator = torch.Generator().manual_seed(seed)
        ids = torch.rand((*lead, vocab), generator=generator).argsort(-1)[..., :k].sort(-1).values
        values = torch.randint(1, 5, ids.shape, generator=generator).double()
    ids, values = ids.clone(), values.float().clone()
    if k > 1:
        ids.view(-1, k)[0, -1], values.view(-1, k)[0, -1] = -1, 0.0
    return ids, values


SPARSE_BREAKS = {
    "float ids": lambda x: {**x, "teacher_ids": x["teacher_ids"].float()},
    "an id = V": lambda x: {**x, "teacher_ids": x["teacher_ids"].clone().fill_(x["student_logits"].shape[-1])},
    "ids and values of different widths": lambda x: {**x, "teacher_values": x["teacher_values"][..., :0]},
    "unknown representation": lambda x: {**x, "representation": "dense"},
    "unknown tail": lambda x: {**x, "tail": "rest"},
    "alpha 1.5": lambda x: {**x, "alpha": 1.5},
    "temperature 0": lambda x: {**x, "temperature": 0.0},
}  # fmt: skip


@FUZZ
@given(st.data())
def test_sparse_kd_loss_fuzz(data):
    lead = tuple(data.draw(st.lists(st.integers(1, 3), min_size=1, max_size=2)))
    vocab = data.draw(st.integers(2, 6))
    k = data.draw(st.integers(1, vocab))
    representation = data.draw(st.sampled_from(["topk", "topk", "sampled"]))
    seed = data.draw(seeds)
    ids, values = sparse_teacher(seed, lead, vocab, k, representation)
    inputs = {
        "student_logits": tensor(seed + 1, (*lead, vocab)),
        "teacher_ids": ids,
        "teacher_values": values,
        "representation": representation,
        "temperature": 1.0 if representation == "sampled" else data.draw(st.floats(0.5, 4.0)),
        "alpha": 1.0,
        "tail": data.draw(st.sampled_from(["bucket", "none"])),
    }
    broken = data.draw(st.sampled_from([None] * len(SPARSE_BREAKS) + sorted(SPARSE_BREAKS)))
    if broken == "temperature 0" and representation == "sampled":
        broken = None
    inputs = SPARSE_BREAKS[broken](inputs) if broken else inputs
    if representation == "topk" and broken is None and data.draw(st.booleans()):
        inputs["teacher_values"] = inputs["teacher_values"].abs() + 0.5  # logits, not log p
        broken = "positive log-probabilities"
    student = inputs.pop("student_logits").requires_grad_()
    ids, values = inputs.pop("teacher_ids"), inputs.pop("teacher_values")
    loss = answer(dk.sparse_kd_loss, student, ids, values, invalid=broken, **inputs)
    if loss is None:
        return
    reference_student = student.detach().double().requires_grad_()
    expected = reference.sparse_kd(reference_student, ids, values, **inputs)
    for name, actual, wanted in zip(("total", "soft", "hard"), loss, expected):
        assert_matches(actual, wanted, torch.float32, name)
    loss.total.backward()
    expected[0].backward()
    assert_matches(student.grad, reference_student.grad, torch.float32, "gradient")


@FUZZ
@given(st.data())
def test_fused_linear_sparse_kd_loss_fuzz(data):
    rows, width, vocab = (data.draw(st.integers(n, m)) for n, m in ((1, 6), (1, 4), (2, 6)))
    k = data.draw(st.integers(1, vocab))
    seed = data.draw(seeds)
    ids, values = sparse_teacher(seed, (rows,), vocab, k, "topk")
    hidden = tensor(seed + 1, (rows, width), scale=1.0).requires_grad_()
    weight = tensor(seed + 2, (vocab, width)).requires_grad_()
    temperature, chunk_size = data.draw(st.floats(0.5, 4.0)), data.draw(st.integers(0, 4))
    broken = "chunk_size 0" if chunk_size == 0 else None
    loss = answer(
        dk.fused_linear_sparse_kd_loss, hidden, weight, ids, values, alpha=1.0,
        temperature=temperature, chunk_size=chunk_size, invalid=broken,
    )  # fmt: skip
    if loss is None:
        return
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    expected = reference.sparse_kd(h64 @ w64.T, ids, values, temperature=temperature, alpha=1.0)
    assert_matches(loss.total, expected[0], torch.float32, "total")
    loss.total.backward()
    expected[0].backward()
    assert_matches(hidden.grad, h64.grad, torch.float32, "hidden gradient")
    assert_matches(weight.grad, w64.grad, torch.float32, "weight gradient")


def kl_reference(logprobs, ref_logprobs, estimator, mask, policy_logits, ref_logits):
    """Schulman's estimators (and the exact KL) in float64, mean over the valid tokens."""
    if estimator == "full":
        per_token = reference.kl(reference.softmax(policy_logits), reference.softmax(ref_logits))
    else:
        log_ratio = ref_logprobs.double() - logprobs.double()  # log r
        per_token = {
            "k1": -log_ratio,
            "k2": 0.5 * log_ratio**2,
            "k3": log_ratio.exp() - 1 - log_ratio,
        }[estimator]
    valid = torch.ones(per_token.shape, dtype=torch.bool) if mask is None else mask
    return reference.reduce(per_token, valid, "mean")


@FUZZ
@given(st.data())
def test_kl_penalty_fuzz(data):
    lead = tuple(data.draw(st.lists(st.integers(1, 4), min_size=1, max_size=2)))
    seed, vocab = data.draw(seeds), data.draw(st.integers(2, 5))
    estimator = data.draw(st.sampled_from(["k1", "k2", "k3", "full"]))
    policy_logits, ref_logits = tensor(seed, (*lead, vocab)), tensor(seed + 1, (*lead, vocab))
    tokens = torch.randint(0, vocab, lead, generator=torch.Generator().manual_seed(seed))
    logprobs = policy_logits.log_softmax(-1).gather(-1, tokens[..., None])[..., 0]
    ref_logprobs = ref_logits.log_softmax(-1).gather(-1, tokens[..., None])[..., 0]
    mask = None if data.draw(st.booleans()) else torch.rand(lead) > 0.3
    inputs = {
        "estimator": estimator,
        "mask": mask,
        "gradient": data.draw(st.sampled_from(["unbiased", "estimator"])),
    }
    if estimator == "full":
        inputs.update(policy_logits=policy_logits, ref_logits=ref_logits)
        logprobs = ref_logprobs = None
    breaks = {
        "unknown estimator": lambda: inputs.update(estimator="k4"),
        "unknown gradient": lambda: inputs.update(gradient="exact"),
        "float mask": lambda: inputs.update(mask=torch.ones(lead)),
        "logits without estimator full": lambda: inputs.update(estimator="k1", policy_logits=policy_logits, ref_logits=ref_logits),
    }  # fmt: skip
    broken = data.draw(st.sampled_from([None] * len(breaks) + sorted(breaks)))
    if broken == "logits without estimator full" and estimator == "full":
        broken = None
    if broken:
        breaks[broken]()
        if broken == "logits without estimator full":
            logprobs, ref_logprobs = tensor(seed, lead), tensor(seed + 1, lead)
    value = answer(dk.rl.kl_penalty, logprobs, ref_logprobs, invalid=broken, **inputs)
    if value is not None:
        expected = kl_reference(logprobs, ref_logprobs, estimator, mask, policy_logits, ref_logits)
        assert_matches(value, expected, torch.float32, estimator)


@FUZZ
@given(st.data())
def test_acceptance_rate_fuzz(data):
    lead = tuple(data.draw(st.lists(st.integers(1, 3), min_size=1, max_size=2)))
    seed, vocab = data.draw(seeds), data.draw(st.integers(1, 6))
    p = torch.softmax(tensor(seed, (*lead, vocab)), -1)
    q = torch.softmax(tensor(seed + 1, (*lead, vocab)), -1)
    mask = None if data.draw(st.booleans()) else torch.rand(lead) > 0.3
    breaks = {
        "logits, not probabilities": lambda: (tensor(seed, (*lead, vocab)), q, mask),
        "rows summing to 2": lambda: (p * 2, q, mask),
        "a NaN": lambda: (p, q.clone().fill_(math.nan), mask),
        "another vocabulary": lambda: (
            p,
            torch.softmax(tensor(seed, (*lead, vocab + 1)), -1),
            mask,
        ),
        "float mask": lambda: (p, q, torch.ones(lead)),
    }
    broken = data.draw(st.sampled_from([None] * len(breaks) + sorted(breaks)))
    target, draft, mask = breaks[broken]() if broken else (p, q, mask)
    value = answer(speculative.acceptance_rate, target, draft, mask=mask, invalid=broken)
    if value is not None:
        valid = torch.ones(lead, dtype=torch.bool) if mask is None else mask
        expected = reference.reduce(torch.minimum(p.double(), q.double()).sum(-1), valid, "mean")
        assert_matches(value, expected, torch.float32, "acceptance")
