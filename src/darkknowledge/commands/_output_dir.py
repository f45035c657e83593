"""The output folder of ``dk distill`` / ``dk train``: one run per folder, and its stages.

``<train.output_dir>/`` holds ``run.json`` (the command and its resolved config), one folder per
stage (``teacher``, ``student`` or ``stage<k>``, ``baseline``) and ``results.json``. A stage
folder holds the Distiller's ``metrics.jsonl``, ``tensorboard/`` and ``checkpoints/``, then the
trained ``model.safetensors`` and, last, ``summary.json``: a stage with a summary of the same
config and step count is finished, and ``--resume`` loads it instead of training it again.

A fresh run refuses a folder that is not empty; ``--overwrite`` deletes what a previous run
wrote there (nothing else); ``--resume`` refuses a folder of another command or config.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from .._files import write_json
from ..train.fingerprint import check_resumable, identity_hash

RUN_FILE, RESULTS_FILE, SUMMARY_FILE = "run.json", "results.json", "summary.json"
_STAGE_NAMES = re.compile(r"^(teacher|student|baseline|stage\d+)$")


def prepare(
    output_dir: str, command: str, config: dict[str, Any], *, resume: bool, overwrite: bool
) -> None:
    """Check ``output_dir`` for this run and record the run in ``run.json`` (main process)."""
    if resume and overwrite:
        raise ValueError(
            "--resume continues the run in train.output_dir, --overwrite deletes it: give one"
        )
    root = Path(output_dir)
    previous = _read_run(root)
    if overwrite:
        for entry in _outputs(root):
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    elif resume and previous is not None:
        if previous.get("command") != command:
            raise ValueError(
                f"train.output_dir {root} holds a `dk {previous.get('command')}` run; `dk {command} "
                "--resume` cannot continue it: choose another train.output_dir"
            )
        check_resumable(previous.get("config", {}), config, f"the run in {root}")
    elif not resume and root.exists() and any(p.name != RUN_FILE for p in root.iterdir()):
        # A lone run.json is a run refused before it trained (bad model, FSDP on CPU, ...):
        # nothing of it would be lost, so a fresh run may take the folder.
        shown = ", ".join(sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())[:4])
        raise ValueError(
            f"train.output_dir {root} is not empty ({shown}); continue that run with --resume, "
            "choose another folder (train.output_dir=...), or replace it with --overwrite"
        )
    root.mkdir(parents=True, exist_ok=True)
    write_json(root / RUN_FILE, {"command": command, "config": config})


def finished_stage(stage_dir: str | None, max_steps: int, config: dict[str, Any]) -> dict | None:
    """The stage's summary if it finished with ``max_steps`` steps under this config (up to
    the fields a resume may change: a longer ``train.max_steps`` does not redo the teacher)."""
    if stage_dir is None:
        return None
    path = Path(stage_dir) / SUMMARY_FILE
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # not finished (or a summary from an older version): train it
    identity = summary.get("identity") == identity_hash(config)
    same = identity and summary.get("max_steps") == max_steps
    weights = Path(stage_dir) / "model.safetensors"
    if not (same and weights.is_file()):
        return None
    # As the stage reported it when it finished: results.json then equals an uninterrupted run's.
    return {key: value for key, value in summary.items() if key != "identity"}


def write_summary(stage_dir: str, summary: dict[str, Any], config: dict[str, Any]) -> None:
    """``summary.json``, written after the weights: its presence means the stage is finished.
    ``identity`` is the hash of the config fields that a resume may not change."""
    write_json(Path(stage_dir) / SUMMARY_FILE, {**summary, "identity": identity_hash(config)})


def discard_stage(stage_dir: str | None) -> None:
    """Delete a stage folder whose teacher has changed since it was written."""
    if stage_dir is not None and Path(stage_dir).exists():
        shutil.rmtree(stage_dir)


def write_results(output_dir: str, summaries: list[dict[str, Any]]) -> str:
    path = os.path.join(output_dir, RESULTS_FILE)
    write_json(path, summaries)
    return path


def _read_run(root: Path) -> dict | None:
    try:
        return json.loads((root / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _outputs(root: Path) -> list[Path]:
    """What a dk distill/train run writes in its folder (and nothing else there)."""
    if not root.is_dir():
        return []
    return [
        entry
        for entry in root.iterdir()
        if entry.name in (RUN_FILE, RESULTS_FILE)
        or (entry.is_dir() and _STAGE_NAMES.match(entry.name))
    ]
