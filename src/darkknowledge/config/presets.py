"""The preset configs shipped inside the package, found by name: ``dk distill digits_kd``.

The presets are the repository's ``configs/*.yaml``; ``src/darkknowledge/configs`` is a link to
that folder, so the installed package carries the very same files (a test compares them).
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path


def preset_folder() -> Path:
    """The folder of the packaged presets."""
    return Path(str(resources.files("darkknowledge") / "configs"))


def presets() -> list[str]:
    """Names of the packaged presets (``digits_kd``, ...), sorted.

    >>> "digits_kd" in presets()
    True
    """
    folder = preset_folder()
    return sorted(path.stem for path in folder.glob("*.yaml")) if folder.is_dir() else []


def resolve_config(name: str | os.PathLike) -> Path:
    """``name`` itself when it is a file, else the packaged preset of that name (with or
    without ``.yaml``); FileNotFoundError listing the presets otherwise."""
    path = Path(name)
    if path.is_file():
        return path
    if path.parent == Path(".") and path.suffix in ("", ".yaml"):
        preset = preset_folder() / f"{path.stem}.yaml"
        if preset.is_file():
            return preset
    raise FileNotFoundError(
        f"config {str(name)!r}: no such file, and no preset of that name "
        f"(presets: {', '.join(presets()) or 'none installed'})"
    )
