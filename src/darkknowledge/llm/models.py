"""Built-in causal language models for configs: a Hugging Face model from its config, or from
a local folder. Nothing is downloaded: a checkpoint is a local path, never a hub name.

| config | model |
| --- | --- |
| ``name: hf_causal_lm``, ``args: {model_type: gpt2, n_layer: 1, ...}`` | ``AutoModelForCausalLM.from_config(AutoConfig.for_model(**args))``, random weights; ``vocab_size`` from the data when ``args`` has none |
| the same and ``checkpoint: weights.safetensors`` (or a folder holding ``model.safetensors`` / ``student.safetensors``) | those weights loaded into it |
| ``name: hf_causal_lm``, ``checkpoint: FOLDER`` (a ``save_pretrained`` folder), no ``model_type`` | ``AutoModelForCausalLM.from_pretrained(FOLDER)``, ``args`` overriding its config |
| ``name: package.module:callable`` | ``callable(**args)``, an ``nn.Module`` (then ``checkpoint`` loaded) |

Tied weights (GPT-2's output layer is its input embedding) are stored once by
``save_pretrained`` and twice by ``dk``'s own exports; both load.

>>> model = build_causal_lm("hf_causal_lm", args={"model_type": "gpt2", "n_layer": 1, "n_embd": 8,
...                         "n_head": 2, "n_positions": 16}, vocab_size=32)
>>> type(model).__name__, model.config.vocab_size
('GPT2LMHeadModel', 32)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from torch import nn

BUILTIN_LLM_MODELS = ("hf_causal_lm",)
# Inside a folder given as a checkpoint: a dk export, a dk training checkpoint.
WEIGHT_FILES = ("model.safetensors", "student.safetensors")
# What from_pretrained(use_safetensors=True) reads in a save_pretrained folder.
SAFETENSORS_NAMES = ("model.safetensors", "model.safetensors.index.json")


def build_causal_lm(
    name: str,
    *,
    args: Mapping[str, Any] | None = None,
    checkpoint: str | None = None,
    vocab_size: int | None = None,
    what: str = "model",
) -> nn.Module:
    """The causal LM a config names (see the module docstring). ``what`` is the config path
    (``student``, ``teacher``, ``stages.0``) that errors name."""
    args = dict(args or {})
    if name == "hf_causal_lm":
        return _hf_causal_lm(args, checkpoint, vocab_size, what)
    from ..models import import_callable

    if ":" not in name:
        raise ValueError(
            f"{what}.name: unknown causal LM {name!r}; built-in: {', '.join(BUILTIN_LLM_MODELS)}, "
            "or 'package.module:callable'"
        )
    model = import_callable(name, f"{what}.name")(**args)
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"{what}.name {name!r} returned a {type(model).__name__}, not a torch.nn.Module"
        )
    if checkpoint is not None:
        load_causal_lm_weights(model, checkpoint, what=what)
    return model


def _hf_causal_lm(
    args: dict[str, Any], checkpoint: str | None, vocab_size: int | None, what: str
) -> nn.Module:
    import transformers

    model_type = args.pop("model_type", None)
    if model_type is None:
        if checkpoint is None or not os.path.isdir(checkpoint):
            raise ValueError(
                f"{what}: hf_causal_lm needs args.model_type (e.g. gpt2, llama) to build a model "
                f"from its config, or a checkpoint folder written by save_pretrained; got "
                f"checkpoint={checkpoint!r}"
            )
        if not os.path.isfile(os.path.join(checkpoint, "config.json")):
            raise ValueError(
                f"{what}.checkpoint: the folder {checkpoint!r} has no config.json; give "
                "args.model_type and its sizes to build the model, or a save_pretrained folder"
            )
        check_safetensors_folder(checkpoint, f"{what}.checkpoint")
        try:
            return transformers.AutoModelForCausalLM.from_pretrained(
                checkpoint, local_files_only=True, use_safetensors=True, **args
            )
        except (OSError, ValueError, TypeError) as error:
            raise ValueError(f"{what}.checkpoint {checkpoint!r}: {_first_line(error)}") from None
    if "vocab_size" not in args:
        if vocab_size is None:
            raise ValueError(
                f"{what}.args.vocab_size: missing, and the data gives none; set it (your "
                "tokenizer's vocabulary size) here or as data.vocab_size"
            )
        args["vocab_size"] = vocab_size
    try:
        config = transformers.AutoConfig.for_model(str(model_type), **args)
    except ValueError as error:
        raise ValueError(
            f"{what}.args.model_type: {model_type!r} is not a transformers model type "
            f"({_first_line(error)[:160]})"
        ) from None
    try:
        model = transformers.AutoModelForCausalLM.from_config(config)
    except (ValueError, TypeError, AttributeError, KeyError) as error:
        raise ValueError(
            f"{what}.args: transformers cannot build a causal LM from {args | {'model_type': model_type}}: "
            f"{_first_line(error)}"
        ) from None
    if checkpoint is not None:
        load_causal_lm_weights(model, checkpoint, what=what)
    return model


def load_causal_lm_weights(model: nn.Module, path: str, *, what: str = "model") -> nn.Module:
    """Load a safetensors file (or the weights file in a folder, see :data:`WEIGHT_FILES`)
    into ``model``, strictly, except that a tied parameter may be stored under one name only."""
    from safetensors.torch import load_file

    file = weights_in(path, what)
    try:
        state = load_file(file)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what}.checkpoint {file!r} does not exist") from None
    except Exception as error:  # safetensors raises its own error type for a bad file
        raise ValueError(
            f"{what}.checkpoint {file!r} is not a safetensors file ({error})"
        ) from None
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shape mismatches: the last line names the tensor
        detail = str(error).strip().splitlines()
        raise ValueError(
            f"{what}.checkpoint {file!r} does not fit the model: {detail[-1].strip() if detail else error}"
        ) from None
    missing = [name for name in missing if name not in _tied_to_loaded(model, set(state))]
    if missing or unexpected:
        raise ValueError(
            f"{what}.checkpoint {file!r} does not fit the model: missing keys {missing[:3]}, "
            f"unexpected keys {list(unexpected)[:3]}"
        )
    return model


def weights_in(path: str, what: str = "model") -> str:
    """``path`` if it is not a folder, else the first of :data:`WEIGHT_FILES` inside it."""
    if not os.path.isdir(path):
        return path
    for name in WEIGHT_FILES:
        candidate = os.path.join(path, name)
        if os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(
        f"{what}.checkpoint: the folder {path!r} holds neither {' nor '.join(WEIGHT_FILES)}"
        f"{pickle_note(path)}"
    )


def check_safetensors_folder(folder: str | os.PathLike, what: str = "checkpoint") -> None:
    """Refuse a ``save_pretrained`` folder without safetensors weights: its
    ``pytorch_model.bin`` would be unpickled, which can run code, so it is never loaded."""
    if any(os.path.isfile(os.path.join(folder, name)) for name in SAFETENSORS_NAMES):
        return
    raise ValueError(
        f"{what}: the folder {str(folder)!r} has no {' nor '.join(SAFETENSORS_NAMES)}"
        f"{pickle_note(folder)}; save the model with save_pretrained(safe_serialization=True)"
    )


def pickle_note(folder: str | os.PathLike) -> str:
    """``" (it holds pytorch_model.bin: pickle files, never loaded)"``, or ``""``: why a
    folder's weights are refused when they are there, but as pickles."""
    pickles = sorted(name for name in os.listdir(folder) if name.endswith((".bin", ".pt", ".pth")))
    return f" (it holds {', '.join(pickles)}: pickle files, never loaded)" if pickles else ""


def _tied_to_loaded(model: nn.Module, loaded: set[str]) -> set[str]:
    """Names of parameters that share their tensor with a parameter the state dict gave."""
    groups: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(parameter), []).append(name)
    return {name for names in groups.values() if loaded.intersection(names) for name in names}


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
