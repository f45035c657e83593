"""Config -> objects: data loaders, models, temperature, and the Distiller's keyword arguments.

Only wiring lives here; every number comes from the validated config.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from .. import schedules
from ..config import Config, DataConfig, DistillConfig, ModelConfig, thaw
from ..models import build_model, import_callable, load_weights

IGNORE = -100  # the label of an example whose label the student does not see


@dataclass(frozen=True)
class DataBundle:
    """``train`` has every label (it trains the teacher). With ``labelled`` (indices), the
    student sees labels of those examples only: ``transfer`` marks the others ``IGNORE``."""

    train: Dataset
    eval: Dataset
    in_features: int
    num_classes: int
    labelled: torch.Tensor | None = None

    def student_train(self, distill: bool) -> Dataset:
        """What the student trains on: the transfer set (distill) or the labelled part."""
        if self.labelled is None:
            return self.train
        inputs, labels = self.train.tensors
        if not distill:
            return TensorDataset(inputs[self.labelled], labels[self.labelled])
        masked = torch.full_like(labels, IGNORE)
        masked[self.labelled] = labels[self.labelled]
        return TensorDataset(inputs, masked)


def build_data(spec: DataConfig) -> DataBundle:
    """The train and eval datasets named by ``data.name``."""
    if spec.name == "digits":
        from ..data import split_digits, stratified_split

        train_x, train_y, test_x, test_y = split_digits(spec.test_fraction, spec.split_seed)
        labelled = None
        if spec.labelled_fraction < 1:
            labelled = stratified_split(train_y, spec.labelled_fraction, spec.split_seed)[1]
        return DataBundle(
            TensorDataset(train_x, train_y), TensorDataset(test_x, test_y), 64, 10, labelled
        )
    if ":" not in spec.name:
        raise ValueError(
            f"data.name: unknown data set {spec.name!r}; built-in: digits, or 'package.module:callable'"
        )
    result = import_callable(spec.name, "data.name")(**thaw(spec.args))
    if not (isinstance(result, tuple | list) and len(result) == 2):
        raise TypeError(
            f"data.name {spec.name!r} must return (train_dataset, eval_dataset), got {type(result).__name__}"
        )
    train, evaluation = result
    inputs, _ = train[0]
    labels = torch.as_tensor([int(train[i][1]) for i in range(len(train))])
    return DataBundle(
        train, evaluation, int(torch.as_tensor(inputs).numel()), int(labels.max()) + 1
    )


def loaders(
    bundle: DataBundle, spec: DataConfig, seed: int, train_set: Dataset | None = None
) -> tuple[DataLoader, DataLoader]:
    """A shuffling train loader (seeded; default ``bundle.train``) and an eval loader."""
    generator = torch.Generator().manual_seed(seed)
    train_set = bundle.train if train_set is None else train_set
    train = DataLoader(
        train_set, batch_size=spec.batch_size, shuffle=True, generator=generator, drop_last=False
    )
    evaluation = DataLoader(bundle.eval, batch_size=spec.eval_batch_size)
    return train, evaluation


def model_from_spec(spec: ModelConfig, bundle: DataBundle, what: str = "model") -> nn.Module:
    model = build_model(
        spec.name,
        in_features=bundle.in_features,
        num_classes=bundle.num_classes,
        hidden=spec.hidden,
        dropout=spec.dropout,
        args=thaw(spec.args),
    )
    if spec.checkpoint is not None:
        load_weights(model, spec.checkpoint, what=f"{what}.checkpoint")
    return model


def value_or_schedule(value: Any) -> Any:
    """A float stays a float; a schedule mapping becomes a schedule."""
    return (
        schedules.from_config(thaw(value)) if not isinstance(value, int | float) else float(value)
    )


def temperature_from(spec: DistillConfig, num_classes: int) -> Any:
    """A float, a schedule, or a :class:`darkknowledge.LearnableTemperature`."""
    learn = spec.learnable_temperature
    if learn is None:
        return value_or_schedule(spec.temperature)
    from ..temperature import LearnableTemperature

    return LearnableTemperature(
        learn.initial,
        minimum=learn.minimum,
        t_range=learn.t_range,
        lambda_max=learn.lambda_max,
        curriculum_steps=learn.curriculum_steps,
        per_sample=learn.per_sample,
        num_classes=num_classes if learn.per_sample else None,
        hidden=learn.hidden,
    )


def loss_options(spec: DistillConfig) -> dict[str, Any]:
    """The ``kd_loss`` options other than temperature and alpha."""
    return {
        "divergence": spec.divergence,
        "soft_scale": spec.soft_scale,
        "beta": spec.beta,
        "lam": spec.lam,
        "standardize": spec.standardize,
        "dkd_weights": tuple(spec.dkd_weights) if spec.dkd_weights is not None else None,
    }


def distiller_kwargs(
    config: Config, *, num_classes: int, distill: bool, output_dir: str | None
) -> dict[str, Any]:
    """Keyword arguments of :class:`darkknowledge.Distiller` (besides models and data)."""
    train = config.train
    kwargs: dict[str, Any] = {
        "optimizer": train.optimizer,
        "learning_rate": value_or_schedule(train.learning_rate),
        "weight_decay": train.weight_decay,
        "max_steps": train.max_steps,
        "grad_accum_steps": train.grad_accum_steps,
        "max_grad_norm": train.max_grad_norm,
        "mixed_precision": train.mixed_precision,
        "on_nonfinite": train.on_nonfinite,
        "eval_every": train.eval_every,
        "save_every": train.save_every,
        "keep_last": train.keep_last,
        "output_dir": output_dir,
        "log_every": train.log_every,
        "seed": train.seed,
        "progress": train.progress,
    }
    if distill:
        kwargs["temperature"] = temperature_from(config.distill, num_classes)
        kwargs["alpha"] = value_or_schedule(config.distill.alpha)
        options = loss_options(config.distill)
        if config.task == "causal_lm":  # the others are refused by the config's checks
            options = {name: options[name] for name in ("divergence", "soft_scale", "beta", "lam")}
        kwargs["loss_options"] = options
    return kwargs


def subdir(output_dir: str | None, name: str) -> str | None:
    return None if output_dir is None else os.path.join(output_dir, name)


class ClassifierParts:
    """What a run of ``task: classification`` builds from its config: data, models, loaders,
    tasks and evaluation. :class:`._build_llm.CausalLMParts` is the same for causal LMs."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.bundle = build_data(config.data)
        self.num_classes = self.bundle.num_classes

    def model(self, spec: ModelConfig, path: str) -> nn.Module:
        return model_from_spec(spec, self.bundle, path)

    def load(self, model: nn.Module, path: str) -> nn.Module:
        return load_weights(model, path)

    def loaders(self, stage: str, distill: bool) -> tuple[Any, Any]:
        """Train and eval data of a stage (the student of a few-labels run sees its part)."""
        train_set = self.bundle.student_train(distill=distill) if stage != "teacher" else None
        return loaders(self.bundle, self.config.data, self.config.train.seed, train_set)

    def task(self, stage: str, distill: bool) -> Any:
        transfer = self.bundle.labelled is not None or self.config.distill.unlabelled == "distill"
        if distill and transfer:  # soft targets on unlabelled examples too
            from ..train import ClassificationTask

            return ClassificationTask(ignore_index=IGNORE, distill_unlabelled=True)
        return None  # the Distiller's default ClassificationTask

    def eval_task(self) -> Any:
        from ..train import ClassificationTask

        return ClassificationTask()

    def metrics(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """A stage's final metrics, as reported (classifiers: unchanged)."""
        return metrics


def build_parts(config: Config) -> Any:
    """:class:`ClassifierParts` or :class:`._build_llm.CausalLMParts`, by ``config.task``."""
    if config.task == "causal_lm":
        from ._build_llm import CausalLMParts

        return CausalLMParts(config)
    return ClassifierParts(config)


@torch.no_grad()
def evaluate_model(model: nn.Module, parts: Any) -> dict[str, float]:
    """``eval_loss``, ``eval_accuracy``, ``eval_count`` (and what ``parts.metrics`` adds) of a
    model that is not trained here, on the config's eval data."""
    _, eval_loader = parts.loaders("eval", False)
    task, sums = parts.eval_task(), {}
    was_training = model.training
    model.eval()
    for batch in eval_loader:
        for key, value in task.eval_sums(model, batch).items():
            sums[key] = sums.get(key, 0.0) + value
    model.train(was_training)
    count = sums.get("count", 0.0)
    return parts.metrics(
        {
            "eval_loss": sums.get("loss", 0.0) / max(count, 1.0),
            "eval_accuracy": sums.get("correct", 0.0) / max(count, 1.0),
            "eval_count": count,
        }
    )
