"""Built-in classifier models, and the one way a config names user code: ``package.module:callable``.

| name     | model                                                             |
|----------|-------------------------------------------------------------------|
| ``mlp``  | ``in -> hidden[0] -> ... -> classes``, ReLU (and dropout) between |
| ``cnn``  | 3x3 convs with ``hidden`` channels on ``(1, H, W)`` images, then a linear head |
| ``linear`` | one linear layer (softmax regression)                           |

>>> import torch
>>> from darkknowledge.models import build_model
>>> model = build_model("mlp", in_features=64, num_classes=10, hidden=(16,))
>>> model(torch.zeros(2, 64)).shape
torch.Size([2, 10])
"""

from __future__ import annotations

import importlib
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

BUILTIN_MODELS = ("mlp", "cnn", "linear")


class MLP(nn.Sequential):
    """``(B, in_features) -> (B, num_classes)``; inputs of any shape are flattened first."""

    def __init__(
        self, in_features: int, num_classes: int, hidden: Sequence[int] = (), dropout: float = 0.0
    ) -> None:
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = size
        layers.append(nn.Linear(width, num_classes))
        super().__init__(*layers)


class CNN(nn.Module):
    """Small conv net: ``(B, H·W) or (B, 1, H, W) -> (B, num_classes)`` for square images."""

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        hidden: Sequence[int] = (16, 32),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        side = math.isqrt(in_features)
        if side * side != in_features:
            raise ValueError(
                f"cnn needs square one-channel images; in_features={in_features} is not a square"
            )
        self.side = side
        layers: list[nn.Module] = []
        channels = 1
        for size in hidden or (16, 32):
            layers += [nn.Conv2d(channels, size, 3, padding=1), nn.ReLU()]
            channels = size
        layers += [
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(channels * 4, num_classes),
        ]
        self.layers = nn.Sequential(*layers)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.layers(inputs.reshape(-1, 1, self.side, self.side))  # (B, 1, H, W)


def import_callable(reference: str, what: str = "callable") -> Callable[..., Any]:
    """The object named by ``"package.module:attribute"``; a ValueError in one line otherwise.

    >>> import_callable("math:sqrt")(4.0)
    2.0
    """
    module_name, sep, attribute = reference.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(
            f"{what} {reference!r} is neither a built-in name nor 'package.module:callable'"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(
            f"{what} {reference!r}: cannot import module {module_name!r} ({error}); the dk "
            "command looks in the current folder, the config's folder and the installed packages"
        ) from None
    except Exception as error:  # the module itself failed while importing: say which and why
        raise ValueError(
            f"{what} {reference!r}: importing module {module_name!r} failed: "
            f"{type(error).__name__}: {error}"
        ) from None
    target: Any = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ValueError(
                f"{what} {reference!r}: module {module_name!r} has no attribute {attribute!r}"
            )
        target = getattr(target, part)
    if not callable(target):
        raise ValueError(f"{what} {reference!r} is a {type(target).__name__}, not a callable")
    return target


def build_model(
    name: str,
    *,
    in_features: int,
    num_classes: int,
    hidden: Sequence[int] = (),
    dropout: float = 0.0,
    args: Mapping[str, Any] | None = None,
) -> nn.Module:
    """A built-in model, or ``callable(**args)`` for a ``package.module:callable`` name."""
    if name == "mlp":
        return MLP(in_features, num_classes, hidden, dropout)
    if name == "cnn":
        return CNN(in_features, num_classes, hidden, dropout)
    if name == "linear":
        return MLP(in_features, num_classes, (), 0.0)
    if ":" not in name:
        raise ValueError(
            f"unknown model {name!r}; built-in models are {', '.join(BUILTIN_MODELS)}, "
            "or give 'package.module:callable'"
        )
    model = import_callable(name, "model")(**dict(args or {}))
    if not isinstance(model, nn.Module):
        raise TypeError(f"model {name!r} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def load_weights(model: nn.Module, path: str, *, what: str = "checkpoint") -> nn.Module:
    """Load safetensors weights into ``model`` (strict: every key must match). ``what`` names
    the file in errors (a config field such as ``teacher.checkpoint``)."""
    from safetensors.torch import load_file

    if os.path.isdir(path):
        raise ValueError(f"{what} {path!r} is a folder; give the .safetensors file inside it")
    try:
        state = load_file(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path!r} does not exist") from None
    except Exception as error:  # safetensors raises its own error type for a bad file
        raise ValueError(f"{what} {path!r} is not a safetensors file ({error})") from None
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shape mismatches: keep the first line, it names the tensor
        detail = str(error).strip().splitlines()
        raise ValueError(
            f"{what} {path!r} does not fit the model: {detail[-1].strip() if detail else error}"
        ) from None
    if missing or unexpected:
        raise ValueError(
            f"{what} {path!r} does not fit the model: missing keys {missing[:3]}, unexpected keys {unexpected[:3]}"
        )
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
