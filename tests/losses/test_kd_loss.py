"""kd_loss against the float64 reference, its gradient's size in T, alpha, DKD, standardisation."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from loss_helpers import GRAD_TOLERANCE, assert_close, assert_values, logits, reference

import darkknowledge as dk
from darkknowledge.losses.engine import per_position
from darkknowledge.losses.engine.per_position import ForwardKLAndCE

DIVERGENCES = ["forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TEMPERATURES = [0.5, 1.0, 2.0, 4.0, 10.0, 100.0]


def _labels(shape, num_classes, seed=0, ignore_every=5):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(num_classes, shape, generator=generator)
    labels.view(-1)[::ignore_every] = -100  # some ignored positions
    return labels


def _check(shape, dtype, temperature, masked, reduction="mean", **options):
    """kd_loss vs reference.kd_loss: total, soft, hard and d total / d student."""
    student = logits(*shape, dtype=dtype, seed=1).requires_grad_(True)
    teacher = logits(*shape, dtype=dtype, seed=2)
    labels = _labels(shape[:-1], shape[-1])
    mask = None
    if masked:
        mask = torch.rand(shape[:-1], generator=torch.Generator().manual_seed(3)) < 0.7
    out = dk.kd_loss(
        student, teacher, labels, temperature=temperature, mask=mask, reduction=reduction, **options
    )
    weights = torch.rand(
        out.total.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4)
    )
    (out.total.double() * weights).sum().backward()

    ref_student = student.detach().double().requires_grad_(True)
    ref_options = dict(options)
    if "standardize" in ref_options:
        ref_options["standardize_logits"] = ref_options.pop("standardize")
    ref_temperature = temperature.double() if isinstance(temperature, torch.Tensor) else temperature
    total, soft, hard = reference.kd_loss(
        ref_student,
        teacher.double(),
        labels,
        temperature=ref_temperature,
        mask=mask,
        reduction=reduction,
        **ref_options,
    )
    (total * weights).sum().backward()
    t_max = float(torch.as_tensor(temperature).max())
    scale = t_max**2 if options.get("soft_scale", "T2") == "T2" else 1.0
    assert_values(out.soft, soft.detach(), dtype, what="soft")
    assert_values(out.hard, hard.detach(), dtype, what="hard")
    assert_values(out.total, total.detach(), dtype, scale=scale, what="total")
    assert student.grad.dtype == dtype
    assert_close(student.grad, ref_student.grad, GRAD_TOLERANCE[dtype], "gradient")


def _cases():
    combos = [(d, dt, (5, 7)) for d, dt in itertools.product(DIVERGENCES, DTYPES)]
    combos += [(d, DTYPES[i % 3], (3, 47, 31, 123)) for i, d in enumerate(DIVERGENCES[:3])]
    for i, (divergence, dtype, shape) in enumerate(combos):
        temperature, masked, alpha = TEMPERATURES[i % 6], i % 2 == 1, (0.0, 0.3, 0.9, 1.0)[i % 4]
        name = f"{divergence}-{str(dtype)[6:]}-{'x'.join(map(str, shape))}-T{temperature}-a{alpha}-mask{masked}"
        yield pytest.param(divergence, dtype, shape, temperature, masked, alpha, id=name)


@pytest.mark.parametrize(
    ("divergence", "dtype", "shape", "temperature", "masked", "alpha"), list(_cases())
)
def test_kd_loss_matches_reference(divergence, dtype, shape, temperature, masked, alpha):
    _check(shape, dtype, temperature, masked, alpha=alpha, divergence=divergence)


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_kd_loss_matches_reference_in_float64_at_every_temperature(temperature, divergence):
    _check((4, 3, 9), torch.float64, temperature, masked=True, alpha=0.7, divergence=divergence)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("soft_scale", ["T2", "none", 2.5])
def test_kd_loss_reductions_and_soft_scales_match_reference(reduction, soft_scale):
    _check(
        (6, 4, 10),
        torch.float32,
        3.0,
        masked=True,
        reduction=reduction,
        alpha=0.6,
        soft_scale=soft_scale,
    )


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd", "tvd"])
def test_kd_loss_standardized_logits_match_reference(divergence):
    _check(
        (6, 13),
        torch.float64,
        2.0,
        masked=False,
        alpha=0.8,
        divergence=divergence,
        standardize=True,
    )
    _check(
        (6, 13), torch.float32, 2.0, masked=True, alpha=0.8, divergence=divergence, standardize=True
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_kd_loss_decoupled_kd_matches_reference(dtype):
    _check((7, 11), dtype, 4.0, masked=True, alpha=0.9, dkd_weights=(1.0, 8.0))


def test_kd_loss_per_sample_temperature_scales_each_row_by_its_own_t2():
    student, teacher = logits(6, 10, seed=1).requires_grad_(True), logits(6, 10, seed=2)
    labels = torch.arange(6)
    temperature = torch.tensor([0.5, 1.0, 2.0, 4.0, 10.0, 100.0])
    out = dk.kd_loss(student, teacher, labels, temperature=temperature, alpha=1.0, reduction="none")
    for row in range(6):  # each row as if it were alone with its own float temperature
        alone = dk.kd_loss(
            student[row : row + 1],
            teacher[row : row + 1],
            labels[row : row + 1],
            temperature=float(temperature[row]),
            alpha=1.0,
            reduction="none",
        )
        torch.testing.assert_close(out.total[row : row + 1], alone.total)
        torch.testing.assert_close(out.total[row], temperature[row] ** 2 * out.soft[row])
    _check((6, 10), torch.float32, temperature, masked=True, alpha=0.7)
    _check(
        (2, 3, 10),
        torch.float64,
        torch.tensor([[1.5], [3.0]], dtype=torch.float64),
        masked=False,
        alpha=0.7,
    )


def test_kd_loss_learned_temperature_gets_the_reference_gradient():
    """A temperature with requires_grad (LearnableTemperature) goes through the generic path."""
    student, teacher, labels = (
        logits(5, 8, dtype=torch.float64, seed=1),
        logits(5, 8, dtype=torch.float64, seed=2),
        torch.arange(5),
    )
    temperature = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    dk.kd_loss(student, teacher, labels, temperature=temperature, alpha=0.9).total.backward()
    ref_temperature = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    reference.kd_loss(student, teacher, labels, temperature=ref_temperature, alpha=0.9)[
        0
    ].backward()
    torch.testing.assert_close(temperature.grad, ref_temperature.grad)


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_kd_loss_fast_path_equals_generic_path(temperature):
    """forward_kl with a plain temperature runs ForwardKLAndCE; a T with requires_grad runs
    soften + per_position_divergence. Both must agree (values and student gradients)."""
    results = []
    for learned in (False, True):
        student = logits(9, 33, dtype=torch.bfloat16, seed=1).requires_grad_(True)
        teacher = logits(9, 33, dtype=torch.bfloat16, seed=2)
        t = torch.tensor(temperature, requires_grad=True) if learned else temperature
        out = dk.kd_loss(student, teacher, _labels((9,), 33), temperature=t, alpha=0.7)
        out.total.backward()
        results.append((out, student.grad.float()))
    (fast, fast_grad), (generic, generic_grad) = results
    for a, b in zip(fast, generic):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast_grad, generic_grad, rtol=1e-2, atol=1e-4)


@pytest.mark.parametrize(
    "temperature", [1.0, 2.5, torch.tensor([[[0.7]], [[3.0]]], dtype=torch.float64)]
)
@pytest.mark.parametrize("with_labels", [True, False])
def test_forward_kl_and_ce_function_passes_gradcheck(temperature, with_labels, monkeypatch):
    monkeypatch.setattr(per_position, "CHUNK_ELEMENTS", 12)  # two rows per chunk: 3 chunks
    student = logits(2, 3, 6, dtype=torch.float64, seed=1).requires_grad_(True)
    teacher = logits(2, 3, 6, dtype=torch.float64, seed=2)
    student.data[0, 0, 4] = teacher[0, 0, 4] = float("-inf")  # a masked vocabulary entry
    labels = torch.tensor([[0, 1, 2], [3, 4, 5]]) if with_labels else None
    assert torch.autograd.gradcheck(
        lambda s: ForwardKLAndCE.apply(s, teacher, labels, temperature), (student,)
    )


def test_kd_loss_soft_gradient_is_q_minus_p_over_t():
    """d/dz_s of KL(p‖q) summed over positions is (q − p)/T; T² scaling multiplies it by T²."""
    student = logits(4, 12, dtype=torch.float64, seed=1).requires_grad_(True)
    teacher = logits(4, 12, dtype=torch.float64, seed=2)
    for temperature in (0.5, 3.0, 20.0):
        p, q = (
            reference.softmax(teacher, temperature),
            reference.softmax(student.detach(), temperature),
        )
        for soft_scale, factor in (("none", 1.0), ("T2", temperature**2)):
            (grad,) = torch.autograd.grad(
                dk.kd_loss(
                    student,
                    teacher,
                    temperature=temperature,
                    alpha=1.0,
                    soft_scale=soft_scale,
                    reduction="sum",
                ).total,
                student,
            )
            torch.testing.assert_close(grad, factor * (q - p) / temperature, rtol=1e-10, atol=1e-13)


def _soft_gradient(student, teacher, temperature, soft_scale):
    student = student.detach().requires_grad_(True)
    loss = dk.kd_loss(
        student, teacher, temperature=temperature, alpha=1.0, soft_scale=soft_scale, reduction="sum"
    )
    (grad,) = torch.autograd.grad(loss.total, student)
    return grad


def test_kd_loss_t2_scaled_gradient_does_not_depend_on_t_at_high_t():
    """Hinton et al. (2015), eq. 2–4: the soft gradient is (q − p)/T ≈ (z_s − z_t)/(N T²), so
    T² scaling makes its size independent of T; unscaled it falls like 1/T²."""
    num_classes = 50
    student, teacher = (
        logits(16, num_classes, dtype=torch.float64, seed=1, scale=1.0),
        logits(16, num_classes, dtype=torch.float64, seed=2, scale=1.0),
    )
    student, teacher = (
        student - student.mean(-1, keepdim=True),
        teacher - teacher.mean(-1, keepdim=True),
    )
    temperatures = [5.0, 10.0, 20.0, 50.0, 100.0]
    scaled = torch.tensor([_soft_gradient(student, teacher, t, "T2").norm() for t in temperatures])
    assert scaled.max() / scaled.min() < 1.05
    unscaled = torch.tensor(
        [_soft_gradient(student, teacher, t, "none").norm() * t**2 for t in temperatures]
    )
    assert unscaled.max() / unscaled.min() < 1.05  # i.e. the unscaled norm falls like 1/T²
    raw = torch.tensor([_soft_gradient(student, teacher, t, "none").norm() for t in temperatures])
    assert raw[0] / raw[-1] > 0.95 * (100 / 5) ** 2
    # The high-temperature limit for zero-mean logits: (z_s − z_t) / (N T²).
    t = 100.0
    limit = (student - teacher) / (num_classes * t**2)
    torch.testing.assert_close(
        _soft_gradient(student, teacher, t, "none"),
        limit,
        rtol=0.0,
        atol=0.02 * limit.abs().max().item(),
    )
    torch.testing.assert_close(
        _soft_gradient(student, teacher, t, "T2"),
        limit * t**2,
        rtol=0.0,
        atol=0.02 * (limit * t**2).abs().max().item(),
    )


def test_kd_loss_alpha_zero_is_exactly_cross_entropy_and_alpha_one_exactly_the_scaled_soft_term():
    student, teacher = logits(3, 7, 20, seed=1), logits(3, 7, 20, seed=2)
    labels = _labels((3, 7), 20)
    zero = dk.kd_loss(student, teacher, labels, temperature=4.0, alpha=0.0)
    assert torch.equal(zero.total, zero.hard)
    expected = F.cross_entropy(student.reshape(-1, 20), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(zero.hard, expected, rtol=1e-6, atol=0)
    one = dk.kd_loss(student, teacher, labels, temperature=4.0, alpha=1.0)
    assert torch.equal(one.total, 16.0 * one.soft)
    assert torch.equal(one.soft, zero.soft) and torch.equal(one.hard, zero.hard)


def test_kd_loss_is_affine_in_alpha_with_no_jump_anywhere():
    """A fine grid, including the neighbourhoods of 0 and 1: total(alpha) lies on the line
    through total(0) and total(1) (torchdistill's T² jump at a boundary would break this)."""
    student, teacher, labels = logits(8, 30, seed=1), logits(8, 30, seed=2), _labels((8,), 30)

    def at(alpha):
        return dk.kd_loss(student, teacher, labels, temperature=5.0, alpha=alpha).total.double()

    start, end = at(0.0), at(1.0)
    grid = [
        0.0,
        1e-12,
        1e-9,
        1e-6,
        1e-3,
        *torch.linspace(0.01, 0.99, 99).tolist(),
        1 - 1e-6,
        1 - 1e-9,
        1 - 1e-12,
        1.0,
    ]
    for alpha in grid:
        torch.testing.assert_close(
            at(alpha), (1 - alpha) * start + alpha * end, rtol=1e-6, atol=1e-6
        )


def test_kd_loss_without_labels_is_pure_distillation():
    student, teacher = logits(4, 9, seed=1), logits(4, 9, seed=2)
    out = dk.kd_loss(student, teacher, temperature=2.0, alpha=1.0)
    assert float(out.hard) == 0.0
    torch.testing.assert_close(
        out.total, 4.0 * dk.divergence(student, teacher, kind="forward_kl", temperature=2.0)
    )


def test_kd_loss_does_not_backpropagate_into_the_teacher():
    student, teacher = (
        logits(4, 9, seed=1).requires_grad_(True),
        logits(4, 9, seed=2).requires_grad_(True),
    )
    for divergence in ("forward_kl", "jsd"):
        dk.kd_loss(
            student, teacher, torch.arange(4), temperature=2.0, alpha=0.5, divergence=divergence
        ).total.backward()
        assert teacher.grad is None


def test_kd_loss_ignore_index_may_be_any_value_outside_the_classes():
    student, teacher = logits(6, 5, seed=1), logits(6, 5, seed=2)
    labels = torch.tensor([0, 1, 99, 3, 99, 4])
    for divergence in ("forward_kl", "jsd"):
        out = dk.kd_loss(
            student,
            teacher,
            labels,
            temperature=2.0,
            alpha=0.5,
            ignore_index=99,
            divergence=divergence,
        )
        keep = labels != 99
        expected = dk.kd_loss(
            student[keep],
            teacher[keep],
            labels[keep],
            temperature=2.0,
            alpha=0.5,
            divergence=divergence,
        )
        torch.testing.assert_close(out.total, expected.total)


def test_distillation_loss_evaluates_schedules_at_step():
    student, teacher, labels = logits(4, 9, seed=1), logits(4, 9, seed=2), torch.arange(4)
    loss_fn = dk.DistillationLoss(temperature=lambda step: 1.0 + step, alpha=lambda step: step / 10)
    for step in (0, 3, 7):
        got = loss_fn(student, teacher, labels, step=step)
        expected = dk.kd_loss(student, teacher, labels, temperature=1.0 + step, alpha=step / 10)
        assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert loss_fn.current_temperature(4) == 5.0 and loss_fn.current_alpha(4) == 0.4


def test_distillation_loss_passes_options_and_overrides_to_kd_loss():
    student, teacher, labels = logits(4, 9, seed=1), logits(4, 9, seed=2), torch.arange(4)
    loss_fn = dk.DistillationLoss(temperature=2.0, alpha=0.5, divergence="jsd", beta=0.2)
    got = loss_fn(student, teacher, labels, reduction="sum")
    expected = dk.kd_loss(
        student,
        teacher,
        labels,
        temperature=2.0,
        alpha=0.5,
        divergence="jsd",
        beta=0.2,
        reduction="sum",
    )
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_distillation_loss_calls_a_temperature_module_with_logits_and_step():
    class HalfStep(torch.nn.Module):
        def forward(self, student_logits=None, teacher_logits=None, step=0):
            assert student_logits is not None and teacher_logits is not None
            return torch.tensor(1.0 + step / 2)

    student, teacher, labels = logits(4, 9, seed=1), logits(4, 9, seed=2), torch.arange(4)
    got = dk.DistillationLoss(temperature=HalfStep(), alpha=0.5)(student, teacher, labels, step=4)
    torch.testing.assert_close(
        got.total, dk.kd_loss(student, teacher, labels, temperature=3.0, alpha=0.5).total
    )


@pytest.mark.parametrize("temperature", [1.0, 3.0])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])
def test_kd_loss_with_masked_vocabulary_equals_the_sliced_vocabulary(divergence, temperature):
    """Padded vocabulary rows (-inf in both) change nothing: values and gradients as without."""
    student, teacher, labels = (
        logits(5, 4, 12, seed=1),
        logits(5, 4, 12, seed=2),
        _labels((5, 4), 9),
    )
    padded_s = student.clone()
    padded_s[..., 9:] = float("-inf")
    padded_s.requires_grad_(True)
    padded_t = teacher.clone()
    padded_t[..., 9:] = float("-inf")
    sliced_s = student[..., :9].clone().requires_grad_(True)
    options = {"temperature": temperature, "alpha": 0.6, "divergence": divergence}
    padded = dk.kd_loss(padded_s, padded_t, labels, **options)
    padded.total.backward()
    sliced = dk.kd_loss(sliced_s, teacher[..., :9], labels, **options)
    sliced.total.backward()
    for a, b in zip(padded, sliced):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(padded_s.grad[..., :9], sliced_s.grad)
    assert (padded_s.grad[..., 9:] == 0).all()
