"""Bad input raises ValueError/TypeError naming the argument, the value and what is allowed."""

from __future__ import annotations

import pytest
import torch

import darkknowledge as dk

STUDENT, TEACHER, LABELS = torch.randn(4, 6), torch.randn(4, 6), torch.tensor([0, 1, 2, 3])


def kd(**overrides):
    options = {"temperature": 2.0, "alpha": 0.5, **overrides}
    student = options.pop("student", STUDENT)
    teacher = options.pop("teacher", TEACHER)
    labels = options.pop("labels", LABELS)
    return dk.kd_loss(student, teacher, labels, **options)


@pytest.mark.parametrize(
    ("temperature", "error", "match"),
    [
        (0.0, ValueError, r"temperature must be finite and > 0, got temperature=0\.0"),
        (-1.0, ValueError, r"temperature must be finite and > 0, got temperature=-1\.0"),
        (float("nan"), ValueError, r"temperature must be finite and > 0, got temperature=nan"),
        (float("inf"), ValueError, r"temperature must be finite and > 0, got temperature=inf"),
        ("4", TypeError, r"temperature must be a float > 0 or a tensor, got str '4'"),
        (
            torch.tensor([1.0, -2.0, 1.0, 1.0]),
            ValueError,
            r"temperature must be finite and > 0 everywhere, got a tensor holding -2\.0",
        ),
        (
            torch.tensor(3),
            TypeError,
            r"temperature must be a float or a floating-point tensor, got a tensor of dtype torch\.int64",
        ),
    ],
)
def test_bad_temperature(temperature, error, match):
    with pytest.raises(error, match=match):
        kd(temperature=temperature)
    with pytest.raises(error, match=match):
        dk.divergence(STUDENT, TEACHER, kind="forward_kl", temperature=temperature)


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan")])
def test_alpha_outside_unit_interval(alpha):
    with pytest.raises(ValueError, match=rf"alpha must be in \[0, 1\], got alpha={alpha}"):
        kd(alpha=alpha)


def test_alpha_of_wrong_type():
    with pytest.raises(TypeError, match=r"alpha must be a float in \[0, 1\], got str '0\.5'"):
        kd(alpha="0.5")


def test_unknown_divergence_lists_valid_names():
    match = r"unknown divergence 'kl'; valid names are: forward_kl, reverse_kl, jsd, skew_kl, skew_reverse_kl, tvd"
    with pytest.raises(ValueError, match=match):
        kd(divergence="kl")
    with pytest.raises(ValueError, match=r"unknown kind 'kl'; valid names are: forward_kl"):
        dk.divergence(STUDENT, TEACHER, kind="kl")
    with pytest.raises(ValueError, match=r"unknown divergence 'kl'; valid names are"):
        dk.DistillationLoss(temperature=2.0, alpha=0.5, divergence="kl")


def test_class_dimensions_differ():
    match = r"same class dimension \(last\), got 6 and 8; if one vocabulary only adds padding rows, slice"
    with pytest.raises(ValueError, match=match):
        kd(teacher=torch.randn(4, 8))


def test_leading_shapes_differ():
    with pytest.raises(ValueError, match=r"same shape, got \(4, 6\) and \(2, 2, 6\)"):
        kd(teacher=torch.randn(2, 2, 6))


def test_integer_logits():
    with pytest.raises(
        TypeError, match=r"student_logits must be a floating-point tensor, got dtype torch\.int64"
    ):
        kd(student=torch.zeros(4, 6, dtype=torch.long))


def test_labels_of_wrong_shape():
    with pytest.raises(
        ValueError,
        match=r"labels must have the logits' shape without the class dimension, \(4,\), got \(4, 1\)",
    ):
        kd(labels=LABELS.unsqueeze(-1))


def test_labels_out_of_range():
    with pytest.raises(
        ValueError, match=r"labels must be in \[0, 6\) or ignore_index=-100, got a label 6"
    ):
        kd(labels=torch.tensor([0, 1, 6, 3]))
    with pytest.raises(
        ValueError, match=r"labels must be in \[0, 6\) or ignore_index=-100, got a label -1"
    ):
        kd(labels=torch.tensor([0, -1, 2, 3]))
    kd(labels=torch.tensor([0, -100, 2, 3]))  # ignore_index itself is fine


def test_labels_of_float_dtype():
    with pytest.raises(
        TypeError,
        match=r"labels must be an integer tensor of class indices, got dtype torch\.float32",
    ):
        kd(labels=LABELS.float())


def test_mask_not_boolean():
    with pytest.raises(
        TypeError, match=r"mask must be a boolean tensor \(True = keep\), got dtype torch\.int64"
    ):
        kd(mask=torch.ones(4, dtype=torch.long))
    with pytest.raises(
        TypeError, match=r"mask must be a boolean tensor \(True = keep\), got dtype torch\.float32"
    ):
        dk.divergence(STUDENT, TEACHER, mask=torch.ones(4))


def test_mask_of_wrong_shape():
    with pytest.raises(
        ValueError,
        match=r"mask must have the logits' shape without the class dimension, \(4,\), got \(4, 6\)",
    ):
        kd(mask=torch.ones(4, 6, dtype=torch.bool))


def test_labels_none_with_alpha_below_one():
    with pytest.raises(
        ValueError,
        match=r"labels=None with alpha=0\.5: alpha < 1 weights a hard cross-entropy term",
    ):
        kd(labels=None)
    kd(labels=None, alpha=1.0)  # pure distillation is fine


def test_dkd_needs_labels_forward_kl_and_a_pair():
    with pytest.raises(ValueError, match=r"labels=None with dkd_weights"):
        kd(labels=None, alpha=1.0, dkd_weights=(1.0, 8.0))
    with pytest.raises(
        ValueError, match=r"dkd_weights decouples the forward KL; got divergence='jsd'"
    ):
        kd(divergence="jsd", dkd_weights=(1.0, 8.0))
    with pytest.raises(
        TypeError,
        match=r"dkd_weights must be a pair of floats \(tckd_weight, nckd_weight\).*got 8\.0",
    ):
        kd(dkd_weights=8.0)


def test_bad_reduction_beta_lam_and_soft_scale():
    with pytest.raises(
        ValueError, match=r"reduction must be one of 'mean', 'sum', 'none', got 'avg'"
    ):
        kd(reduction="avg")
    with pytest.raises(ValueError, match=r"beta must be in \[0, 1\], got beta=1\.2"):
        kd(divergence="jsd", beta=1.2)
    with pytest.raises(ValueError, match=r"lam must be in \[0, 1\), got lam=1\.0"):
        kd(divergence="skew_kl", lam=1.0)
    with pytest.raises(ValueError, match=r'soft_scale must be "T2", "none" or a float, got \'T\''):
        kd(soft_scale="T")
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="soft_scale must be a finite float >= 0"):
            kd(soft_scale=bad)


def test_distillation_loss_validates_constants_and_options_on_construction():
    with pytest.raises(ValueError, match=r"temperature must be finite and > 0, got temperature=0"):
        dk.DistillationLoss(temperature=0, alpha=0.5)
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\], got alpha=2"):
        dk.DistillationLoss(temperature=2.0, alpha=2)
    with pytest.raises(
        TypeError, match=r"unknown kd_loss options \['temp'\]; valid options are: beta, divergence"
    ):
        dk.DistillationLoss(temperature=2.0, alpha=0.5, temp=3.0)
    loss_fn = dk.DistillationLoss(
        temperature=lambda step: -1.0, alpha=0.5
    )  # a schedule: checked when used
    with pytest.raises(
        ValueError, match=r"temperature must be finite and > 0, got temperature=-1\.0"
    ):
        loss_fn(STUDENT, TEACHER, LABELS, step=3)
