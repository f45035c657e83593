"""The masked reduction: sum over classes, mean over valid positions, global normalizer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from loss_helpers import logits, reference

import darkknowledge as dk
from darkknowledge.losses import count_valid, reduce_positions, valid_positions

DIVERGENCES = ["forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd"]


def test_kd_loss_sums_over_classes_and_never_divides_by_their_number():
    """One position: the soft term is the whole Σ_c, where KLDivLoss(reduction="mean") is Σ_c / C."""
    student, teacher = logits(1, 1000, seed=1), logits(1, 1000, seed=2)
    soft = dk.kd_loss(student, teacher, temperature=2.0, alpha=1.0).soft
    expected = reference.kl(reference.softmax(teacher, 2.0), reference.softmax(student, 2.0))[0]
    torch.testing.assert_close(soft.double(), expected, rtol=1e-5, atol=1e-6)
    log_q, log_p = F.log_softmax(student / 2.0, -1), F.log_softmax(teacher / 2.0, -1)
    with pytest.warns(UserWarning):  # PyTorch itself warns that "mean" divides by classes
        mean_over_classes = F.kl_div(log_q, log_p, reduction="mean", log_target=True)
    torch.testing.assert_close(soft, 1000 * mean_over_classes, rtol=1e-5, atol=1e-6)


def test_kd_loss_gradient_does_not_shrink_with_more_classes():
    """Tile every class k times: p and q are the same distributions spread over k·C classes, so
    the loss is unchanged and the gradient summed over the k copies equals the original one.
    Any 1/C in the reduction would shrink both by k."""
    student, teacher, labels = logits(6, 10, seed=1), logits(6, 10, seed=2), torch.arange(6)
    small = student.clone().requires_grad_(True)
    small_loss = dk.kd_loss(small, teacher, labels, temperature=3.0, alpha=1.0)
    small_loss.total.backward()
    k = 50
    big = student.repeat(1, k).requires_grad_(True)  # (6, 500): log(k) shifts both equally
    big_loss = dk.kd_loss(big, teacher.repeat(1, k), labels, temperature=3.0, alpha=1.0)
    big_loss.total.backward()
    torch.testing.assert_close(big_loss.total, small_loss.total, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(big.grad.reshape(6, k, 10).sum(1), small.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_micro_batches_with_a_global_normalizer_give_the_one_batch_gradient(divergence):
    """k micro-batches with uneven ignore_index counts, each divided by the global count and
    summed, equal one batch with the mean over all its valid positions."""
    student, teacher = (
        logits(12, 5, 17, dtype=torch.float64, seed=1),
        logits(12, 5, 17, dtype=torch.float64, seed=2),
    )
    labels = torch.randint(17, (12, 5), generator=torch.Generator().manual_seed(3))
    labels[0, :4] = -100  # micro-batch 0: many ignored
    labels[5, 1] = -100  # micro-batch 1: one ignored; micro-batch 2: none
    options = {"temperature": 2.0, "alpha": 0.7, "divergence": divergence}

    whole = student.clone().requires_grad_(True)
    dk.kd_loss(whole, teacher, labels, **options).total.backward()

    parts = student.clone().requires_grad_(True)
    normalizer = sum(count_valid(labels[i : i + 4]) for i in (0, 4, 8))
    assert int(normalizer) == 60 - 5
    for i in (0, 4, 8):
        rows = slice(i, i + 4)
        dk.kd_loss(
            parts[rows], teacher[rows], labels[rows], normalizer=normalizer, **options
        ).total.backward()
    torch.testing.assert_close(parts.grad, whole.grad, rtol=1e-12, atol=1e-15)

    naive = student.clone().requires_grad_(True)  # per-micro-batch means divided by k: wrong
    for i in (0, 4, 8):
        rows = slice(i, i + 4)
        (dk.kd_loss(naive[rows], teacher[rows], labels[rows], **options).total / 3).backward()
    assert not torch.allclose(naive.grad, whole.grad)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_all_positions_masked_gives_zero_loss_and_zero_finite_gradient(divergence, reduction):
    student = logits(3, 4, 9, seed=1).requires_grad_(True)
    teacher = logits(3, 4, 9, seed=2)
    for labels, mask in (
        (torch.full((3, 4), -100), None),
        (torch.zeros(3, 4, dtype=torch.long), torch.zeros(3, 4, dtype=torch.bool)),
        (None, torch.zeros(3, 4, dtype=torch.bool)),
    ):
        student.grad = None
        alpha = 0.5 if labels is not None else 1.0
        out = dk.kd_loss(
            student,
            teacher,
            labels,
            mask=mask,
            temperature=2.0,
            alpha=alpha,
            divergence=divergence,
            reduction=reduction,
        )
        out.total.backward()
        assert [x.item() for x in out] == [0.0, 0.0, 0.0]
        assert torch.isfinite(student.grad).all() and (student.grad == 0).all()


def test_empty_batch_gives_zero():
    student = torch.zeros(0, 7, requires_grad=True)
    out = dk.kd_loss(
        student, torch.zeros(0, 7), torch.zeros(0, dtype=torch.long), temperature=2.0, alpha=0.5
    )
    out.total.backward()
    assert out.total.item() == 0.0 and student.grad.shape == (0, 7)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_kd_loss_with_masked_vocabulary_entries_has_no_nan(divergence):
    student, teacher = logits(4, 6, 20, seed=1), logits(4, 6, 20, seed=2)
    banned = torch.rand(4, 6, 20, generator=torch.Generator().manual_seed(3)) < 0.3
    banned[..., 0] = False  # labels point at class 0, which is never masked
    banned[1, 2, 1:] = True  # a position with a single allowed class
    student = student.masked_fill(banned, float("-inf")).requires_grad_(True)
    teacher = teacher.masked_fill(banned, float("-inf"))
    labels = torch.zeros(4, 6, dtype=torch.long)
    for options in (
        {},
        {"standardize": True},
        {"temperature": torch.tensor(2.0, requires_grad=True)},
    ):
        student.grad = None
        kwargs = {"temperature": 2.0, "alpha": 0.6, "divergence": divergence, **options}
        out = dk.kd_loss(student, teacher, labels, **kwargs)
        out.total.backward()
        assert all(torch.isfinite(x) for x in out), (options, out)
        assert torch.isfinite(student.grad).all() and (student.grad[banned] == 0).all(), options
    if divergence == "forward_kl":
        student.grad = None
        out = dk.kd_loss(
            student, teacher, labels, temperature=2.0, alpha=0.6, dkd_weights=(1.0, 8.0)
        )
        out.total.backward()
        assert torch.isfinite(out.total) and torch.isfinite(student.grad).all()


def test_kd_loss_of_large_bfloat16_logits_is_finite():
    student = logits(8, 500, dtype=torch.bfloat16, seed=1, scale=1e4).requires_grad_(True)
    teacher = logits(8, 500, dtype=torch.bfloat16, seed=2, scale=1e4)
    for divergence in DIVERGENCES:
        student.grad = None
        out = dk.kd_loss(
            student, teacher, torch.arange(8), temperature=1.0, alpha=0.5, divergence=divergence
        )
        out.total.backward()
        assert all(torch.isfinite(x) for x in out) and torch.isfinite(student.grad.float()).all()


def test_reduce_positions_keeps_invalid_inf_and_nan_out_of_the_result():
    per_position = torch.tensor([1.0, float("inf"), 3.0, float("nan")])
    valid = torch.tensor([True, False, True, False])
    assert float(reduce_positions(per_position, valid, "mean")) == 2.0
    assert float(reduce_positions(per_position, valid, "sum")) == 4.0
    assert reduce_positions(per_position, valid, "none").tolist() == [1.0, 0.0, 3.0, 0.0]
    assert float(reduce_positions(per_position, valid, "mean", normalizer=8)) == 0.5
    assert float(reduce_positions(per_position, valid, "mean", normalizer=torch.tensor(8))) == 0.5
    assert float(reduce_positions(torch.tensor([2.0, 4.0]), None, "mean")) == 3.0


def test_reduce_positions_rejects_a_non_positive_normalizer():
    with pytest.raises(ValueError, match=r"normalizer must be > 0.*got 0"):
        reduce_positions(torch.ones(3), None, "mean", normalizer=0)


def test_valid_positions_and_count_valid_combine_labels_and_mask():
    labels = torch.tensor([[1, -100, 2], [3, 4, -100]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    assert valid_positions(labels, mask).tolist() == [[True, False, False], [True, True, False]]
    assert valid_positions(None, None) is None
    assert int(count_valid(labels, mask)) == 3
    assert int(count_valid(labels, ignore_index=2)) == 5
    with pytest.raises(ValueError, match="count_valid needs labels or mask"):
        count_valid()


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_an_ignored_position_whose_logits_are_all_minus_inf_leaks_no_nan(divergence):
    student, teacher = logits(3, 5, seed=1), logits(3, 5, seed=2)
    student[1], teacher[1] = float("-inf"), float("-inf")  # e.g. a padding position
    student.requires_grad_(True)
    labels = torch.tensor([0, -100, 2])
    for temperature in (1.0, 2.0):
        student.grad = None
        out = dk.kd_loss(
            student, teacher, labels, temperature=temperature, alpha=0.5, divergence=divergence
        )
        out.total.backward()
        assert all(torch.isfinite(x) for x in out)
        assert torch.isfinite(student.grad).all() and (student.grad[1] == 0).all()
        kept = dk.kd_loss(
            student[[0, 2]],
            teacher[[0, 2]],
            labels[[0, 2]],
            temperature=temperature,
            alpha=0.5,
            divergence=divergence,
        )
        torch.testing.assert_close(out.total, kept.total)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_student_minus_inf_where_the_teacher_probability_underflows_leaks_no_nan(divergence):
    """The student masks a class to which the teacher gives a probability that rounds to 0."""
    student, teacher = logits(2, 6, seed=1), logits(2, 6, seed=2)
    student[:, 3] = float("-inf")
    teacher[:, 3] = -500.0  # exp(-500) is 0 in float32
    student.requires_grad_(True)
    out = dk.kd_loss(
        student, teacher, torch.tensor([0, 1]), temperature=1.0, alpha=0.5, divergence=divergence
    )
    out.total.backward()
    assert all(torch.isfinite(x) for x in out) and torch.isfinite(student.grad).all()
