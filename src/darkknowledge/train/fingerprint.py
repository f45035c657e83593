"""The identity of a run: a hash of its resolved config, and which changes a resume allows.

A checkpoint stores the hash and the config; resuming with another config is refused, naming
the fields that differ. Some fields do not change what is computed and may change freely
(:data:`CHANGEABLE`); ``train.max_steps`` may grow (train longer), not shrink.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

CHANGEABLE = (
    "train.output_dir", "train.progress", "train.save_every", "train.keep_last",
    "train.on_nonfinite",  # a run stopped by a NaN may resume skipping such steps
)  # fmt: skip
GROWABLE = ("train.max_steps",)


def config_hash(config: Mapping[str, Any]) -> str:
    """SHA-256 (hex, first 16 digits) of the config as canonical JSON.

    >>> config_hash({"b": 1, "a": [1, 2]}) == config_hash({"a": [1, 2], "b": 1})
    True
    """
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def identity_hash(config: Mapping[str, Any]) -> str:
    """:func:`config_hash` of the fields that decide what a run computes: without the ones a
    resume may change (:data:`CHANGEABLE`, :data:`GROWABLE`).

    >>> identity_hash({"train": {"max_steps": 5, "seed": 0}}) == identity_hash({"train": {"max_steps": 9, "seed": 0}})
    True
    """
    kept = {k: v for k, v in flatten(dict(config)).items() if k not in CHANGEABLE + GROWABLE}
    return config_hash(kept)


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """``{"train.max_steps": 100, ...}``: dotted paths to the leaves (lists are leaves).

    >>> flatten({"train": {"max_steps": 5, "seed": 0}, "stages": [1]})
    {'train.max_steps': 5, 'train.seed': 0, 'stages': [1]}
    """
    if not isinstance(config, Mapping) or (prefix and not config):
        return {prefix: config}
    flat: dict[str, Any] = {}
    for key, value in config.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def refused_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``"field (old -> new)"`` for every difference a resume may not make.

    >>> refused_changes({"train": {"max_steps": 5, "seed": 0}}, {"train": {"max_steps": 9, "seed": 1}})
    ['train.seed (0 -> 1)']
    >>> refused_changes({"train": {"max_steps": 5}}, {"train": {"max_steps": 3}})
    ['train.max_steps (5 -> 3: it may only grow)']
    """
    before, after = flatten(dict(old)), flatten(dict(new))
    missing = object()
    refused = []
    for name in sorted(set(before) | set(after)):
        was, now = before.get(name, missing), after.get(name, missing)
        if _same(was, now) or name in CHANGEABLE:
            continue
        if name in GROWABLE and isinstance(was, int) and isinstance(now, int):
            if now >= was:
                continue
            refused.append(f"{name} ({was} -> {now}: it may only grow)")
            continue
        shown = ["(absent)" if v is missing else json.dumps(v, default=str) for v in (was, now)]
        refused.append(f"{name} ({shown[0]} -> {shown[1]})")
    return refused


def check_resumable(old: Mapping[str, Any], new: Mapping[str, Any], where: str) -> None:
    """Raise ``ValueError`` when ``new`` may not continue the run of config ``old``."""
    refused = refused_changes(old, new)
    if refused:
        raise ValueError(
            f"cannot resume {where}: the config differs from the one it was started with in "
            f"{', '.join(refused)}; rerun with the original config (only train.max_steps may "
            "grow), or start a new run in another folder"
        )


def _same(a: Any, b: Any) -> bool:
    # JSON round trip: tuples and lists compare equal, as they would after a reload.
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)
