"""``dk eval CONFIG --checkpoint PATH``: evaluate saved student weights on the config's eval data."""

from __future__ import annotations

import json
import os

from ..config import load_config
from ._build import build_data, loaders, model_from_spec
from ._run import add_config_arguments


def add_arguments(parser) -> None:
    add_config_arguments(parser)
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="student weights: a .safetensors file, or a folder holding model.safetensors (from dk distill)",
    )


def run(args) -> int:
    from ..models import load_weights
    from ..train import Distiller

    config = load_config(args.config, args.overrides)
    if not config.students:
        raise ValueError(
            "the config has no `student` section (nor `stages`) to load the checkpoint into"
        )
    bundle = build_data(config.data)
    checkpoint = args.checkpoint
    if os.path.isdir(checkpoint):  # a folder written by dk distill / export_student
        checkpoint = os.path.join(checkpoint, "model.safetensors")
    student = load_weights(model_from_spec(config.students[-1], bundle), checkpoint)
    train_loader, eval_loader = loaders(bundle, config.data, config.train.seed)
    distiller = Distiller(
        student, None, train_loader, max_steps=1, eval_data=eval_loader, progress=False
    )
    print(json.dumps(distiller.evaluate(eval_loader)))
    return 0
