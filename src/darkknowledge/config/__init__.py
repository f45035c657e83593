"""Validated configs: YAML (``yaml.safe_load`` only) -> frozen dataclasses.

>>> from darkknowledge.config import config_from_dict
>>> config = config_from_dict({"student": {"hidden": [16]}, "distill": {"alpha": 0.5}})
>>> config.distill.alpha, config.student.hidden
(0.5, (16,))
>>> config_from_dict({"distill": {"temprature": 2.0}})
Traceback (most recent call last):
...
darkknowledge.config.ConfigError: distill.temprature: unknown key; did you mean 'temperature'? ...

Command-line overrides ``key=value`` are applied to a copy of the YAML mapping before
validation, the value read as a YAML scalar, so they are checked exactly like the file.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from .environment import COMMANDS, check_environment
from .fields import build_section, docs, thaw, top_level_problem
from .presets import presets, resolve_config
from .schema import (
    Config,
    DataConfig,
    DistillConfig,
    LearnableTemperatureConfig,
    ModelConfig,
    TeacherConfig,
    TrainConfig,
)
from .tasks import task_problems
from .yaml_nodes import document_problems

__all__ = [
    "COMMANDS",
    "Config",
    "ConfigError",
    "DataConfig",
    "DistillConfig",
    "LearnableTemperatureConfig",
    "ModelConfig",
    "TeacherConfig",
    "TrainConfig",
    "apply_overrides",
    "check_config",
    "check_environment",
    "config_from_dict",
    "load_config",
    "partial_config",
    "presets",
    "read_yaml",
    "reference",
    "reference_table",
    "resolve_config",
    "thaw",
]


class ConfigError(ValueError):
    """One or more problems in a config; ``errors`` lists them, each naming its field path."""

    def __init__(self, errors: Sequence[str], source: str | None = None) -> None:
        self.errors = list(errors)
        self.source = source
        where = f"{source}: " if source else ""
        more = (
            f" (and {len(self.errors) - 1} more problem(s); run `dk validate` to list them)"
            if len(self.errors) > 1
            else ""
        )
        super().__init__(f"{where}{self.errors[0]}{more}")


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """The config mapping in the YAML file at ``path`` (safe_load: plain data only, no tags
    that run code); an empty file is an empty mapping, any other top level an error. ``path``
    may also name a packaged preset (``digits_kd``, see :func:`presets`)."""
    with open(resolve_config(path), encoding="utf-8") as handle:
        try:
            text = handle.read()
        except UnicodeDecodeError as error:  # a binary file, or another encoding
            raise ConfigError(
                [f"not UTF-8 text (byte {error.object[error.start]:#04x} at offset {error.start})"],
                str(path),
            ) from None
    try:
        document = yaml.safe_load(text)
        problems = document_problems(text)  # repeated keys, alias bombs
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError([f"not valid YAML{where}: {problem}"], str(path)) from None
    except RecursionError:  # PyYAML's parser recurses once per nesting level
        raise ConfigError(["not a config: nested too deeply to parse"], str(path)) from None
    if problems:
        raise ConfigError(problems, str(path))
    if document is None:
        return {}
    if not isinstance(document, Mapping):
        raise ConfigError([top_level_problem(document)], str(path))
    return dict(document)


def apply_overrides(raw: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A deep copy of ``raw`` with each ``dotted.key=value`` set (value parsed as YAML).

    >>> apply_overrides({"train": {"max_steps": 5}}, ["train.max_steps=100", "distill.alpha=0.5"])
    {'train': {'max_steps': 100}, 'distill': {'alpha': 0.5}}
    """
    if not isinstance(raw, Mapping):
        raise ConfigError([top_level_problem(raw)])
    result = copy.deepcopy(dict(raw))
    errors = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            errors.append(f"override {item!r}: expected key=value, e.g. train.max_steps=100")
            continue
        try:
            value = yaml.safe_load(text) if text else None
        except yaml.YAMLError:
            value = text  # not a YAML scalar: keep the text, the field's check judges it
        node: Any = result
        parts = key.split(".")
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            here = ".".join(parts[: depth + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    errors.append(
                        f"override {item!r}: {here}: no list item {part!r} (the list has {len(node)})"
                    )
                    break
                index: Any = int(part)
            elif isinstance(node, dict):
                index = part
            else:
                errors.append(f"override {item!r}: {'.'.join(parts[:depth])} is not a mapping")
                break
            if last:
                node[index] = value
            else:
                if isinstance(node, dict) and node.get(index) is None:
                    node[index] = {}
                node = node[index]
    if errors:
        raise ConfigError(errors)
    return result


def check_config(raw: Any) -> tuple[Config | None, list[str]]:
    """``(config, [])``, or ``(None, problems)`` listing every problem found."""
    errors: list[str] = []
    config = build_section(Config, raw, "", errors)
    if isinstance(raw, Mapping):
        if raw.get("stages") and raw.get("student") is not None:
            errors.append(
                "student: give either `student` or `stages` (whose last entry is the student), not both"
            )
        distill = raw.get("distill")
        if (
            isinstance(distill, Mapping)
            and distill.get("learnable_temperature") is not None
            and "temperature" in distill
        ):
            errors.append(
                "distill.temperature: a learnable temperature is set (distill.learnable_temperature); "
                "remove distill.temperature, which it would replace"
            )
    data = getattr(config, "data", None)
    if data is not None and data.labelled_fraction < 1 and data.name != "digits":
        errors.append(
            f"data.labelled_fraction: only the built-in digits can hide labels, got data.name={data.name!r}; "
            "let your data callable mark unlabelled examples instead"
        )
    learn = getattr(getattr(config, "distill", None), "learnable_temperature", None)
    if learn is not None and not learn.minimum < learn.initial < learn.minimum + learn.t_range:
        errors.append(
            f"distill.learnable_temperature.initial: must lie strictly inside (minimum, minimum + t_range) = "
            f"({learn.minimum:g}, {learn.minimum + learn.t_range:g}), got {learn.initial:g}"
        )
    errors.extend(task_problems(config))  # fields that do not suit the task
    return (None, errors) if errors else (config, [])


def partial_config(raw: Any) -> Config | None:
    """The config with its valid fields and defaults for the rest (invalid sections left out),
    so that ``dk validate`` can check the machine for what is there; None if the top level is
    not a mapping. Never run a partial config: its problems are those of :func:`check_config`.
    """
    config = build_section(Config, raw, "", [])
    return config if isinstance(config, Config) else None


def config_from_dict(raw: Any, source: str | None = None) -> Config:
    """A validated :class:`Config` from a plain mapping; raises :class:`ConfigError`."""
    config, errors = check_config(raw)
    if errors:
        raise ConfigError(errors, source)
    return config


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> Config:
    """Read ``path``, apply ``key=value`` overrides to a copy, validate."""
    raw = read_yaml(path)
    return config_from_dict(apply_overrides(raw, overrides) if overrides else raw, str(path))


def reference() -> list[tuple[str, str, str]]:
    """``(field path, default, doc)`` for every config field, for the documentation."""
    return docs(Config)


def reference_table() -> str:
    """The Markdown table of :func:`reference`, as docs/cli.md holds it (a test compares them):
    ``python -c "from darkknowledge.config import reference_table; print(reference_table())"``.
    """
    rows = ["| field | default | meaning |", "| --- | --- | --- |"]
    rows += [f"| `{path}` | `{default}` | {doc} |" for path, default, doc in reference()]
    return "\n".join(rows)
