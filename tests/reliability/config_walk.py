"""Every field of the config schema, found by walking its dataclasses (so a new field is
covered the day it is added), with a value of the wrong type and one out of range.

For each leaf field the wrong type is the first of :data:`WRONG_TYPES` that the field refuses;
the out-of-range value is the first of -1, 0, 1e9, NaN that a numeric field refuses, or an
unknown name for a choice of names. A field that takes any value of its kind (a free mapping,
a path, a flag) has none. A value counts as refused when an error names the field itself
(errors about fields the one-field config leaves unset are not its own).
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from darkknowledge.config import Config, ConfigError, config_from_dict, reference

WRONG_TYPES: tuple[Any, ...] = ([1, 2], "x", True)


@dataclass(frozen=True)
class Probe:
    field: str
    value: Any
    errors: tuple[str, ...]  # empty: the value was accepted


def leaf_fields(cls: type = Config, prefix: str = "") -> Iterator[str]:
    """Dotted paths of every leaf field (a list of sections is entered at index 0)."""
    for item in dataclasses.fields(cls):
        convert = item.metadata["convert"]
        nested = getattr(convert, "section", None)
        path = prefix + item.name
        if nested is None:
            yield path
            continue
        yield from leaf_fields(nested, path + (".0." if getattr(convert, "many", False) else "."))


def raw_with(path: str, value: Any) -> dict[str, Any]:
    """The smallest raw config that sets ``path`` to ``value``."""
    raw: dict[str, Any] = {}
    node: Any = raw
    parts = path.split(".")
    for part, following in itertools.pairwise(parts):
        child: Any = [] if following.isdigit() else {}
        if part.isdigit():
            node.append(child)
        else:
            node[part] = child
        node = child
    if parts[-1].isdigit():
        node.append(value)
    else:
        node[parts[-1]] = value
    return raw


def probe(path: str, value: Any) -> Probe:
    try:
        config_from_dict(raw_with(path, value))
    except ConfigError as error:
        return Probe(path, value, tuple(error.errors))
    return Probe(path, value, ())


def about(path: str, errors: tuple[str, ...]) -> tuple[str, ...]:
    """The errors that name ``path`` (others are about fields its value leaves unset)."""
    return tuple(error for error in errors if error.startswith((path + ":", path + " (")))


def refused(path: str, value: Any) -> Probe | None:
    """The probe of ``value`` if ``path`` itself refuses it, else None."""
    found = probe(path, value)
    return found if about(path, found.errors) else None


def field_rows() -> list[tuple[str, Probe | None, Probe | None]]:
    """``(field, wrong type, out of range)`` for every leaf field (None: no such value)."""
    rows = []
    for path in leaf_fields():
        wrong = next((p for v in WRONG_TYPES if (p := refused(path, v))), None)
        if any(refused(path, number) is None for number in (2, 0.5)):  # takes numbers
            candidates: tuple[Any, ...] = (-1, 0, 1e9, float("nan"))
        else:  # a choice of names: an unknown one (free text takes any)
            candidates = ("no_such_name",)
        out = next((p for v in candidates if (p := refused(path, v))), None)
        if out is not None and isinstance(out.value, str) and "allowed" not in out.errors[0]:
            out = None  # a string where no string goes: a wrong type, not a range
        rows.append((path, wrong, out))
    return rows


def code_fields() -> list[str]:
    """Fields that may name code: they take ``package.module:callable`` and say so."""
    documented = {path for path, _, doc in reference() if "package.module:callable" in doc}
    return [
        path
        for path in leaf_fields()
        if _documented(path, documented) and refused(path, "some_package.module:make") is None
    ]


def _documented(path: str, documented: set[str]) -> bool:
    """Whether ``path``'s documentation (or that of the field it inherits) names code."""
    generic = re.sub(r"^(teacher|stages\.\d+)\.", "student.", path)
    return path in documented or generic in documented
