"""What a valid config still needs from the machine: the files it names and the code it imports.

:func:`darkknowledge.config.check_config` judges the config by itself; :func:`check_environment`
checks, the way ``dk distill`` will meet them, the sections a command needs, the checkpoint
files and every ``package.module:callable`` (imported, and checked to be callable). ``dk
validate`` reports both lists at once.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from .schema import Config, ModelConfig
from .tasks import causal_lm_checkpoint_problems

COMMANDS = ("distill", "train", "eval")


def check_environment(config: Config, *, command: str = "distill") -> list[str]:
    """Every problem ``dk <command>`` would meet with ``config``, each naming its field.

    Checkpoint paths are taken as the run takes them (relative to the current folder); user
    code is imported with the current ``sys.path`` (the ``dk`` command adds the current folder
    and the config's).
    """
    if command not in COMMANDS:
        raise ValueError(f"command must be one of {', '.join(COMMANDS)}, got {command!r}")
    problems = []
    if not config.students:
        problems.append(
            "student: missing: the config names no model to train; add one, e.g. "
            "student: {hidden: [16]} (or a `stages` list)"
        )
    if command == "distill" and config.teacher is None:
        problems.append(
            "teacher: missing: dk distill needs a teacher, e.g. teacher: {hidden: [256], "
            "train_steps: 500} (dk train does not)"
        )
    cache = config.teacher.cache if config.teacher is not None else None
    if command == "distill" and cache is not None:
        manifest = os.path.join(cache, "manifest.json")
        if not os.path.isfile(manifest):
            problems.append(
                f"teacher.cache: no teacher cache at {cache!r} ({os.path.abspath(manifest)} does "
                "not exist); write it with dk cache-teacher CONFIG"
            )
    for path, spec in _models(config, command):
        if spec.checkpoint is not None and config.task == "causal_lm":
            problems.extend(causal_lm_checkpoint_problems(spec, path))
        elif spec.checkpoint is not None and not os.path.isfile(spec.checkpoint):
            where = os.path.abspath(spec.checkpoint)
            problems.append(f"{path}.checkpoint: no file {spec.checkpoint!r} (looked for {where})")
        problems.extend(_import_problem(spec.name, f"{path}.name"))
    problems.extend(_import_problem(config.data.name, "data.name"))
    on_policy = config.distill.on_policy
    if command == "distill" and on_policy is not None:
        problems.extend(_import_problem(on_policy.sampler, "distill.on_policy.sampler"))
    return problems


def _models(config: Config, command: str) -> Iterator[tuple[str, ModelConfig]]:
    """``(field path, spec)`` of every model the command builds."""
    if command == "distill" and config.teacher is not None and config.teacher.cache is None:
        yield "teacher", config.teacher  # with a teacher cache, no teacher model is built
    if config.stages:
        stages = enumerate(config.stages)
        if command != "distill":  # dk train and dk eval build the last stage only
            stages = [(len(config.stages) - 1, config.stages[-1])]
        for index, spec in stages:
            yield f"stages.{index}", spec
    elif config.student is not None:
        yield "student", config.student


def _import_problem(name: str, path: str) -> list[str]:
    if ":" not in name:  # a built-in name, already checked by the schema
        return []
    from ..models import import_callable

    try:
        import_callable(name, path)
    except ValueError as error:
        return [str(error)]
    return []
