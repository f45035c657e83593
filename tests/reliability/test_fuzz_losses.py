"""Fuzz kd_loss, divergence and fused_linear_kd_loss with hypothesis: random shapes, dtypes,
temperatures (floats and per-sample tensors), alphas, labels, masks, divergences and
vocabulary sizes, and then, half of the time, one input broken in one of the ways listed.

A broken input must get a ValueError/TypeError naming an argument; any other input must give
values and gradients equal to the float64 reference of ``tests/reference.py``; a NaN placed
at a position that counts must give a NaN total."""

from __future__ import annotations

import math

import torch
from fuzz_helpers import FUZZ, answer, assert_matches, reference, seeds, tensor
from hypothesis import given
from hypothesis import strategies as st

import darkknowledge as dk
from darkknowledge.losses._checks import DIVERGENCES


def draw_labels(data, lead, classes, alpha):
    """Labels in [0, classes) or -100; None only when alpha = 1 (no hard term)."""
    if alpha == 1.0 and data.draw(st.booleans()):
        return None
    count = math.prod(lead)
    values = data.draw(
        st.lists(st.sampled_from([-100, *range(classes)]), min_size=count, max_size=count)
    )
    return torch.tensor(values, dtype=torch.long).reshape(lead)


def draw_temperature(data, lead):
    if data.draw(st.booleans()):
        return data.draw(st.floats(0.25, 8.0))
    shape = (lead[0],) + (1,) * (len(lead) - 1)  # one per sample, in any float dtype
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    values = torch.rand(shape, generator=torch.Generator().manual_seed(len(lead))) * 4 + 0.5
    return values.to(dtype)


def set_label(labels, value):
    broken = labels.clone()
    broken.view(-1)[0] = value
    return broken


# One way to break a kd_loss input each: (name, inputs -> broken inputs).
KD_BREAKS = {
    "integer logits": lambda x: {**x, "student": x["student"].long()},
    "one class more in the teacher": lambda x: {**x, "teacher": torch.cat([x["teacher"], x["teacher"][..., :1]], -1)},
    "a label = C": lambda x: {**x, "labels": set_label(x["labels"], x["student"].shape[-1])},
    "a label = -1": lambda x: {**x, "labels": set_label(x["labels"], -1)},
    "float labels": lambda x: {**x, "labels": x["labels"].float()},
    "labels of another shape": lambda x: {**x, "labels": x["labels"].reshape(-1, 1, 1)},
    "no labels, alpha 0.5": lambda x: {**x, "labels": None, "alpha": 0.5},
    "alpha 1.5": lambda x: {**x, "alpha": 1.5},
    "alpha NaN": lambda x: {**x, "alpha": math.nan},
    "temperature 0": lambda x: {**x, "temperature": 0.0},
    "temperature -1": lambda x: {**x, "temperature": -1.0},
    "temperature NaN": lambda x: {**x, "temperature": math.nan},
    "temperature inf": lambda x: {**x, "temperature": math.inf},
    "temperature tensor of another size": lambda x: {**x, "temperature": torch.ones(x["student"].shape[0] + 2)},
    "integer temperature tensor": lambda x: {**x, "temperature": torch.tensor(2)},
    "unknown divergence": lambda x: {**x, "divergence": "bogus"},
    "float mask": lambda x: {**x, "mask": torch.ones(x["student"].shape[:-1])},
    "mask of another shape": lambda x: {**x, "mask": torch.ones(7, dtype=torch.bool)},
}  # fmt: skip


def draw_kd_inputs(data, dtype):
    lead = tuple(data.draw(st.lists(st.integers(1, 3), min_size=1, max_size=2)))
    classes = data.draw(st.integers(1, 6))
    seed = data.draw(seeds)
    alpha = data.draw(st.one_of(st.sampled_from([0.0, 0.5, 1.0]), st.floats(0, 1)))
    mask = None
    if data.draw(st.booleans()):
        mask = torch.rand(lead, generator=torch.Generator().manual_seed(seed)) > 0.3
    return {
        "student": tensor(seed, (*lead, classes), dtype),
        "teacher": tensor(seed + 1, (*lead, classes), dtype),
        "labels": draw_labels(data, lead, classes, alpha),
        "temperature": draw_temperature(data, lead),
        "alpha": alpha,
        "divergence": data.draw(st.sampled_from(DIVERGENCES)),
        "mask": mask,
    }


def first_counted(inputs):
    lead = inputs["student"].shape[:-1]
    counted = torch.ones(lead, dtype=torch.bool)
    if inputs["labels"] is not None:
        counted &= inputs["labels"] != -100
    if inputs["mask"] is not None:
        counted &= inputs["mask"]
    found = counted.nonzero()
    return tuple(found[0].tolist()) if len(found) else None


@FUZZ
@given(st.data())
def test_kd_loss_fuzz(data):
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64]))
    inputs = draw_kd_inputs(data, dtype)
    broken = data.draw(st.sampled_from([None] * len(KD_BREAKS) + sorted(KD_BREAKS)))
    label_breaks = ("a label = C", "a label = -1", "float labels", "labels of another shape")
    if broken in label_breaks and inputs["labels"] is None:
        broken = None
    if broken is not None:
        inputs = KD_BREAKS[broken](inputs)
    nan_at = first_counted(inputs) if broken is None and data.draw(st.booleans()) else None
    student = inputs.pop("student").clone()
    if nan_at is not None:
        student[nan_at][0] = math.nan
    student.requires_grad_(student.is_floating_point())
    teacher, labels = inputs.pop("teacher"), inputs.pop("labels")
    loss = answer(dk.kd_loss, student, teacher, labels, invalid=broken, **inputs)
    if loss is None:
        return
    if nan_at is not None:
        assert math.isnan(float(loss.total.detach())), "a NaN at a position that counts was hidden"
        return
    reference_student = student.detach().double().requires_grad_()
    expected = reference.kd_loss(reference_student, teacher, labels, **inputs)
    for name, actual, wanted in zip(("total", "soft", "hard"), loss, expected):
        assert_matches(actual, wanted, dtype, name)
    loss.total.backward()
    expected[0].backward()
    assert_matches(student.grad, reference_student.grad, dtype, "gradient")


@FUZZ
@given(st.data())
def test_divergence_fuzz(data):
    inputs = draw_kd_inputs(data, torch.float32)
    kind = data.draw(st.sampled_from([*DIVERGENCES, "bogus"]))
    beta = data.draw(st.one_of(st.floats(0, 1), st.sampled_from([-0.1, 1.1])))
    temperature = data.draw(st.sampled_from([inputs["temperature"], 0.0, math.nan]))
    invalid = (
        "unknown kind" if kind == "bogus"
        else "beta outside [0, 1]" if not 0 <= beta <= 1
        else "bad temperature" if isinstance(temperature, float) and not temperature > 0
        else None
    )  # fmt: skip
    value = answer(
        dk.divergence, inputs["student"], inputs["teacher"], kind=kind, temperature=temperature,
        beta=beta, mask=inputs["mask"], invalid=invalid,
    )  # fmt: skip
    if value is None:
        return
    p = reference.softmax(inputs["teacher"], temperature)
    q = reference.softmax(inputs["student"], temperature)
    per_position = reference.DIVERGENCES[kind](p, q, beta=beta)
    valid = torch.ones(per_position.shape, dtype=torch.bool)
    if inputs["mask"] is not None:
        valid = inputs["mask"]
    assert_matches(value, reference.reduce(per_position, valid, "mean"), torch.float32, kind)


FUSED_BREAKS = {
    "teacher rows differ, no vocab_size": lambda x: {**x, "teacher_weight": torch.cat([x["teacher_weight"], x["teacher_weight"][:3]])},
    "vocab_size past the rows": lambda x: {**x, "vocab_size": x["student_weight"].shape[0] + 1},
    "hidden width differs from the weight": lambda x: {**x, "student_weight": x["student_weight"][:, :1].repeat(1, 9)},
    "a label = V": lambda x: {**x, "labels": set_label(x["labels"], x["student_weight"].shape[0])},
    "chunk_size 0": lambda x: {**x, "chunk_size": 0},
    "alpha 1.5": lambda x: {**x, "alpha": 1.5},
    "temperature NaN": lambda x: {**x, "temperature": math.nan},
    "unknown divergence": lambda x: {**x, "divergence": "bogus"},
}  # fmt: skip


@FUZZ
@given(st.data())
def test_fused_linear_kd_loss_fuzz(data):
    rows, width, teacher_width, vocab = (data.draw(st.integers(1, n)) for n in (6, 4, 4, 6))
    padding = data.draw(st.sampled_from([0, 0, 2]))  # teacher rows past the shared vocabulary
    seed = data.draw(seeds)
    alpha = data.draw(st.floats(0, 1))
    inputs = {
        "student_hidden": tensor(seed, (rows, width), scale=1.0),
        "student_weight": tensor(seed + 1, (vocab, width)),
        "teacher_hidden": tensor(seed + 2, (rows, teacher_width), scale=1.0),
        "teacher_weight": tensor(seed + 3, (vocab + padding, teacher_width)),
        "labels": draw_labels(data, (rows,), vocab, 0.0),
        "vocab_size": vocab if padding else data.draw(st.sampled_from([None, vocab])),
        "temperature": data.draw(st.floats(0.5, 4.0)),
        "alpha": alpha,
        "divergence": data.draw(st.sampled_from(DIVERGENCES)),
        "chunk_size": data.draw(st.integers(1, 5)),
    }
    broken = data.draw(st.sampled_from([None] * len(FUSED_BREAKS) + sorted(FUSED_BREAKS)))
    if broken == "teacher rows differ, no vocab_size":
        inputs["vocab_size"] = None
    if broken == "hidden width differs from the weight" and width == 9:
        broken = None
    inputs = FUSED_BREAKS[broken](inputs) if broken else inputs
    hidden = inputs.pop("student_hidden").requires_grad_()
    weight = inputs.pop("student_weight").requires_grad_()
    loss = answer(dk.fused_linear_kd_loss, hidden, weight, invalid=broken, **inputs)
    if loss is None:
        return
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    teacher_logits = inputs["teacher_hidden"].double() @ inputs["teacher_weight"].double().T
    options = {key: inputs[key] for key in ("temperature", "alpha", "divergence")}
    expected = reference.kd_loss(
        (h64 @ w64.T), teacher_logits[:, :vocab], inputs["labels"], **options
    )
    for name, actual, wanted in zip(("total", "soft", "hard"), loss, expected):
        assert_matches(actual, wanted, torch.float32, name)
    loss.total.backward()
    expected[0].backward()
    assert_matches(hidden.grad, h64.grad, torch.float32, "hidden gradient")
    assert_matches(weight.grad, w64.grad, torch.float32, "weight gradient")
