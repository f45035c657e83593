"""LearnableTemperature (CTKD) and the gradient-reversal layer."""

import copy

import pytest
import torch

import darkknowledge as dk
from darkknowledge import schedules
from darkknowledge.temperature import GradientReversal, grad_reverse


def _plain_temperature(module: dk.LearnableTemperature, theta: torch.Tensor) -> torch.Tensor:
    """The same tau, without the gradient reversal."""
    return module.minimum + module.t_range * torch.sigmoid(theta)


# -- gradient reversal --------------------------------------------------------------------


def test_grad_reverse_is_identity_forward():
    x = torch.randn(3, 4)
    torch.testing.assert_close(grad_reverse(x, 0.7), x, rtol=0, atol=0)


@pytest.mark.parametrize("strength", [0.0, 0.3, 2.5])
def test_grad_reverse_gradient_is_minus_strength_times_upstream(strength):
    x = torch.randn(5, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(5, dtype=torch.float64)
    (grad,) = torch.autograd.grad(grad_reverse(x, strength), x, upstream)
    torch.testing.assert_close(grad, -strength * upstream, rtol=0, atol=0)


def test_grad_reverse_gradcheck():
    x = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    # The reversal is a deliberate "wrong" gradient, so gradcheck (which compares with the
    # numerical Jacobian of the identity forward) applies where the two agree: strength -1,
    # and a reversal undone by a second one of reciprocal strength.
    assert torch.autograd.gradcheck(lambda t: GradientReversal.apply(t, -1.0), (x,))
    assert torch.autograd.gradcheck(lambda t: grad_reverse(grad_reverse(t, 0.4), 1 / 0.4), (x,))
    # The backward, v -> -0.4·v, is itself differentiable with respect to the upstream gradient.
    assert torch.autograd.gradgradcheck(lambda t: grad_reverse(t, 0.4), (x,))


# -- the learnable temperature --------------------------------------------------------------


def test_global_temperature_starts_at_initial_and_is_a_scalar():
    module = dk.LearnableTemperature(initial=4.0, minimum=1.0, t_range=19.0)
    tau = module(step=0)
    assert tau.shape == ()
    assert float(tau.detach()) == pytest.approx(4.0, abs=1e-6)
    assert [name for name, _ in module.named_parameters()] == ["theta"]


def test_lambda_follows_the_cosine_curriculum():
    module = dk.LearnableTemperature(lambda_max=2.0, curriculum_steps=100)
    expected = schedules.cosine(0.0, 2.0, 100)
    for step in (0, 1, 25, 50, 99, 100, 1000):
        assert module.current_lambda(step) == expected(step)
    assert module.current_lambda(0) == 0.0
    assert module.current_lambda(50) == pytest.approx(1.0)
    assert module.current_lambda(100) == 2.0 == module.current_lambda(10**6)


@pytest.mark.parametrize("step", [0, 30, 100, 500])
def test_gradient_is_reversed_and_scaled_by_the_current_lambda(step):
    torch.manual_seed(0)
    module = dk.LearnableTemperature(initial=3.0, lambda_max=1.5, curriculum_steps=100)
    student, teacher = torch.randn(6, 5), torch.randn(6, 5)
    labels = torch.randint(5, (6,))

    loss = dk.kd_loss(student, teacher, labels, temperature=module(step=step), alpha=0.9).total
    (reversed_grad,) = torch.autograd.grad(loss, module.theta)

    theta = module.theta.detach().clone().requires_grad_(True)
    plain_loss = dk.kd_loss(
        student, teacher, labels, temperature=_plain_temperature(module, theta), alpha=0.9
    ).total
    (plain_grad,) = torch.autograd.grad(plain_loss, theta)

    assert float(plain_grad) != 0.0
    torch.testing.assert_close(reversed_grad, -module.current_lambda(step) * plain_grad)


@pytest.mark.parametrize(("sign", "bound"), [(1.0, 1.0), (-1.0, 5.0)])
def test_stays_in_range_after_many_adversarial_steps(sign, bound):
    # The unscaled soft loss grows as T falls, so the reversal drives tau down to the minimum;
    # with the loss negated it drives tau up to the maximum. Either way it saturates in range.
    torch.manual_seed(0)
    module = dk.LearnableTemperature(
        initial=2.0, minimum=1.0, t_range=4.0, lambda_max=1.0, curriculum_steps=1
    )
    student, teacher = torch.randn(8, 10), 5 * torch.randn(8, 10)
    seen = []
    for step in range(40):
        tau = module(step=step + 1)
        seen.append(float(tau.detach()))
        loss = dk.kd_loss(student, teacher, temperature=tau, alpha=1.0, soft_scale="none").total
        module.zero_grad()
        (sign * loss).backward()
        with torch.no_grad():
            # A descent step of fixed size however small the gradient (as Adam's roughly is),
            # so theta runs far into the sigmoid's saturation.
            module.theta -= module.theta.grad.sign()
    assert all(1.0 <= t <= 5.0 for t in seen)
    assert seen[-1] == pytest.approx(bound, abs=1e-3)
    assert bool(torch.isfinite(module.theta))


def test_training_a_student_moves_theta_to_increase_the_loss():
    torch.manual_seed(0)
    features, teacher_logits = torch.randn(32, 6), torch.randn(32, 4) * 3
    labels = teacher_logits.argmax(-1)
    student = torch.nn.Linear(6, 4)
    temperature = dk.LearnableTemperature(initial=4.0, lambda_max=1.0, curriculum_steps=2)
    loss_fn = dk.DistillationLoss(temperature=temperature, alpha=0.9)
    optimizer = torch.optim.SGD([*student.parameters(), *loss_fn.parameters()], lr=0.5)
    theta_initial = temperature.theta.detach().clone()

    def loss_with(model: torch.nn.Module, theta: torch.Tensor) -> float:
        with torch.no_grad():
            tau = _plain_temperature(temperature, theta)
            loss = dk.kd_loss(model(features), teacher_logits, labels, temperature=tau, alpha=0.9)
        return float(loss.total)

    for step in range(5):
        student_before = copy.deepcopy(student)
        theta_before = temperature.theta.detach().clone()
        loss = loss_fn(student(features), teacher_logits, labels, step=step).total
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        theta_after = temperature.theta.detach().clone()
        if temperature.current_lambda(step) == 0.0:
            assert torch.equal(theta_after, theta_before)  # the curriculum holds it at first
        else:
            # Against the student the update saw: the temperature's move raised the loss.
            assert loss_with(student_before, theta_after) > loss_with(student_before, theta_before)
    assert not torch.equal(temperature.theta.detach(), theta_initial)


def test_per_sample_shapes_initial_value_and_range():
    torch.manual_seed(0)
    module = dk.LearnableTemperature(initial=4.0, per_sample=True, num_classes=7, hidden=8)
    student, teacher = torch.randn(2, 3, 7), torch.randn(2, 3, 7)
    tau = module(student, teacher, step=0)
    assert tau.shape == (2, 3)
    torch.testing.assert_close(tau, torch.full((2, 3), 4.0))
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.normal_(0, 0.5)
    tau = module(student, teacher, step=0)
    assert tau.unique().numel() == 6  # one temperature per position
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.normal_(0, 10)
    tau = module(student_logits=100 * student, teacher_logits=teacher, step=0)
    assert tau.shape == (2, 3)
    assert bool(((tau >= 1.0) & (tau <= 20.0)).all())  # saturated, still in range


def test_per_sample_plugs_into_kd_loss_and_gets_reversed_gradients():
    torch.manual_seed(0)
    module = dk.LearnableTemperature(
        initial=4.0, per_sample=True, num_classes=5, hidden=4, curriculum_steps=1
    )
    student = torch.randn(4, 5, requires_grad=True)
    teacher, labels = torch.randn(4, 5), torch.randint(5, (4,))
    loss_fn = dk.DistillationLoss(temperature=module, alpha=0.5)
    out = loss_fn(student, teacher, labels, step=3)
    out.total.backward()
    output_layer = module.mlp[-1]
    assert output_layer.weight.grad is not None and bool(output_layer.weight.grad.abs().sum() > 0)
    assert student.grad is not None
    # The temperature reads detached logits: its MLP input carries no gradient to the student.
    tau = module(student, teacher, step=3)
    (grad,) = torch.autograd.grad(tau.sum(), student, allow_unused=True)
    assert grad is None


def test_per_sample_gradient_is_reversed_and_scaled_by_lambda():
    torch.manual_seed(0)
    module = dk.LearnableTemperature(
        initial=3.0, per_sample=True, num_classes=5, hidden=4, lambda_max=0.7, curriculum_steps=10
    )
    with torch.no_grad():
        module.mlp[-1].weight.normal_()  # away from the zero init, so every layer gets a gradient
    student, teacher = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    parameters = list(module.parameters())

    loss = dk.kd_loss(student, teacher, temperature=module(student, teacher, step=4), alpha=1.0)
    reversed_grads = torch.autograd.grad(loss.total, parameters)
    theta = module._predict_theta(student, teacher)  # the same tau, without the reversal
    plain = dk.kd_loss(student, teacher, temperature=_plain_temperature(module, theta), alpha=1.0)
    plain_grads = torch.autograd.grad(plain.total, parameters)

    strength = module.current_lambda(4)
    assert 0 < strength < 0.7
    for reversed_grad, plain_grad in zip(reversed_grads, plain_grads):
        assert float(plain_grad.abs().sum()) > 0
        torch.testing.assert_close(reversed_grad, -strength * plain_grad)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (
            {"initial": 1.0},
            ValueError,
            "initial must be strictly inside \\(minimum, minimum \\+ t_range\\) = \\(1, 20\\), got initial=1.0",
        ),
        ({"initial": 25.0}, ValueError, "got initial=25.0"),
        ({"t_range": 0.0}, ValueError, "t_range must be finite and > 0, got t_range=0.0"),
        (
            {"lambda_max": -1.0},
            ValueError,
            "lambda_max must be finite and >= 0, got lambda_max=-1.0",
        ),
        (
            {"curriculum_steps": 0},
            ValueError,
            "curriculum_steps must be an integer >= 1, got curriculum_steps=0",
        ),
        ({"per_sample": True}, ValueError, "per_sample=True needs num_classes"),
        (
            {"per_sample": True, "num_classes": 3, "hidden": 0},
            ValueError,
            "hidden must be an integer >= 1",
        ),
    ],
)
def test_constructor_errors_name_the_argument(kwargs, error, message):
    with pytest.raises(error, match=message):
        dk.LearnableTemperature(**kwargs)


def test_per_sample_needs_logits_of_the_right_width():
    module = dk.LearnableTemperature(per_sample=True, num_classes=3)
    with pytest.raises(ValueError, match="needs student_logits and teacher_logits"):
        module(step=0)
    with pytest.raises(ValueError, match="shape \\(\\.\\.\\., 3\\)"):
        module(torch.randn(2, 4), torch.randn(2, 4))
