"""Schedules: exact values at step 0, at every boundary and past the end; validation."""

import math

import pytest
import torch

import darkknowledge as dk
from darkknowledge import schedules


def test_constant_every_step():
    schedule = schedules.constant(0.9)
    assert [schedule(s) for s in (0, 1, 10**9)] == [0.9, 0.9, 0.9]


def test_linear_endpoints_midpoint_and_hold():
    schedule = schedules.linear(8.0, 2.0, 100)
    assert schedule(0) == 8.0
    assert schedule(25) == 6.5
    assert schedule(50) == 5.0
    assert schedule(100) == 2.0
    assert schedule(101) == 2.0 and schedule(10**6) == 2.0


def test_cosine_is_a_half_cosine_flat_at_both_ends():
    schedule = schedules.cosine(8.0, 2.0, 100)
    assert schedule(0) == 8.0
    assert schedule(50) == pytest.approx(5.0, abs=1e-12)
    # 2 + 6·(1 + cos(π/4))/2
    assert schedule(25) == pytest.approx(2.0 + 3.0 * (1.0 + math.cos(math.pi / 4)), abs=1e-12)
    assert schedule(100) == 2.0 and schedule(5000) == 2.0
    # Flat ends: the first step moves less than a linear schedule would.
    assert 8.0 - schedule(1) < (8.0 - 2.0) / 100


def test_cosine_rising():
    schedule = schedules.cosine(0.0, 1.0, 10)
    assert [schedule(0), schedule(5), schedule(10), schedule(11)] == pytest.approx(
        [0.0, 0.5, 1.0, 1.0]
    )


def test_exponential_is_geometric():
    schedule = schedules.exponential(1.0, 100.0, 10)
    assert schedule(0) == 1.0
    assert schedule(5) == pytest.approx(10.0, rel=1e-12)  # geometric mean, not 50.5
    assert schedule(10) == 100.0 and schedule(99) == 100.0
    ratios = [schedule(s + 1) / schedule(s) for s in range(10)]
    assert ratios == pytest.approx([10 ** (2 / 10)] * 10, rel=1e-12)


def test_step_values_at_each_boundary():
    schedule = schedules.step([4.0, 2.0, 1.0], [10, 20])
    assert [schedule(s) for s in (0, 9, 10, 19, 20, 10**6)] == [4.0, 4.0, 2.0, 2.0, 1.0, 1.0]


def test_join_counts_steps_from_each_boundary():
    first, second = schedules.linear(0.0, 1.0, 10), schedules.linear(1.0, 0.0, 20)
    schedule = schedules.join([first, second, 0.25], [10, 30])
    assert schedule(0) == 0.0
    assert schedule(5) == 0.5
    assert schedule(10) == 1.0  # second schedule at its own step 0
    assert schedule(20) == 0.5  # second schedule at its own step 10
    assert schedule(30) == 0.25  # the constant
    assert schedule(10**6) == 0.25


def test_warmup_cosine_is_a_join_with_exact_boundaries():
    schedule = schedules.warmup_cosine(1.0, warmup_steps=10, total_steps=110, start=0.1, end=0.01)
    assert isinstance(schedule, schedules.Join)
    assert schedule(0) == 0.1
    assert schedule(5) == pytest.approx(0.55)
    assert schedule(10) == 1.0
    assert schedule(60) == pytest.approx(0.505)
    assert schedule(110) == 0.01 and schedule(10**6) == 0.01
    no_warmup = schedules.warmup_cosine(1.0, warmup_steps=0, total_steps=10)
    assert no_warmup(0) == 1.0 and no_warmup(10) == 0.0


def test_as_schedule_wraps_numbers_and_passes_callables():
    assert schedules.as_schedule(3) == schedules.constant(3.0)
    assert schedules.as_schedule(3)(7) == 3.0

    def custom(step: int) -> float:
        return 2.0 * step

    assert schedules.as_schedule(custom) is custom
    with pytest.raises(TypeError, match="value must be a number or a schedule"):
        schedules.as_schedule("4.0")


def test_value_at_evaluates_schedules_and_passes_values_through():
    assert schedules.value_at(0.9, 7) == 0.9 and type(schedules.value_at(0.9, 7)) is float
    assert schedules.value_at(schedules.linear(0.0, 1.0, 10), 5) == 0.5
    assert schedules.value_at(lambda step: 2.0 * step, 3) == 6.0
    tensor = torch.tensor([1.0, 2.0])
    assert schedules.value_at(tensor, 3) is tensor  # a tensor temperature is already a value
    for value in (0.5, schedules.cosine(8.0, 2.0, 100), lambda step: step / 10):
        assert schedules.value_at(value, 40) == schedules.as_schedule(value)(40)


def test_schedules_return_floats_and_accept_integer_like_steps():
    schedule = schedules.linear(0, 1, 4)
    assert type(schedule(2)) is float
    assert schedule(torch.tensor(2)) == 0.5
    assert type(schedules.step([1, 2], [3])(0)) is float


def test_schedules_are_frozen_readable_and_compare_by_value():
    schedule = schedules.cosine(8, 2, 100)
    assert repr(schedule) == "Cosine(start=8.0, end=2.0, steps=100)"
    assert schedule == schedules.cosine(8.0, 2.0, 100)
    with pytest.raises(AttributeError):
        schedule.start = 1.0


@pytest.mark.parametrize(
    "schedule",
    [
        schedules.constant(1.0),
        schedules.linear(0.0, 1.0, 5),
        schedules.cosine(0.0, 1.0, 5),
        schedules.exponential(1.0, 2.0, 5),
        schedules.step([1.0, 2.0], [3]),
        schedules.join([1.0, 2.0], [3]),
    ],
)
def test_negative_step_is_a_value_error(schedule):
    with pytest.raises(ValueError, match="step must be >= 0, got step=-1"):
        schedule(-1)
    with pytest.raises(TypeError, match="step must be an integer"):
        schedule(1.5)


@pytest.mark.parametrize(
    ("build", "error", "message"),
    [
        (lambda: schedules.linear(0.0, 1.0, 0), ValueError, "steps must be >= 1, got steps=0"),
        (lambda: schedules.cosine(0.0, 1.0, 2.5), TypeError, "steps must be an integer"),
        (
            lambda: schedules.linear(math.nan, 1.0, 3),
            ValueError,
            "start must be finite, got start=nan",
        ),
        (lambda: schedules.exponential(0.0, 1.0, 3), ValueError, "start must be finite and > 0"),
        (
            lambda: schedules.exponential(1.0, -1.0, 3),
            ValueError,
            "end must be finite and > 0, got end=-1.0",
        ),
        (lambda: schedules.constant("a"), TypeError, "value must be a real number"),
        (lambda: schedules.step([1.0, 2.0], [3, 4]), ValueError, "one more entry than boundaries"),
        (
            lambda: schedules.step([1.0, 2.0, 3.0], [4, 4]),
            ValueError,
            "strictly increasing, got boundaries=\\[4, 4\\]",
        ),
        (lambda: schedules.step([1.0, 2.0], [0]), ValueError, "boundaries\\[0\\] must be >= 1"),
        (
            lambda: schedules.join([1.0, "x"], [3]),
            TypeError,
            "schedules\\[1\\] must be a number or a schedule",
        ),
        (
            lambda: schedules.warmup_cosine(1.0, 10, 10),
            ValueError,
            "total_steps must be an integer > warmup_steps=10",
        ),
    ],
)
def test_validation_errors_name_the_argument_and_value(build, error, message):
    with pytest.raises(error, match=message):
        build()


def test_from_config_builds_each_kind():
    assert schedules.from_config(4.0) == schedules.constant(4.0)
    assert schedules.from_config(
        {"kind": "cosine", "start": 8, "end": 2, "steps": 100}
    ) == schedules.cosine(8, 2, 100)
    assert schedules.from_config({"kind": "step", "values": [1, 2], "boundaries": [5]})(5) == 2.0
    warm = schedules.from_config(
        {"kind": "warmup_cosine", "peak": 1.0, "warmup_steps": 2, "total_steps": 4}
    )
    assert warm == schedules.warmup_cosine(1.0, 2, 4)


def test_from_config_nested_join_and_does_not_mutate_config():
    config = {
        "kind": "join",
        "boundaries": [10],
        "schedules": [{"kind": "linear", "start": 0.0, "end": 1.0, "steps": 10}, 1.0],
    }
    before = repr(config)
    schedule = schedules.from_config(config)
    assert schedule(5) == 0.5 and schedule(10) == 1.0
    assert repr(config) == before


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"start": 1.0}, "temperature is missing the field 'kind'"),
        ({"kind": "cosin"}, "unknown temperature.kind 'cosin'; valid kinds are: constant, linear"),
        (
            {"kind": "cosine", "start": 8, "end": 2},
            "temperature \\(cosine\\) is missing the field 'steps'",
        ),
        (
            {"kind": "linear", "start": 1, "end": 2, "steps": 3, "stop": 3},
            "unknown field 'stop'; its fields are: start, end, steps",
        ),
        (
            {"kind": "linear", "start": 1, "end": 2, "steps": 0},
            "temperature \\(linear\\): steps must be >= 1, got steps=0",
        ),
        (
            {
                "kind": "join",
                "boundaries": [3],
                "schedules": [1.0, {"kind": "exponential", "start": 0, "end": 1, "steps": 2}],
            },
            "temperature.schedules\\[1\\] \\(exponential\\): start must be finite and > 0",
        ),
    ],
)
def test_from_config_errors_name_the_field(config, message):
    with pytest.raises(ValueError, match=message):
        schedules.from_config(config, "temperature")


def test_distillation_loss_evaluates_a_schedule_at_the_step():
    temperature = schedules.linear(8.0, 2.0, 100)
    loss_fn = dk.DistillationLoss(temperature=temperature, alpha=1.0)
    student, teacher = torch.randn(3, 7), torch.randn(3, 7)
    expected = dk.kd_loss(student, teacher, temperature=5.0, alpha=1.0)
    got = loss_fn(student, teacher, step=50)
    torch.testing.assert_close(got.total, expected.total)
