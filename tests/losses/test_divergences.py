"""Every divergence against the naive float64 reference, values and gradients, plus properties."""

from __future__ import annotations

import itertools

import pytest
import torch
from loss_helpers import GRAD_TOLERANCE, assert_close, assert_values, logits, reference

import darkknowledge as dk
from darkknowledge.losses.divergences import per_position_divergence
from darkknowledge.losses.transforms import soften

# (kind, options): both JSD endpoints and an interior beta, two skews.
KINDS = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("jsd", {"beta": 0.0}),
    ("jsd", {"beta": 0.3}),
    ("jsd", {"beta": 1.0}),
    ("skew_kl", {"lam": 0.1}),
    ("skew_reverse_kl", {"lam": 0.5}),
    ("tvd", {}),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(3, 47, 31, 123), (5, 7)]
TEMPERATURES = [0.5, 1.0, 2.0, 4.0, 10.0, 100.0]


def _cases():
    """Every kind x dtype on a small odd shape, and every kind once on the large awkward shape
    (dtype cycling); temperature and mask cycle so that every value occurs."""
    combos = [(k, o, d, SHAPES[1]) for (k, o), d in itertools.product(KINDS, DTYPES)]
    combos += [(k, o, DTYPES[i % 3], SHAPES[0]) for i, (k, o) in enumerate(KINDS)]
    for i, (kind, options, dtype, shape) in enumerate(combos):
        temperature, masked = TEMPERATURES[i % 6], i % 2 == 0
        name = f"{kind}{options}-{str(dtype)[6:]}-{'x'.join(map(str, shape))}-T{temperature}-mask{masked}"
        yield pytest.param(kind, options, dtype, shape, temperature, masked, id=name)


def _check_against_reference(kind, options, dtype, shape, temperature, masked, reduction="mean"):
    student = logits(*shape, dtype=dtype, seed=1).requires_grad_(True)
    teacher = logits(*shape, dtype=dtype, seed=2)
    mask = None
    if masked:
        mask = torch.rand(shape[:-1], generator=torch.Generator().manual_seed(3)) < 0.7
    value = dk.divergence(
        student,
        teacher,
        kind=kind,
        temperature=temperature,
        mask=mask,
        reduction=reduction,
        **options,
    )
    weights = torch.rand(
        value.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4)
    )
    (value.double() * weights).sum().backward()

    ref_student = student.detach().double().requires_grad_(True)
    p = reference.softmax(teacher.double(), temperature)
    q = reference.softmax(ref_student, temperature)
    per_position = reference.DIVERGENCES[kind](p, q, **options)
    valid = torch.ones(shape[:-1], dtype=torch.bool) if mask is None else mask
    expected = reference.reduce(per_position, valid, reduction)
    (expected * weights).sum().backward()

    assert_values(value, expected.detach(), dtype, what=f"{kind} value")
    # math in float32 (float64 for float64 input) whatever the input dtype
    assert value.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert student.grad.dtype == dtype
    assert_close(student.grad, ref_student.grad, GRAD_TOLERANCE[dtype], f"{kind} gradient")


@pytest.mark.parametrize(
    ("kind", "options", "dtype", "shape", "temperature", "masked"), list(_cases())
)
def test_divergence_matches_reference(kind, options, dtype, shape, temperature, masked):
    _check_against_reference(kind, options, dtype, shape, temperature, masked)


@pytest.mark.parametrize(("kind", "options"), KINDS)
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_divergence_matches_reference_at_every_temperature_in_float64(kind, options, temperature):
    _check_against_reference(kind, options, torch.float64, (4, 9), temperature, masked=True)


@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize(("kind", "options"), KINDS)
def test_divergence_reductions_match_reference(kind, options, reduction):
    _check_against_reference(
        kind, options, torch.float32, (6, 5, 11), 2.0, masked=True, reduction=reduction
    )


@pytest.mark.parametrize(("kind", "options"), KINDS)
def test_divergence_is_nonnegative_and_zero_for_identical_inputs(kind, options):
    student, teacher = logits(64, 50, seed=5), logits(64, 50, seed=6)
    values = dk.divergence(
        student, teacher, kind=kind, temperature=2.0, reduction="none", **options
    )
    assert values.min() >= -1e-6
    assert values.max() > 1e-3  # different inputs: a strictly positive divergence
    same = dk.divergence(
        student, student.clone(), kind=kind, temperature=2.0, reduction="none", **options
    )
    assert same.abs().max() <= 1e-6


def test_jsd_endpoints_are_forward_and_reverse_kl():
    """TRL's generalized_jsd_loss convention: beta = 0 is KL(p‖q), beta = 1 is KL(q‖p)."""
    student, teacher = logits(8, 20, seed=7), logits(8, 20, seed=8)
    forward = dk.divergence(student, teacher, kind="forward_kl", temperature=3.0)
    reverse = dk.divergence(student, teacher, kind="reverse_kl", temperature=3.0)
    assert torch.equal(
        dk.divergence(student, teacher, kind="jsd", beta=0.0, temperature=3.0), forward
    )
    assert torch.equal(
        dk.divergence(student, teacher, kind="jsd", beta=1.0, temperature=3.0), reverse
    )
    assert not torch.allclose(forward, reverse)  # the two ends really differ here


def test_jsd_interior_is_symmetric_at_one_half_and_bounded_by_log_two():
    student, teacher = logits(8, 20, seed=9), logits(8, 20, seed=10)
    a = dk.divergence(student, teacher, kind="jsd", beta=0.5, reduction="none")
    b = dk.divergence(teacher, student, kind="jsd", beta=0.5, reduction="none")
    torch.testing.assert_close(a, b)
    assert a.max() <= torch.log(torch.tensor(2.0)) + 1e-6


def test_skew_kl_at_lam_zero_is_forward_kl():
    student, teacher = logits(8, 20, seed=11), logits(8, 20, seed=12)
    skew = dk.divergence(student, teacher, kind="skew_kl", lam=0.0)
    torch.testing.assert_close(skew, dk.divergence(student, teacher, kind="forward_kl"))
    skew_reverse = dk.divergence(student, teacher, kind="skew_reverse_kl", lam=0.0)
    torch.testing.assert_close(skew_reverse, dk.divergence(student, teacher, kind="reverse_kl"))


@pytest.mark.parametrize(("kind", "options"), KINDS)
def test_divergence_with_masked_vocabulary_entries_has_no_nan_and_equals_the_sliced_vocabulary(
    kind, options
):
    """-inf in teacher and student at the same places is the same as removing those classes."""
    student = logits(6, 3, 12, seed=13)
    teacher = logits(6, 3, 12, seed=14)
    masked = torch.zeros(6, 3, 12, dtype=torch.bool)
    masked[..., 9:] = True  # padded vocabulary rows
    masked[0, 0, 2] = True  # and a banned token in one position
    full_s = student.masked_fill(masked, float("-inf")).requires_grad_(True)
    full_t = teacher.masked_fill(masked, float("-inf"))
    value = dk.divergence(full_s, full_t, kind=kind, temperature=2.0, **options)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(full_s.grad).all()
    assert (full_s.grad[masked] == 0).all()

    sliced_s = student[..., :9].clone()
    sliced_s[0, 0, 2] = float("-inf")
    sliced_s.requires_grad_(True)
    sliced_t = teacher[..., :9].clone()
    sliced_t[0, 0, 2] = float("-inf")
    expected = dk.divergence(sliced_s, sliced_t, kind=kind, temperature=2.0, **options)
    expected.backward()
    torch.testing.assert_close(value, expected)
    torch.testing.assert_close(full_s.grad[..., :9], sliced_s.grad)


@pytest.mark.parametrize(("kind", "options"), KINDS)
def test_divergence_of_large_bfloat16_logits_is_finite(kind, options):
    student = logits(4, 300, dtype=torch.bfloat16, seed=15, scale=1e4).requires_grad_(True)
    teacher = logits(4, 300, dtype=torch.bfloat16, seed=16, scale=1e4)
    value = dk.divergence(student, teacher, kind=kind, temperature=1.0, **options)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(student.grad.float()).all()


def test_per_position_divergence_takes_log_probs_and_sums_over_classes():
    """The building block the fused loss imports: (..., C) log-probs -> (...), no 1/C."""
    student, teacher = logits(2, 3, 17, seed=17), logits(2, 3, 17, seed=18)
    log_q, log_p = soften(student, 1.5), soften(teacher, 1.5)
    value = per_position_divergence(log_q, log_p, "forward_kl")
    expected = reference.kl(reference.softmax(teacher, 1.5), reference.softmax(student, 1.5))
    assert value.shape == (2, 3)
    torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-6)
