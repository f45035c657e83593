"""A tensor temperature: per sample or per position, never silently broadcast the wrong way."""

from __future__ import annotations

import pytest
import torch
from loss_helpers import logits, reference

import darkknowledge as dk

DIVERGENCES = ["forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd"]


def per_sample_reference(student, teacher, temperature, kind):
    """Mean over samples of D at each sample's own T, in float64, one sample at a time."""
    values = [
        reference.DIVERGENCES[kind](
            reference.softmax(teacher[i], float(temperature[i])),
            reference.softmax(student[i], float(temperature[i])),
        ).mean()
        for i in range(student.shape[0])
    ]
    return torch.stack(values).mean()


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("shape", [(5,), (5, 1)], ids=["(B,)", "(B,1)"])
def test_divergence_per_sample_temperature_on_2d_logits(kind, shape):
    student, teacher = logits(5, 11, dtype=torch.float64, seed=1), logits(5, 11, seed=2).double()
    temperature = torch.tensor([0.5, 1.0, 2.0, 4.0, 8.0], dtype=torch.float64)
    got = dk.divergence(student, teacher, kind=kind, temperature=temperature.reshape(shape))
    expected = per_sample_reference(student, teacher, temperature, kind)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])  # the closed form, and autograd
@pytest.mark.parametrize("shape", [(3, 1), (3, 1, 1)], ids=["(B,1)", "(B,1,1)"])
def test_kd_loss_per_sample_temperature_on_3d_logits(divergence, shape):
    student = logits(3, 3, 7, dtype=torch.float64, seed=1).requires_grad_(True)
    teacher = logits(3, 3, 7, dtype=torch.float64, seed=2)
    labels = torch.randint(7, (3, 3), generator=torch.Generator().manual_seed(3))
    temperature = torch.tensor([0.7, 2.0, 5.0], dtype=torch.float64)
    loss = dk.kd_loss(
        student, teacher, labels, temperature=temperature.reshape(shape), alpha=0.6,
        divergence=divergence,
    )  # fmt: skip
    (grad,) = torch.autograd.grad(loss.total, student)
    ref_student = student.detach().clone().requires_grad_(True)
    expected = reference.kd_loss(
        ref_student, teacher, labels, temperature=temperature[:, None].expand(3, 3), alpha=0.6,
        divergence=divergence,
    )  # fmt: skip
    for got, want in zip(loss, expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    (ref_grad,) = torch.autograd.grad(expected[0], ref_student)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)


def test_temperature_with_fewer_dimensions_than_positions_is_refused():
    """(B,) on (B, L, C) logits would broadcast per position when B == L: ambiguous, refused."""
    student, teacher = torch.randn(4, 4, 6), torch.randn(4, 4, 6)
    labels = torch.zeros(4, 4, dtype=torch.long)
    match = r"temperature of shape \(4,\) does not fit the logits' leading shape \(4, 4\).*\(4, 1\)"
    for call in (
        lambda t: dk.kd_loss(student, teacher, labels, temperature=t, alpha=0.5),
        lambda t: dk.kd_loss(student, teacher, labels, temperature=t, alpha=0.5, divergence="tvd"),
        lambda t: dk.divergence(student, teacher, temperature=t),
    ):
        with pytest.raises(ValueError, match=match):
            call(torch.full((4,), 2.0))
    with pytest.raises(ValueError, match=r"temperature of shape \(3, 1\)"):
        dk.divergence(student, teacher, temperature=torch.full((3, 1), 2.0))
    with pytest.raises(ValueError, match=r"temperature of shape \(4, 4, 2\)"):
        dk.divergence(student, teacher, temperature=torch.full((4, 4, 2), 2.0))


def test_fused_linear_kd_loss_per_sample_temperature():
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 5, 4, dtype=torch.float64, generator=generator)
    weight = torch.randn(9, 4, dtype=torch.float64, generator=generator)
    teacher_hidden = torch.randn(2, 5, 6, dtype=torch.float64, generator=generator)
    teacher_weight = torch.randn(9, 6, dtype=torch.float64, generator=generator)
    labels = torch.randint(9, (2, 5), generator=generator)
    temperature = torch.tensor([[1.5], [4.0]], dtype=torch.float64)
    loss = dk.fused_linear_kd_loss(
        hidden, weight, teacher_hidden, teacher_weight, labels, temperature=temperature,
        alpha=0.7, chunk_size=3,
    )  # fmt: skip
    expected = reference.kd_loss(
        hidden @ weight.T, teacher_hidden @ teacher_weight.T, labels,
        temperature=temperature.expand(2, 5), alpha=0.7,
    )  # fmt: skip
    torch.testing.assert_close(loss.total, expected[0], rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match=r"temperature of shape \(2,\)"):
        dk.fused_linear_kd_loss(
            hidden, weight, teacher_hidden, teacher_weight, labels,
            temperature=temperature.squeeze(-1), alpha=0.7,
        )  # fmt: skip
