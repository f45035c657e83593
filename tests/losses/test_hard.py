"""The labels-only losses against a float64 cross-entropy reference, values and gradients."""

from __future__ import annotations

import pytest
import torch
from loss_helpers import GRAD_TOLERANCE, assert_close, assert_values, logits, reference

from darkknowledge.losses import fused_linear_cross_entropy, hard_only_loss


def reference_cross_entropy(student, labels, mask=None, reduction="mean", normalizer=None):
    """The hard part of the float64 reference with alpha = 0 (the teacher is never read)."""
    _, _, hard = reference.kd_loss(
        student, torch.zeros_like(student), labels, temperature=1.0, alpha=0.0, mask=mask,
        reduction=reduction, normalizer=normalizer,
    )  # fmt: skip
    return hard


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_hard_only_loss_matches_reference(dtype, reduction):
    student = logits(3, 5, 17, dtype=dtype, seed=1).requires_grad_(True)
    labels = torch.randint(17, (3, 5), generator=torch.Generator().manual_seed(2))
    labels[0, 1] = labels[2, 4] = -100
    mask = torch.rand(3, 5, generator=torch.Generator().manual_seed(3)) < 0.8
    loss = hard_only_loss(student, labels, mask=mask, reduction=reduction)
    assert not loss.soft.any() and torch.equal(loss.total, loss.hard)
    weights = torch.rand(loss.total.shape, dtype=torch.float64)
    (loss.total.double() * weights).sum().backward()
    ref_student = student.detach().double().requires_grad_(True)
    expected = reference_cross_entropy(ref_student, labels, mask, reduction)
    (expected * weights).sum().backward()
    assert_values(loss.hard, expected.detach(), dtype)
    assert student.grad.dtype == dtype
    assert_close(student.grad, ref_student.grad, GRAD_TOLERANCE[dtype], "gradient")


def test_hard_only_loss_global_normalizer_and_all_masked():
    student = logits(4, 9, dtype=torch.float64, seed=1)
    labels = torch.tensor([1, 2, -100, 3])
    loss = hard_only_loss(student, labels, normalizer=10)
    torch.testing.assert_close(loss.total, reference_cross_entropy(student, labels, normalizer=10))
    empty = hard_only_loss(student.requires_grad_(True), torch.full((4,), -100))
    empty.total.backward()
    assert empty.total.item() == 0.0 and not student.grad.any()


def project(hidden, weight, bias=None, scale=1.0, softcap=None):
    logits = hidden.double() @ weight.double().T
    if bias is not None:
        logits = logits + bias.double()
    logits = logits * scale
    return logits if softcap is None else softcap * torch.tanh(logits / softcap)


@pytest.mark.parametrize(
    "options",
    [{}, {"student_logit_scale": 0.7}, {"student_softcap": 2.0}, {"reduction": "sum"}],
    ids=str,
)
@pytest.mark.parametrize("bias", [False, True])
def test_fused_linear_cross_entropy_matches_reference(options, bias):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 7, 8, dtype=torch.float64, generator=generator).requires_grad_(True)
    weight = torch.randn(33, 8, dtype=torch.float64, generator=generator).requires_grad_(True)
    bias_tensor = torch.randn(33, dtype=torch.float64, generator=generator).requires_grad_(True)
    labels = torch.randint(33, (2, 7), generator=generator)
    labels.view(-1)[::4] = -100
    leaves = [hidden, weight] + ([bias_tensor] if bias else [])
    loss = fused_linear_cross_entropy(
        hidden, weight, labels, student_bias=bias_tensor if bias else None, chunk_size=4, **options
    )
    assert not loss.soft.any()
    grads = torch.autograd.grad(loss.total, leaves)
    reference_leaves = [leaf.detach().clone().requires_grad_(True) for leaf in leaves]
    expected = reference_cross_entropy(
        project(
            *reference_leaves[:2],
            reference_leaves[2] if bias else None,
            options.get("student_logit_scale", 1.0),
            options.get("student_softcap"),
        ),
        labels,
        reduction=options.get("reduction", "mean"),
    )
    torch.testing.assert_close(loss.total, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(loss.hard, expected, rtol=1e-10, atol=1e-12)
    for got, want in zip(grads, torch.autograd.grad(expected, reference_leaves)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


def test_fused_linear_cross_entropy_padding_rows_get_zero_gradient():
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(5, 4, dtype=torch.float64, generator=generator).requires_grad_(True)
    weight = torch.randn(12, 4, dtype=torch.float64, generator=generator).requires_grad_(True)
    labels = torch.tensor([0, 9, 3, -100, 8])
    loss = fused_linear_cross_entropy(hidden, weight, labels, vocab_size=10, chunk_size=2)
    (grad_weight,) = torch.autograd.grad(loss.total, weight)
    expected = reference_cross_entropy(hidden.double() @ weight[:10].double().T, labels)
    torch.testing.assert_close(loss.total, expected)
    assert grad_weight.shape == (12, 4) and not grad_weight[10:].any()


def test_hard_only_losses_refuse_missing_labels():
    with pytest.raises(ValueError, match="needs labels"):
        hard_only_loss(torch.randn(3, 4), None)
    with pytest.raises(ValueError, match="needs labels"):
        fused_linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), None)
