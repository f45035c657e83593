"""A Hugging Face causal LM with the KV cache of one sequence, which can be rolled back.

Works across transformers versions without reaching into private state:

- the cache is passed as ``cache=`` (transformers 5.x after the rename) or ``past_key_values=``
  (4.x and early 5.x), whichever the model's ``forward`` takes, and read back from the output's
  ``cache`` or ``past_key_values``;
- rollback is ``Cache.crop(-n)`` (a negative argument removes the last n tokens in every version
  that has ``crop``; only 4.x accepted a positive length), or slicing a legacy tuple cache of
  ``(key, value)`` tensors shaped ``(batch, heads, tokens, head_dim)``;
- only the logits that are needed are computed where ``forward`` takes ``logits_to_keep``
  (``num_logits_to_keep`` in 4.45-4.49).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from ..llm.heads import unwrap_model


class CachedLM:
    """``model`` plus its KV cache over the first ``length`` tokens of the sequence being decoded."""

    def __init__(self, model: nn.Module) -> None:
        if not isinstance(model, nn.Module) or not callable(getattr(model, "forward", None)):
            raise TypeError(
                f"expected a Hugging Face causal LM (an nn.Module), got {type(model).__name__}"
            )
        self.model = model
        parameters = inspect.signature(unwrap_model(model).forward).parameters
        self._cache_argument = "cache" if "cache" in parameters else "past_key_values"
        self._keep_argument = next(
            (name for name in ("logits_to_keep", "num_logits_to_keep") if name in parameters), None
        )
        self.device = _input_device(model)
        self.cache: Any = None
        self.length = 0

    def reset(self) -> None:
        self.cache, self.length = None, 0

    def extend(
        self, new_ids: torch.Tensor, *, keep_logits: int, hidden: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the model on ``new_ids`` ``(1, n)``, the tokens after the cached ``length``.

        Returns the last ``keep_logits`` logits ``(keep_logits, V)`` and, with ``hidden``, the
        final-layer hidden states of all n new positions ``(1, n, H)``. The cache then covers
        ``length + n`` tokens.
        """
        count = new_ids.shape[1]
        if count < keep_logits or keep_logits < 1:
            raise RuntimeError(f"cannot keep {keep_logits} logits of {count} new tokens")
        kwargs: dict[str, Any] = {"use_cache": True}
        if self.cache is not None:
            kwargs[self._cache_argument] = self.cache
        if self._keep_argument is not None:
            kwargs[self._keep_argument] = keep_logits
        if hidden:
            kwargs["output_hidden_states"] = True
        output = self.model(input_ids=new_ids.to(self.device), **kwargs)
        cache = getattr(output, "cache", None)
        self.cache = cache if cache is not None else output.past_key_values
        self.length += count
        logits = output.logits[0, -keep_logits:]  # (keep_logits, V)
        return logits, (output.hidden_states[-1] if hidden else None)

    def crop(self, length: int) -> None:
        """Forget every cached token from position ``length`` on."""
        remove = self.length - length
        if remove < 0:
            raise RuntimeError(f"cannot crop a cache of {self.length} tokens to {length}")
        if remove == 0:
            return
        self.cache = crop_cache(self.cache, remove)
        self.length = length
        if hasattr(self.cache, "get_seq_length") and self.cache.get_seq_length() != length:
            raise RuntimeError(
                f"{type(self.cache).__name__}.crop left {self.cache.get_seq_length()} tokens instead of "
                f"{length}: this cache cannot be rolled back, so speculative decoding cannot use it"
            )


def crop_cache(cache: Any, remove: int) -> Any:
    """The cache without its last ``remove`` tokens (a ``Cache`` is cropped in place)."""
    if hasattr(cache, "crop"):
        cache.crop(-remove)
        return cache
    if isinstance(cache, tuple | list):  # legacy: per layer (key, value, ...) of (B, heads, T, D)
        return tuple(tuple(tensor[..., :-remove, :] for tensor in layer) for layer in cache)
    raise TypeError(
        f"cannot roll back a KV cache of type {type(cache).__name__}: expected a transformers Cache "
        "with crop() or a tuple of (key, value) tensors"
    )


def _input_device(model: nn.Module) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def vocabulary_size(model: nn.Module) -> int | None:
    """Rows of the output layer (the width of the logits), or None if there is no such layer."""
    inner = unwrap_model(model)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    return int(weight.shape[0]) if isinstance(weight, torch.Tensor) else None
