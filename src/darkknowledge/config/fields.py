"""The small engine that turns a YAML mapping into frozen dataclasses, collecting every problem.

A config field is declared once, with its default, its converter and its documentation::

    temperature: float = field_(4.0, number(above=0), "softmax temperature T")

A converter takes ``(value, path, errors)`` and returns the converted value, or :data:`INVALID`
after appending ``"path: what was wrong"`` to ``errors``. :func:`build_section` walks a mapping
against a dataclass: unknown keys are errors that suggest the closest valid key (difflib), and
validation goes on after an error, so that ``dk validate`` can list every problem at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

Converter = Callable[[Any, str, list[str]], Any]


class _Invalid:
    def __repr__(self) -> str:
        return "INVALID"


INVALID: Any = _Invalid()  # returned by a converter that recorded an error


def field_(default: Any, convert: Converter, doc: str) -> Any:
    """A dataclass field with its converter and its one-line documentation."""
    if isinstance(default, list | dict):
        raise TypeError("use an immutable default (a tuple, or a MappingProxyType)")
    metadata = {"convert": convert, "doc": doc}
    if isinstance(default, MappingProxyType):  # unhashable, so dataclasses wants a factory
        return dataclasses.field(default_factory=lambda: default, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def suggest(key: str, valid: list[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest valid key, or ``""``."""
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else ""


def build_section(cls: type, raw: Any, path: str, errors: list[str]) -> Any:
    """Build dataclass ``cls`` from mapping ``raw``; record problems under ``path``."""
    if not isinstance(raw, Mapping):
        errors.append(
            f"{path}: expected a mapping of keys, got {_describe(raw)}"
            if path
            else top_level_problem(raw)
        )
        return INVALID
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            where = f"{path}.{key}" if path else str(key)
            valid = sorted(fields)
            errors.append(
                f"{where}: unknown key{suggest(str(key), valid)} (valid keys: {', '.join(valid)})"
            )
    values: dict[str, Any] = {}
    for name, f in fields.items():
        if name not in raw:
            continue
        value = f.metadata["convert"](raw[name], f"{path}.{name}" if path else name, errors)
        if value is not INVALID:
            values[name] = value
    try:
        return cls(**values)
    except TypeError:  # a required field is missing; its converter or the caller reports it
        return INVALID


def top_level_problem(document: Any) -> str:
    """The error for a config whose top level is not a mapping (a list, a number, a string)."""
    kind = "null" if document is None else type(document).__name__
    return (
        f"the top level must be a mapping of sections (student:, teacher:, data:, distill:, "
        f"train:), got {kind} {document!r:.60}"
    )


def docs(
    cls: type, prefix: str = "", seen: dict[type, str] | None = None
) -> list[tuple[str, str, str]]:
    """``(path, default, doc)`` for every field of ``cls``, nested sections included.

    Each field is documented once: a section whose class (or base class) was already listed
    says so instead of repeating its fields.
    """
    seen = {} if seen is None else seen
    rows = []
    inherited = {
        f.name for base in cls.__mro__[1:] if base in seen for f in dataclasses.fields(base)
    }
    for f in dataclasses.fields(cls):
        if f.name in inherited:
            continue
        path = f"{prefix}{f.name}"
        convert = f.metadata["convert"]
        nested = getattr(convert, "section", None)
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        default = "required" if default is dataclasses.MISSING else _show(default)
        doc = f.metadata["doc"]
        if nested is not None:
            default = (
                "[]"
                if getattr(convert, "many", False)
                else ("null" if default == "null" else "(section)")
            )
            like = [seen[base] for base in nested.__mro__ if base in seen]
            if like:
                doc += f" (fields as `{like[0]}`" + (
                    ", plus those below)" if nested not in seen else ")"
                )
        rows.append((path, default, doc))
        if nested is not None and nested not in seen:
            child = f"{path}.{'N.' if getattr(convert, 'many', False) else ''}"
            seen[nested] = child + "*"
            rows.extend(docs(nested, child, seen))
    return rows


# ---- converters ----------------------------------------------------------------------------


def section(cls: type, *, optional: bool = False) -> Converter:
    def convert(value, path, errors):
        if value is None and optional:
            return None
        return build_section(cls, value, path, errors)

    convert.section = cls  # type: ignore[attr-defined]
    return convert


def sections(cls: type) -> Converter:
    """A list of sections, stored as a tuple."""

    def convert(value, path, errors):
        if not isinstance(value, list | tuple):
            errors.append(f"{path}: expected a list of mappings, got {_describe(value)}")
            return INVALID
        items = tuple(
            build_section(cls, item, f"{path}.{i}", errors) for i, item in enumerate(value)
        )
        return INVALID if INVALID in items else items

    convert.section, convert.many = cls, True  # type: ignore[attr-defined]
    return convert


def number(
    *,
    above: float | None = None,
    at_least: float | None = None,
    at_most: float | None = None,
    integer: bool = False,
) -> Converter:
    """A finite float (or int) with optional bounds. Strings like ``"1e-3"`` are accepted,
    because YAML 1.1 (PyYAML) reads an exponent without a dot as a string."""
    kind = "an integer" if integer else "a number"

    def convert(value, path, errors):
        if isinstance(value, str) and not integer:
            with contextlib.suppress(ValueError):
                value = float(value)
        ok_type = isinstance(value, int) if integer else isinstance(value, int | float)
        if isinstance(value, bool) or not ok_type:
            errors.append(f"{path}: expected {kind}, got {_describe(value)}")
            return INVALID
        value = int(value) if integer else float(value)
        if not math.isfinite(value):
            errors.append(f"{path}: expected a finite number, got {value!r}")
            return INVALID
        for bound, bad, text in (
            (above, lambda b: value <= b, "> {}"),
            (at_least, lambda b: value < b, ">= {}"),
            (at_most, lambda b: value > b, "<= {}"),
        ):
            if bound is not None and bad(bound):
                errors.append(f"{path}: must be {text.format(bound)}, got {value!r}")
                return INVALID
        return value

    return convert


def integer(**bounds: float) -> Converter:
    return number(integer=True, **bounds)


def boolean(value, path, errors):
    if not isinstance(value, bool):
        errors.append(f"{path}: expected true or false, got {_describe(value)}")
        return INVALID
    return value


def choice(*options: str) -> Converter:
    def convert(value, path, errors):
        if value not in options:
            hint = suggest(str(value), list(options)) if isinstance(value, str) else ""
            errors.append(f"{path}: got {value!r}{hint} (allowed: {', '.join(options)})")
            return INVALID
        return value

    return convert


def builtin_or_reference(*builtins: str) -> Converter:
    """A built-in name, or a ``package.module:callable`` reference (checked for its form here;
    imported when the run builds it)."""

    def convert(value, path, errors):
        if text(value, path, errors) is INVALID:
            return INVALID
        if value in builtins:
            return value
        module, _, attribute = value.partition(":")
        if module and attribute and all(part.isidentifier() for part in module.split(".")):
            return value
        hint = suggest(value, list(builtins))
        errors.append(
            f"{path}: got {value!r}{hint} (allowed: {', '.join(builtins)}, or 'package.module:callable')"
        )
        return INVALID

    return convert


def text(value, path, errors):
    if not isinstance(value, str) or not value:
        errors.append(f"{path}: expected a non-empty string, got {_describe(value)}")
        return INVALID
    return value


def optional(convert: Converter) -> Converter:
    def wrapped(value, path, errors):
        return None if value is None else convert(value, path, errors)

    return wrapped


def either(*converters: Converter, expected: str) -> Converter:
    """The first converter that accepts the value; one error naming ``expected`` otherwise."""

    def convert(value, path, errors):
        for candidate in converters:
            trial: list[str] = []
            result = candidate(value, path, trial)
            if not trial:
                return result
        errors.append(f"{path}: expected {expected}, got {_describe(value)}")
        return INVALID

    return convert


def tuple_of(item: Converter, *, length: int | None = None) -> Converter:
    def convert(value, path, errors):
        if not isinstance(value, list | tuple) or (length is not None and len(value) != length):
            size = f" of {length}" if length is not None else ""
            errors.append(f"{path}: expected a list{size}, got {_describe(value)}")
            return INVALID
        items = tuple(item(v, f"{path}.{i}", errors) for i, v in enumerate(value))
        return INVALID if INVALID in items else items

    return convert


def mapping(value, path, errors):
    """A free mapping (keyword arguments for user code), stored read-only."""
    if not isinstance(value, Mapping):
        errors.append(f"{path}: expected a mapping, got {_describe(value)}")
        return INVALID
    return freeze(value)


def freeze(value: Any) -> Any:
    """A read-only deep copy: mappings become MappingProxyType, lists tuples."""
    if isinstance(value, Mapping):
        return MappingProxyType({k: freeze(v) for k, v in value.items()})
    if isinstance(value, list | tuple):
        return tuple(freeze(v) for v in value)
    return value


def thaw(value: Any) -> Any:
    """The inverse of :func:`freeze` (plain dicts and lists), for user code and JSON."""
    if isinstance(value, Mapping):
        return {k: thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [thaw(v) for v in value]
    if dataclasses.is_dataclass(value):
        return {f.name: thaw(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return value


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}" if value is not None else "null"


def _show(default: Any) -> str:
    if default is None:
        return "null"
    if isinstance(default, bool):
        return "true" if default else "false"
    if isinstance(default, tuple):
        return "[" + ", ".join(_show(v) for v in default) + "]"
    if isinstance(default, Mapping):
        return "{}" if not default else repr(dict(default))
    return str(default)
