"""``dk eval CONFIG --checkpoint PATH``: evaluate saved student weights on the config's eval data.

Prints JSON: ``loss``, ``accuracy``, ``count`` (the means of the task's sums); for a causal LM
also ``cross_entropy`` (= ``loss``, nats per token), ``bits_per_token`` and ``perplexity``.

``PATH`` is a ``.safetensors`` file, or a folder holding one: an exported student
(``<run>/student/model.safetensors``, from ``dk distill``) or a training checkpoint
(``<run>/student/checkpoints/step-00000100/student.safetensors``).
"""

from __future__ import annotations

import json
import os

from ..config import load_config
from ..llm.models import WEIGHT_FILES, pickle_note  # a folder: an export, then a checkpoint
from ._build import build_parts
from ._run import add_config_arguments


def add_arguments(parser) -> None:
    add_config_arguments(parser)
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="student weights: a .safetensors file, a folder holding model.safetensors (an export "
        "of dk distill), or a checkpoint folder holding student.safetensors "
        "(<run>/student/checkpoints/step-N)",
    )


def weights_file(path: str) -> str:
    """The safetensors file that ``path`` names or holds."""
    if not os.path.isdir(path):
        return path  # a file, or a missing path that load_weights reports
    for name in WEIGHT_FILES:
        candidate = os.path.join(path, name)
        if os.path.isfile(candidate):
            return candidate
    hint = ""
    steps_folder = os.path.join(path, "checkpoints")
    if os.path.isdir(steps_folder):
        steps = sorted(n for n in os.listdir(steps_folder) if n.startswith("step-"))
        if steps:
            hint = f"; its latest checkpoint is {os.path.join(steps_folder, steps[-1])}"
    raise FileNotFoundError(
        f"--checkpoint {path!r}: the folder holds neither {' nor '.join(WEIGHT_FILES)}"
        f"{pickle_note(path)}{hint}"
    )


def run(args) -> int:
    from ..train import Distiller

    config = load_config(args.config, args.overrides)
    if not config.students:
        raise ValueError(
            "the config has no `student` section (nor `stages`) to load the checkpoint into"
        )
    checkpoint = weights_file(args.checkpoint)
    parts = build_parts(config)
    path = "student" if config.student is not None else f"stages.{len(config.stages) - 1}"
    student = parts.load(parts.model(config.students[-1], path), checkpoint)
    train_loader, eval_loader = parts.loaders("eval", False)
    distiller = Distiller(
        student, None, train_loader, task=parts.eval_task(), max_steps=1, eval_data=eval_loader,
        progress=False,
    )  # fmt: skip
    metrics = distiller.evaluate(eval_loader)
    if config.task == "causal_lm":  # cross-entropy in nats per token, and what it means
        from ._build_llm import lm_metrics

        metrics = {"cross_entropy": metrics["loss"], **metrics, **lm_metrics(metrics["loss"])}
    print(json.dumps(metrics))
    return 0
