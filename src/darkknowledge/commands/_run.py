"""What ``dk distill`` and ``dk train`` share: build everything from a config and train it."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from .._files import write_json
from ..chain import distill_chain, freeze
from ..config import Config
from ._build import (
    IGNORE,
    DataBundle,
    build_data,
    distiller_kwargs,
    loaders,
    model_from_spec,
    subdir,
)


def add_config_arguments(parser) -> None:
    parser.add_argument("config", help="YAML config file (see docs/cli.md)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="override a config field, e.g. train.max_steps=100",
    )


def _describe(spec) -> str:
    return f"{spec.name} {list(spec.hidden)}" if spec.hidden else spec.name


def _fit(
    model: nn.Module,
    teacher: nn.Module | None,
    config: Config,
    bundle: DataBundle,
    output_dir,
    max_steps=None,
    *,
    student: bool = True,
):
    """Train ``model`` (the teacher when ``student`` is False: on every label)."""
    from ..train import Distiller

    train_set, task = None, None
    if student:
        train_set = bundle.student_train(distill=teacher is not None)
        if bundle.labelled is not None and teacher is not None:
            from ..demo.transfer import TransferSetTask

            task = TransferSetTask(ignore_index=IGNORE)  # soft targets on unlabelled examples too
    train_loader, eval_loader = loaders(bundle, config.data, config.train.seed, train_set)
    kwargs = distiller_kwargs(
        config, num_classes=bundle.num_classes, distill=teacher is not None, output_dir=output_dir
    )
    if max_steps is not None:
        kwargs["max_steps"] = max_steps
    if teacher is not None:
        kwargs["teacher_dtype"] = config.teacher.dtype
    distiller = Distiller(model, teacher, train_loader, eval_data=eval_loader, task=task, **kwargs)
    result = distiller.fit()
    return distiller, result


def _metrics(distiller, result) -> dict[str, Any]:
    final = dict(result.final) if result.final else {}
    return final or distiller.evaluate()


def _teacher(config: Config, bundle: DataBundle) -> nn.Module:
    spec = config.teacher
    teacher = model_from_spec(spec, bundle)
    if spec.checkpoint is None and spec.train_steps > 0:
        _say(f"teacher ({_describe(spec)}): training from labels for {spec.train_steps} steps")
        output_dir = subdir(config.train.output_dir, "teacher")
        distiller, result = _fit(
            teacher, None, config, bundle, output_dir, spec.train_steps, student=False
        )
        _say(f"teacher: {_format(_metrics(distiller, result))}")
        # Reusable as teacher.checkpoint=<train.output_dir>/teacher/model.safetensors.
        if output_dir is not None:
            distiller.export_student(output_dir)
    elif spec.checkpoint is None:
        _say(
            "teacher: no checkpoint and train_steps=0: used as built (its callable may load weights)"
        )
    return freeze(teacher)


SHOWN = ("step", "total", "eval_loss", "eval_accuracy")


def _format(metrics: dict[str, Any]) -> str:
    shown = [(k, metrics[k]) for k in SHOWN if metrics.get(k) is not None]
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown)


def run_config(config: Config, *, distill: bool) -> list[dict[str, Any]]:
    """Train the config's student(s); with ``distill``, through the teacher (and stages)."""
    if not config.students:
        raise ValueError(
            "the config has no `student` section (nor `stages`); add one, e.g. student: {hidden: [16]}"
        )
    if distill and config.teacher is None:
        raise ValueError(
            "dk distill needs a `teacher` section; use `dk train` to train from labels alone"
        )
    torch.manual_seed(config.train.seed)
    bundle = build_data(config.data)
    output_dir = config.train.output_dir
    summaries: list[dict[str, Any]] = []

    def fit(index: int, student: nn.Module, teacher: nn.Module | None) -> dict[str, Any]:
        spec = config.students[index] if distill else config.students[-1]
        if not distill:
            name = "baseline"
        else:
            name = f"stage{index}" if len(config.students) > 1 else "student"
        doing = "distilling" if teacher is not None else "training from labels alone"
        _say(f"{name} ({_describe(spec)}): {doing}")
        distiller, result = _fit(student, teacher, config, bundle, subdir(output_dir, name))
        metrics = _metrics(distiller, result)
        _say(f"{name}: {_format(metrics)}")
        if output_dir is not None:  # <output_dir>/<name>/model.safetensors
            distiller.export_student(os.path.join(output_dir, name))
        summaries.append({"stage": name, "model": _describe(spec), **metrics})
        return metrics

    if distill:
        students = [model_from_spec(spec, bundle) for spec in config.students]
        distill_chain(_teacher(config, bundle), students, fit)
    else:
        fit(0, model_from_spec(config.students[-1], bundle), None)
    if output_dir is not None and _is_main_process():
        write_json(os.path.join(output_dir, "results.json"), summaries)
    return summaries


def _is_main_process() -> bool:
    """Rank 0 under torchrun / accelerate launch (they set RANK), or a single process."""
    return os.environ.get("RANK", "0") == "0"


def _say(*args: Any, **kwargs: Any) -> None:
    """print() on the main process only, so several processes print one report."""
    if _is_main_process():
        print(*args, **kwargs)
