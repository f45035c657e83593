"""soften, logit standardisation and decoupled KD against the float64 reference."""

from __future__ import annotations

import pytest
import torch
from loss_helpers import logits, reference

from darkknowledge.losses.divergences import kl
from darkknowledge.losses.transforms import decoupled_kd, soften, standardize_logits


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 7.0, 100.0])
def test_soften_is_log_softmax_over_t_in_float32_or_better(dtype, temperature):
    z = logits(5, 3, 11, dtype=dtype, seed=1)
    out = soften(z, temperature)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    expected = reference.softmax(z, temperature).log()
    tolerance = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=tolerance)


def test_soften_takes_a_per_position_temperature():
    z = logits(4, 3, 6, seed=1)
    temperature = torch.tensor([[1.0, 2.0, 3.0]]).expand(4, 3)
    out = soften(z, temperature)
    for j, t in enumerate((1.0, 2.0, 3.0)):
        torch.testing.assert_close(out[:, j], soften(z[:, j], t))


def test_soften_turns_minus_inf_into_zero_probability_with_finite_log():
    z = torch.tensor([[0.0, float("-inf"), 1.0], [float("-inf")] * 3])
    out = soften(z, 0.5)
    assert torch.isfinite(out).all()
    assert out.exp()[0, 1] == 0.0
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(2))  # all -inf: uniform, not NaN


def test_soften_does_not_modify_its_input():
    z = torch.tensor([0.0, float("-inf"), 1.0])
    soften(z, 2.0)
    assert torch.isneginf(z[1])


def test_standardize_logits_matches_reference_values_and_gradients():
    z = logits(6, 13, dtype=torch.float64, seed=1).requires_grad_(True)
    weights = logits(6, 13, dtype=torch.float64, seed=2)
    (standardize_logits(z) * weights).sum().backward()
    ref_z = z.detach().clone().requires_grad_(True)
    expected = reference.standardize(ref_z)
    (expected * weights).sum().backward()
    torch.testing.assert_close(standardize_logits(z.detach()), expected.detach())
    torch.testing.assert_close(z.grad, ref_z.grad)


def test_standardize_logits_is_invariant_to_shift_and_scale():
    z = logits(4, 9, dtype=torch.float64, seed=1)
    torch.testing.assert_close(
        standardize_logits(3.0 * z + 5.0), standardize_logits(z), rtol=1e-6, atol=1e-6
    )


def test_standardize_logits_of_a_constant_row_and_minus_inf_has_no_nan_gradient():
    z = torch.tensor([[2.0, 2.0, 2.0], [1.0, float("-inf"), 3.0]], requires_grad=True)
    out = standardize_logits(z)
    assert torch.isneginf(out[1, 1]) and torch.isfinite(out[0]).all()
    torch.testing.assert_close(out[1, [0, 2]], torch.tensor([-1.0, 1.0]))  # over finite entries
    soften(z, 1.0, standardize=True).sum().backward()
    assert torch.isfinite(z.grad).all()


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_decoupled_kd_matches_reference_values_and_gradients(temperature):
    student = logits(7, 10, dtype=torch.float64, seed=1).requires_grad_(True)
    teacher = logits(7, 10, dtype=torch.float64, seed=2)
    target = torch.randint(10, (7,), generator=torch.Generator().manual_seed(3))
    weights = (1.0, 8.0)
    value = decoupled_kd(
        soften(student, temperature), soften(teacher, temperature), target, *weights
    )
    value.sum().backward()
    ref_student = student.detach().clone().requires_grad_(True)
    p, q = reference.softmax(teacher, temperature), reference.softmax(ref_student, temperature)
    expected = reference.dkd(p, q, target, *weights)
    expected.sum().backward()
    torch.testing.assert_close(value, expected.detach())
    torch.testing.assert_close(student.grad, ref_student.grad)


def test_decoupled_kd_recombines_into_plain_kd():
    """Zhao et al. (2022), eq. 7: KL(p‖q) = TCKD + (1 − p_target)·NCKD."""
    student, teacher = (
        logits(9, 12, dtype=torch.float64, seed=1),
        logits(9, 12, dtype=torch.float64, seed=2),
    )
    target = torch.randint(12, (9,), generator=torch.Generator().manual_seed(3))
    log_q, log_p = soften(student, 2.0), soften(teacher, 2.0)
    tckd = decoupled_kd(log_q, log_p, target, 1.0, 0.0)
    nckd = decoupled_kd(log_q, log_p, target, 0.0, 1.0)
    p_target = log_p.exp().gather(-1, target.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(tckd + (1 - p_target) * nckd, kl(log_p, log_q))
