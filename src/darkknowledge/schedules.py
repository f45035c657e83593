"""Schedules: plain callables ``step -> float`` for temperature, alpha and learning rate.

Every schedule is a small frozen dataclass with ``__call__``, so configs can build one, its repr
reads like the call that made it, and it compares by value. Composites are joins of primitives
(as in optax): ``warmup_cosine`` is a ``join`` of a ``linear`` warm-up and a ``cosine`` decay.

| schedule                         | value at step s (with r = min(s, steps) / steps)        |
|----------------------------------|----------------------------------------------------------|
| ``constant(value)``              | value                                                    |
| ``linear(start, end, steps)``    | start + (end − start)·r                                  |
| ``cosine(start, end, steps)``    | end + (start − end)·(1 + cos(π·r))/2   (half cosine)     |
| ``exponential(start, end, steps)``| start·(end / start)^r   (geometric; start, end > 0)     |
| ``step(values, boundaries)``     | values[i] for boundaries[i−1] <= s < boundaries[i]       |
| ``join(schedules, boundaries)``  | schedules[i](s − boundaries[i−1]) on the same intervals  |

Past ``steps`` a schedule holds its end value. A negative step is a ``ValueError``.

>>> from darkknowledge import schedules
>>> temperature = schedules.cosine(8.0, 2.0, steps=100)
>>> temperature(0), temperature(50), temperature(100), temperature(1_000)
(8.0, 5.0, 2.0, 2.0)
>>> temperature
Cosine(start=8.0, end=2.0, steps=100)
>>> schedules.from_config({"kind": "linear", "start": 1.0, "end": 0.0, "steps": 10})(5)
0.5
"""

from __future__ import annotations

import bisect
import dataclasses
import inspect
import itertools
import math
import operator
from collections.abc import Callable, Mapping, Sequence
from numbers import Real
from typing import Any, Union

__all__ = [
    "Constant",
    "Cosine",
    "Exponential",
    "Join",
    "Linear",
    "Schedule",
    "Step",
    "as_schedule",
    "constant",
    "cosine",
    "exponential",
    "from_config",
    "join",
    "linear",
    "step",
    "value_at",
    "warmup_cosine",
]

# Anything called with a step and returning a number. The dataclasses below are schedules, and
# so is any user function ``def my_schedule(step: int) -> float``.
Schedule = Callable[[int], float]
FloatOrSchedule = Union[float, Schedule]  # noqa: UP007 (runtime alias, Python 3.10 safe)


def _check_step(step: Any) -> int:
    """The step as an int >= 0 (ints, NumPy ints and 0-dim integer tensors are accepted)."""
    try:
        index = operator.index(step)
    except TypeError:
        raise TypeError(
            f"step must be an integer >= 0, got {type(step).__name__} {step!r}"
        ) from None
    if index < 0:
        raise ValueError(f"step must be >= 0, got step={index}")
    return index


def _check_real(value: Any, name: str, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value) or (positive and value <= 0):
        allowed = "finite and > 0" if positive else "finite"
        raise ValueError(f"{name} must be {allowed}, got {name}={value!r}")
    return value


def _check_count(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer >= 1, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {name}={value!r}")
    return value


def _check_items(items: Any, name: str, check: Callable[[Any, str], Any]) -> tuple:
    """A list or tuple as a tuple, each entry checked (and converted) by ``check``."""
    if isinstance(items, str | bytes) or not isinstance(items, Sequence):
        raise TypeError(f"{name} must be a list or tuple, got {type(items).__name__} {items!r}")
    return tuple(check(item, f"{name}[{i}]") for i, item in enumerate(items))


def _check_pieces(schedule: Any, pieces_name: str, check: Callable[[Any, str], Any]) -> None:
    """Check and freeze the pieces of ``step``/``join`` and their boundaries: strictly
    increasing integers >= 1, one fewer than the pieces they separate."""
    pieces = _check_items(getattr(schedule, pieces_name), pieces_name, check)
    boundaries = _check_items(schedule.boundaries, "boundaries", _check_count)
    if any(later <= earlier for earlier, later in itertools.pairwise(boundaries)):
        raise ValueError(
            f"boundaries must be strictly increasing, got boundaries={list(boundaries)}"
        )
    if len(boundaries) != len(pieces) - 1:
        raise ValueError(
            f"{pieces_name} needs exactly one more entry than boundaries, got {len(pieces)} "
            f"{pieces_name} and {len(boundaries)} boundaries"
        )
    # Frozen dataclasses: object.__setattr__ is the documented way to set fields in __post_init__.
    object.__setattr__(schedule, pieces_name, pieces)
    object.__setattr__(schedule, "boundaries", boundaries)


def _progress(step: int, steps: int) -> float:
    """r = min(step, steps) / steps in [0, 1]: past the end a schedule holds its end value."""
    return min(step, steps) / steps


@dataclasses.dataclass(frozen=True)
class Constant:
    """``value`` at every step."""

    value: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "value", _check_real(self.value, "value"))

    def __call__(self, step: int) -> float:
        _check_step(step)
        return self.value


@dataclasses.dataclass(frozen=True)
class _Interpolation:
    """Shared fields and checks of the schedules that go from ``start`` to ``end`` in ``steps``."""

    start: float
    end: float
    steps: int

    _positive = False  # exponential needs start, end > 0

    def __post_init__(self) -> None:
        for name in ("start", "end"):
            value = _check_real(getattr(self, name), name, positive=self._positive)
            object.__setattr__(self, name, value)
        _check_count(self.steps, "steps")

    def __call__(self, step: int) -> float:
        progress = _progress(_check_step(step), self.steps)
        if progress == 1.0:
            return self.end  # exact, whatever rounding the formula would do
        return self._interpolate(progress)

    def _interpolate(self, progress: float) -> float:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Linear(_Interpolation):
    """``start + (end - start) · r``, r = min(step, steps) / steps."""

    def _interpolate(self, progress: float) -> float:
        return self.start + (self.end - self.start) * progress


@dataclasses.dataclass(frozen=True)
class Cosine(_Interpolation):
    """Half cosine: ``end + (start - end) · (1 + cos(π r)) / 2``; flat at both ends."""

    def _interpolate(self, progress: float) -> float:
        return self.end + (self.start - self.end) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclasses.dataclass(frozen=True)
class Exponential(_Interpolation):
    """Geometric interpolation ``start · (end / start)^r``; start and end must be > 0."""

    _positive = True

    def _interpolate(self, progress: float) -> float:
        return self.start * (self.end / self.start) ** progress


@dataclasses.dataclass(frozen=True)
class Step:
    """Piecewise constant: ``values[i]`` for ``boundaries[i-1] <= step < boundaries[i]``.

    >>> Step(values=(4.0, 2.0, 1.0), boundaries=(10, 20))(10)
    2.0
    """

    values: tuple[float, ...]
    boundaries: tuple[int, ...]

    def __post_init__(self) -> None:
        _check_pieces(self, "values", _check_real)

    def __call__(self, step: int) -> float:
        return self.values[bisect.bisect_right(self.boundaries, _check_step(step))]


@dataclasses.dataclass(frozen=True)
class Join:
    """Schedules one after another (optax's ``join_schedules``).

    For ``boundaries[i-1] <= step < boundaries[i]`` the value is
    ``schedules[i](step - boundaries[i-1])``: each schedule counts its steps from where it starts.
    Floats among ``schedules`` become constants.

    >>> warm_then_hold = Join((Linear(0.0, 1.0, 10), 1.0), boundaries=(10,))
    >>> warm_then_hold(5), warm_then_hold(10), warm_then_hold(99)
    (0.5, 1.0, 1.0)
    """

    schedules: tuple[Schedule, ...]
    boundaries: tuple[int, ...]

    def __post_init__(self) -> None:
        _check_pieces(self, "schedules", as_schedule)

    def __call__(self, step: int) -> float:
        step = _check_step(step)
        index = bisect.bisect_right(self.boundaries, step)
        offset = self.boundaries[index - 1] if index else 0
        return float(self.schedules[index](step - offset))


# The public spelling is lowercase, as in ``dk.schedules.cosine(8.0, 2.0, 100)``.
constant, linear, cosine, exponential, step, join = (
    Constant,
    Linear,
    Cosine,
    Exponential,
    Step,
    Join,
)


def warmup_cosine(
    peak: float, warmup_steps: int, total_steps: int, *, start: float = 0.0, end: float = 0.0
) -> Join:
    """Linear warm-up from ``start`` to ``peak`` over ``warmup_steps``, then a half-cosine decay
    to ``end`` at ``total_steps`` (counted from step 0, warm-up included), as optax's
    ``warmup_cosine_decay_schedule``. ``warmup_steps=0`` starts the decay at once.

    >>> lr = warmup_cosine(1e-3, warmup_steps=10, total_steps=110)
    >>> lr(0), lr(10), lr(60), lr(110)
    (0.0, 0.001, 0.0005, 0.0)
    """
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be an integer >= 0, got warmup_steps={warmup_steps!r}")
    if (
        isinstance(total_steps, bool)
        or not isinstance(total_steps, int)
        or total_steps <= warmup_steps
    ):
        raise ValueError(
            f"total_steps must be an integer > warmup_steps={warmup_steps}, got total_steps={total_steps!r}"
        )
    decay = Cosine(peak, end, total_steps - warmup_steps)
    if warmup_steps == 0:
        return Join((decay,), ())
    return Join((Linear(start, peak, warmup_steps), decay), (warmup_steps,))


def value_at(value: Any, step: int) -> Any:
    """The value in force at ``step``: a schedule (any callable ``step -> float``) is evaluated
    there; anything else (a float, a tensor) is already a value and comes back unchanged.

    The one place where "a float or a schedule" is resolved; :func:`as_schedule` is its
    counterpart for code that wants a callable in every case.

    >>> value_at(0.9, 10), value_at(linear(0.0, 1.0, 20), 10)
    (0.9, 0.5)
    """
    return value(step) if callable(value) else value


def as_schedule(value: FloatOrSchedule, name: str = "value") -> Schedule:
    """A number becomes ``constant(value)``; a callable passes through unchanged, so that
    ``as_schedule(v)(step) == value_at(v, step)`` for every number or schedule ``v``.

    >>> as_schedule(0.9)
    Constant(value=0.9)
    """
    if callable(value):
        return value
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(
            f"{name} must be a number or a schedule (step -> float), got {type(value).__name__} {value!r}"
        )
    return Constant(value)


# kind -> builder, for from_config. A plain dict: explicit, nothing registers itself on import.
KINDS: dict[str, Callable[..., Schedule]] = {
    "constant": Constant,
    "linear": Linear,
    "cosine": Cosine,
    "exponential": Exponential,
    "step": Step,
    "join": Join,
    "warmup_cosine": warmup_cosine,
}


def from_config(config: FloatOrSchedule | Mapping[str, Any], name: str = "schedule") -> Schedule:
    """Build a schedule from a config value: a number, or a mapping with a ``kind`` and the
    builder's arguments. ``join`` takes nested configs in ``schedules``. The mapping is not
    modified. Errors name the field, e.g. ``temperature.schedules[1].steps``.

    >>> from_config({"kind": "cosine", "start": 8.0, "end": 2.0, "steps": 100})
    Cosine(start=8.0, end=2.0, steps=100)
    >>> from_config({"kind": "join", "boundaries": [5], "schedules": [
    ...     {"kind": "linear", "start": 0.0, "end": 1.0, "steps": 5}, 1.0]})(7)
    1.0
    """
    if not isinstance(config, Mapping):
        return as_schedule(config, name)
    if "kind" not in config:
        raise ValueError(f"{name} is missing the field 'kind'; valid kinds are: {', '.join(KINDS)}")
    kind = config["kind"]
    if kind not in KINDS:
        raise ValueError(f"unknown {name}.kind {kind!r}; valid kinds are: {', '.join(KINDS)}")
    builder = KINDS[kind]
    fields = _builder_fields(builder)
    arguments = {key: value for key, value in config.items() if key != "kind"}
    unknown = sorted(set(arguments) - set(fields))
    if unknown:
        raise ValueError(
            f"{name} ({kind}) has unknown field {unknown[0]!r}; its fields are: {', '.join(fields)}"
        )
    missing = [field for field, required in fields.items() if required and field not in arguments]
    if missing:
        raise ValueError(
            f"{name} ({kind}) is missing the field {missing[0]!r}; its fields are: {', '.join(fields)}"
        )
    if (
        kind == "join"
        and isinstance(arguments["schedules"], Sequence)
        and not isinstance(arguments["schedules"], str)
    ):
        arguments["schedules"] = [
            from_config(part, f"{name}.schedules[{i}]")
            for i, part in enumerate(arguments["schedules"])
        ]
    try:
        return builder(**arguments)
    except (TypeError, ValueError) as error:
        raise type(error)(f"{name} ({kind}): {error}") from None


def _builder_fields(builder: Callable[..., Schedule]) -> dict[str, bool]:
    """Field name -> whether it is required, for a dataclass or a function builder."""
    if dataclasses.is_dataclass(builder):
        return {
            field.name: field.default is dataclasses.MISSING
            for field in dataclasses.fields(builder)
            if field.init
        }
    parameters = inspect.signature(builder).parameters.values()
    return {p.name: p.default is inspect.Parameter.empty for p in parameters}
