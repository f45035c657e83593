"""Hidden states and the output layer of a causal LM, without ever computing the full logits.

The fused loss needs the last hidden states ``h`` ``(B, T, H)`` and the output layer, from which
logits are ``z = softcap(scale · (h Wᵀ + b))`` with ``softcap(z) = c · tanh(z / c)``:

- ``W`` ``(V, H)`` is the effective weight: tied to the input embeddings (GPT-2) it is that
  same tensor, so gradients reach the embedding; with a PEFT LoRA adapter on the output layer
  it is ``W + s · B A`` computed differentiably, so the adapter trains;
- ``scale`` comes from the config (``logit_scale`` of Cohere, ``1 / logits_scaling`` of Granite);
- ``c`` is ``final_logit_softcapping`` (Gemma 2 and later), or None.

These are read from config attributes, never from the model's name.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
from torch import nn


class OutputLayer(NamedTuple):
    """What turns hidden states into logits: ``softcap(logit_scale · (h Wᵀ + bias))``."""

    weight: torch.Tensor  # (V, H)
    bias: torch.Tensor | None  # (V,)
    logit_scale: float = 1.0
    softcap: float | None = None


def unwrap_model(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside DDP / accelerate / ``torch.compile`` / PEFT wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        elif hasattr(model, "get_base_model") and callable(model.get_base_model):  # PEFT
            inner = model.get_base_model()
            if inner is model:
                return model
            model = inner
        else:
            return model


def output_layer(model: nn.Module) -> OutputLayer:
    """The effective output layer of a ``AutoModelForCausalLM``-style model.

    >>> import transformers
    >>> config = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=8, n_layer=1, n_head=2)
    >>> gpt2 = transformers.GPT2LMHeadModel(config)
    >>> layer = output_layer(gpt2)
    >>> layer.weight is gpt2.transformer.wte.weight, layer.bias, layer.logit_scale, layer.softcap
    (True, None, 1.0, None)
    """
    model = unwrap_model(model)
    weight, bias = _effective_linear(_output_module(model))
    scale, softcap = logit_transform(model.config)
    return OutputLayer(weight, bias, scale, softcap)


def logit_transform(config: Any) -> tuple[float, float | None]:
    """``(logit_scale, softcap)`` from a model config; ``(1.0, None)`` for plain models."""
    if hasattr(config, "get_text_config"):  # multimodal configs keep these on the text config
        config = config.get_text_config()
    scale = 1.0
    if getattr(config, "logit_scale", None) is not None:  # Cohere: logits * logit_scale
        scale *= float(config.logit_scale)
    if getattr(config, "logits_scaling", None) is not None:  # Granite: logits / logits_scaling
        scale /= float(config.logits_scaling)
    softcap = getattr(config, "final_logit_softcapping", None)  # Gemma 2+: c·tanh(z/c)
    return scale, (float(softcap) if softcap else None)


def logits_from_hidden(hidden: torch.Tensor, layer: OutputLayer) -> torch.Tensor:
    """Full logits ``(..., V)`` from hidden ``(..., H)``. For evaluation chunks and tests only:
    training goes through the fused loss, which never holds all of them."""
    logits = nn.functional.linear(hidden, layer.weight, layer.bias)
    if layer.logit_scale != 1.0:
        logits = logits * layer.logit_scale
    if layer.softcap is not None:
        logits = torch.tanh(logits / layer.softcap) * layer.softcap
    return logits


def last_hidden_states(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    **model_kwargs: Any,
) -> torch.Tensor:
    """The hidden states ``(B, T, H)`` that the output layer would see (after the final norm).

    The model is called as a whole (``model(input_ids=..., attention_mask=...)``), through any
    DDP or accelerate wrapper, so gradient synchronisation and autocast still happen; only the
    output layer is skipped: during the call it records its input and returns an empty
    ``(B, T, 0)`` tensor instead of the ``(B, T, V)`` logits. Its own ``forward`` (with any
    Accelerate hook on it) is back in place afterwards.
    """
    head = _output_module(unwrap_model(model))
    with _capture_input(head) as captured:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **model_kwargs)
    if not captured:
        raise RuntimeError(
            f"the output layer of {type(unwrap_model(model)).__name__} was not called by its forward"
        )
    return captured[-1]


def _output_module(model: nn.Module) -> nn.Module:
    """The output layer module of an unwrapped Hugging Face causal LM."""
    if not hasattr(model, "get_output_embeddings"):
        raise TypeError(
            "model must be a Hugging Face causal LM with get_output_embeddings() (FSDP and other "
            f"sharding wrappers are not supported), got {type(model).__name__}"
        )
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(
            f"{type(model).__name__}.get_output_embeddings() is None: the model has no output layer "
            "(use an AutoModelForCausalLM, not the bare transformer)"
        )
    return head


_MISSING = object()


@contextlib.contextmanager
def _capture_input(head: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Shadow ``head.forward`` (on this instance only) by one that records its input, and put
    back exactly what was there before.

    The instance may already hold a ``forward`` of its own: Accelerate's hooks (``device_map``,
    offloading) live there, so it is saved and restored, never deleted.
    """
    captured: list[torch.Tensor] = []

    def record(hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        captured.append(hidden)
        # Empty logits: whatever the model does to them next (softcap, scale, float()) is free.
        return hidden.new_empty(*hidden.shape[:-1], 0)

    previous = head.__dict__.get("forward", _MISSING)
    head.forward = record  # an instance attribute shadows the class method (and any hook)
    try:
        yield captured
    finally:
        if previous is _MISSING:
            del head.forward
        else:
            head.forward = previous


def _effective_linear(head: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(W, b)`` of an ``nn.Linear``, or of a PEFT LoRA layer as ``W + s·B A`` (differentiable)."""
    if hasattr(head, "base_layer") and hasattr(head, "lora_A"):
        return _lora_effective_linear(head)
    if isinstance(head, nn.Linear):
        return head.weight, head.bias
    raise TypeError(
        f"unsupported output layer {type(head).__name__}: expected nn.Linear or a PEFT LoRA Linear"
    )


def _lora_effective_linear(head: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    weight, bias = _effective_linear(head.base_layer)
    if getattr(head, "fan_in_fan_out", False):
        raise ValueError(
            "a LoRA output layer with fan_in_fan_out=True is not supported (expected nn.Linear)"
        )
    if getattr(head, "merged", False) or getattr(head, "disable_adapters", False):
        return weight, bias  # merged: the adapter is already in W; disabled: it does not apply
    for name in head.active_adapters:
        if name not in head.lora_A:
            continue
        if getattr(head, "use_dora", {}).get(name, False):
            raise ValueError(
                f"adapter {name!r} on the output layer uses DoRA, which is not supported; use plain LoRA"
            )
        dropout = head.lora_dropout[name] if name in getattr(head, "lora_dropout", {}) else None
        if head.training and isinstance(dropout, nn.Dropout) and dropout.p > 0:
            warnings.warn(
                f"lora_dropout={dropout.p} of adapter {name!r} on the output layer is not applied by the "
                "fused loss (it acts on the input, not the weight); set it to 0 for exact training",
                stacklevel=3,
            )
        lora_a, lora_b, scaling = head.lora_A[name], head.lora_B[name], head.scaling[name]
        delta = scaling * (lora_b.weight @ lora_a.weight)  # (V, r) @ (r, H) -> (V, H)
        weight = weight + delta.to(weight.dtype)
        if getattr(lora_b, "bias", None) is not None:
            extra = scaling * lora_b.bias
            bias = extra if bias is None else bias + extra
    return weight, bias
