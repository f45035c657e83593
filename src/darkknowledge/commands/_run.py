"""What ``dk distill`` and ``dk train`` share: build everything from a config and train it,
stage by stage (teacher, assistants, student), resumable (see :mod:`._output_dir`)."""

from __future__ import annotations

import os
import sys
from typing import Any

import torch
from torch import nn

from ..chain import distill_chain, freeze
from ..config import Config, load_config, thaw
from ..train import Interrupted, Terminated
from ..train.checkpoint import latest_checkpoint
from . import _output_dir as outputs
from ._build import build_parts, distiller_kwargs, evaluate_model, subdir

SHOWN = ("step", "total", "eval_loss", "eval_accuracy", "eval_bits_per_token")


def add_config_arguments(parser) -> None:
    parser.add_argument("config", help="YAML config file (see docs/cli.md)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="override a config field, e.g. train.max_steps=100",
    )


def add_run_arguments(parser) -> None:
    """The config, its overrides, and what to do with a used ``train.output_dir``."""
    add_config_arguments(parser)
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in train.output_dir: finished stages are loaded, the others "
        "continue from their newest complete checkpoint (or start, if they have none)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="delete a previous run's outputs in train.output_dir and start afresh",
    )


def run_command(args, *, distill: bool) -> int:
    """``dk distill`` (``distill=True``) or ``dk train`` from parsed arguments: load the config
    with its ``key=value`` overrides and run it; the exit code."""
    config = load_config(args.config, args.overrides)
    run_config(config, distill=distill, resume=args.resume, overwrite=args.overwrite)
    return 0


def run_config(
    config: Config, *, distill: bool, resume: bool = False, overwrite: bool = False
) -> list[dict[str, Any]]:
    """Train the config's student(s); with ``distill``, through the teacher (and stages).
    Returns one summary per stage, the teacher's first (also ``results.json``)."""
    if not config.students:
        raise ValueError(
            "the config has no `student` section (nor `stages`); add one, e.g. student: {hidden: [16]}"
        )
    if distill and config.teacher is None:
        raise ValueError(
            "dk distill needs a `teacher` section; use `dk train` to train from labels alone"
        )
    output_dir = config.train.output_dir
    if output_dir is None and (resume or overwrite):
        raise ValueError("--resume and --overwrite need train.output_dir (it is null)")
    resolved = thaw(config)
    if output_dir is not None and _is_main_process():
        command = "distill" if distill else "train"
        outputs.prepare(output_dir, command, resolved, resume=resume, overwrite=overwrite)
    try:
        summaries = _Stages(config, resolved, resume).run(distill)
    except (Interrupted, Terminated) as stop:
        _say(stop.describe("--resume"), file=sys.stderr)
        raise SystemExit(128 + stop.signum) from None
    if output_dir is not None and _is_main_process():
        results = outputs.write_results(output_dir, summaries)
        _say_where(output_dir, summaries, results)
    return summaries


class _Stages:
    """The stages of one run, in order; a finished stage is loaded on ``--resume``."""

    def __init__(self, config: Config, resolved: dict[str, Any], resume: bool) -> None:
        self.config, self.resolved, self.resume = config, resolved, resume
        self.summaries: list[dict[str, Any]] = []
        self.trained = False  # once a stage trains, later stages' old outputs are stale

    def run(self, distill: bool) -> list[dict[str, Any]]:
        config = self.config
        torch.manual_seed(config.train.seed)
        self.parts = parts = build_parts(config)  # data, models, tasks of the config's task
        paths = (
            ["student"]
            if config.student is not None
            else [f"stages.{i}" for i in range(len(config.stages))]
        )
        if not distill:
            student = parts.model(config.students[-1], paths[-1])
            self.stage("baseline", student, None, _describe(config.students[-1]))
            return self.summaries
        students = [parts.model(spec, path) for spec, path in zip(config.students, paths)]
        teacher = self.teacher()
        names = [f"stage{i}" if len(students) > 1 else "student" for i in range(len(students))]

        def fit(index: int, student: nn.Module, current: nn.Module) -> dict[str, Any]:
            return self.stage(names[index], student, current, _describe(config.students[index]))

        distill_chain(teacher, students, fit)
        return self.summaries

    def teacher(self) -> nn.Module:
        spec = self.config.teacher
        if spec.cache is not None:  # its targets from a teacher cache: no teacher model
            from ._cached import cached_teacher

            return cached_teacher(self.config, self.summaries, _say)
        teacher = self.parts.model(spec, "teacher")
        if spec.checkpoint is None and spec.train_steps > 0:
            self.stage("teacher", teacher, None, _describe(spec), max_steps=spec.train_steps)
            return freeze(teacher)
        source = spec.checkpoint or "as built (train_steps=0: its callable may load weights)"
        _say(f"teacher ({_describe(spec)}): {source}")
        metrics = evaluate_model(teacher, self.parts)
        self.summaries.append(
            {"stage": "teacher", "model": _describe(spec), "source": source, **metrics}
        )
        _say(f"teacher: {_format(metrics)}")
        return freeze(teacher)

    def stage(
        self,
        name: str,
        model: nn.Module,
        teacher: nn.Module | None,
        description: str,
        *,
        max_steps: int | None = None,
    ) -> dict[str, Any]:
        """Train ``model`` as stage ``name`` (or load it, when it finished before)."""
        config = self.config
        max_steps = config.train.max_steps if max_steps is None else max_steps
        stage_dir = subdir(config.train.output_dir, name)
        done = None if self.trained else outputs.finished_stage(stage_dir, max_steps, self.resolved)
        if self.resume and done is not None:
            self.parts.load(model, os.path.join(stage_dir, "model.safetensors"))
            _say(
                f"{name} ({description}): finished before, loaded from {stage_dir} (not retrained)"
            )
            self.summaries.append(done)
            return done
        if self.trained:
            outputs.discard_stage(stage_dir)  # trained on an older version of its teacher
        self.trained = True
        doing = "distilling" if teacher is not None else "training from labels alone"
        latest = latest_checkpoint(stage_dir) if self.resume and stage_dir is not None else None
        since = "" if latest is None else f", continuing from {latest}"
        _say(f"{name} ({description}): {doing} for {max_steps} steps{since}")
        distiller = self._distiller(name, model, teacher, stage_dir, max_steps)
        result = distiller.fit(resume=self.resume)
        metrics = self.parts.metrics(dict(result.final) if result.final else distiller.evaluate())
        _say(f"{name}: {_format(metrics)}")
        summary = {"stage": name, "model": description, **metrics}
        if stage_dir is not None:
            distiller.export_student(stage_dir)  # <output_dir>/<name>/model.safetensors
            summary.update(
                weights=os.path.join(stage_dir, "model.safetensors"), max_steps=max_steps
            )
            if _is_main_process():
                outputs.write_summary(stage_dir, summary, self.resolved)
        self.summaries.append(summary)
        return summary

    def _distiller(self, name, model, teacher, stage_dir, max_steps):
        from ..train import Distiller

        config, parts = self.config, self.parts
        distill = teacher is not None
        task = parts.task(name, distill)  # None: the Distiller's ClassificationTask
        train_loader, eval_loader = parts.loaders(name, distill)
        kwargs = distiller_kwargs(
            config, num_classes=parts.num_classes, distill=distill, output_dir=stage_dir
        )
        kwargs.update(max_steps=max_steps, config=self.resolved)
        if distill:
            kwargs["teacher_dtype"] = config.teacher.dtype
        return Distiller(model, teacher, train_loader, eval_data=eval_loader, task=task, **kwargs)


def _describe(spec) -> str:
    if spec.hidden:
        return f"{spec.name} {list(spec.hidden)}"
    if "model_type" not in spec.args:
        return spec.name
    # hf_causal_lm: the model type and its sizes
    sizes = {k: v for k, v in spec.args.items() if k.startswith("n_") or k.endswith("_size")}
    shown = " ".join(f"{k}={v}" for k, v in sizes.items())
    return f"{spec.name} {spec.args['model_type']}" + (f" ({shown})" if shown else "")


def _format(metrics: dict[str, Any]) -> str:
    shown = [(k, metrics[k]) for k in SHOWN if metrics.get(k) is not None]
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown)


def _say_where(output_dir: str, summaries: list[dict[str, Any]], results: str) -> None:
    trained = [s["stage"] for s in summaries if "weights" in s]
    last = summaries[-1]
    _say(f"done; outputs in {output_dir}:")
    if "weights" in last:
        _say(
            f"  weights:     {last['weights']} (every stage: {output_dir}/<stage>/model.safetensors)"
        )
    if trained:
        _say(f"  logs:        {output_dir}/{{{','.join(trained)}}}/metrics.jsonl; "
             f"TensorBoard: tensorboard --logdir {output_dir}")  # fmt: skip
        _say(f"  checkpoints: {output_dir}/<stage>/checkpoints/ (--resume continues a run)")
    _say(f"  results:     {results} (every stage, the teacher's first)")


def _is_main_process() -> bool:
    """Rank 0 under torchrun / accelerate launch (they set RANK), or a single process."""
    return os.environ.get("RANK", "0") == "0"


def _say(*args: Any, **kwargs: Any) -> None:
    """print() on the main process only, so several processes print one report."""
    if _is_main_process():
        print(*args, **kwargs)
