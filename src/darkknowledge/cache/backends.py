"""Capture backends: what turns a batch of token ids into the teacher's sparse targets.

:class:`CaptureBackend` is the whole contract; :func:`write_teacher_cache` does everything
else (keys, batching, sampling seeds, shards, manifest, resume, processes). A backend gets
right-padded ``input_ids`` ``(B, T)`` and a boolean ``attention_mask`` ``(B, T)`` and returns,
for every position ``t`` (the teacher's prediction of token ``t + 1``, i.e. its logits at ``t``),
with ``log p = log_softmax(z / temperature)``:

- ``topk``: ``(ids, log_probs)``, each ``(B, T, k)``, ids int64, log-probs float32, sorted by
  decreasing probability;
- ``sample``: the draws ``(B, T, n)`` int64 given uniforms ``u`` ``(B, T, n)`` float64 in [0, 1):
  draw ``j`` is the smallest id ``v`` with ``u_j · Σ p < cumsum(p)_v`` (inverse CDF), so the
  same uniforms give the same draws on any engine.

Values at masked positions are ignored. ``describe()`` names the teacher for the manifest.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from ..llm.heads import last_hidden_states, logits_from_hidden, output_layer, unwrap_model
from ..losses._checks import check_count
from .hashing import weights_hash

DEFAULT_CHUNK_SIZE = 256


@runtime_checkable
class CaptureBackend(Protocol):
    """What :func:`darkknowledge.cache.write_teacher_cache` needs from a teacher."""

    vocab_size: int

    def describe(self) -> dict[str, Any]:
        """``{"backend": str, "name": str, "weights_sha256": str, "output_layer_shape": [V, H] | None}``."""
        ...

    def topk(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, k: int, temperature: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k ids ``(B, T, k)`` and their log-probabilities at ``temperature``."""
        ...

    def sample(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        uniforms: torch.Tensor,
        temperature: float,
    ) -> torch.Tensor:
        """Inverse-CDF draws ``(B, T, n)`` from ``softmax(z / temperature)`` for ``uniforms``."""
        ...


def inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Draws ``(N, n)`` from rows of ``probs`` ``(N, V)`` for ``uniforms`` ``(N, n)``: the
    smallest ``v`` with ``u · Σ p < cumsum(p)_v``, the cumulative sum in float64 (zero-probability
    ids are never drawn).

    >>> inverse_cdf(torch.tensor([[0.25, 0.0, 0.75]]), torch.tensor([[0.1, 0.25, 0.9]])).tolist()
    [[0, 2, 2]]
    """
    cdf = probs.to(torch.float64).cumsum(dim=-1)  # (N, V)
    targets = uniforms.to(cdf.device, torch.float64) * cdf[:, -1:]  # (N, n)
    draws = torch.searchsorted(cdf, targets, right=True)
    return draws.clamp_(max=probs.shape[-1] - 1)


class HuggingFaceBackend:
    """A Hugging Face causal LM as a capture backend, on the device its weights are on.

    The model runs once per batch to its last hidden states; the logits are then projected
    ``chunk_size`` valid positions at a time (``darkknowledge.llm`` output layer, with its logit
    scale and soft-cap), so memory beyond the model is ``O(chunk_size × V)`` in float32
    (twice that in float64 for the cumulative sum when sampling), never ``(B, T, V)``.
    """

    def __init__(self, model: nn.Module, *, chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"teacher must be a Hugging Face causal LM (torch.nn.Module) for the default "
                f"backend, got {type(model).__name__}; pass backend= for other teachers"
            )
        check_count(chunk_size, "chunk_size", "a positive int")
        self.model, self.chunk_size = model, chunk_size
        self.vocab_size = int(output_layer(model).weight.shape[0])

    def describe(self) -> dict[str, Any]:
        inner = unwrap_model(self.model)
        name = getattr(getattr(inner, "config", None), "name_or_path", "") or type(inner).__name__
        return {
            "backend": "huggingface",
            "name": str(name),
            "weights_sha256": weights_hash(inner),
            "output_layer_shape": list(output_layer(inner).weight.shape),
        }

    def topk(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, k: int, temperature: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch, length = input_ids.shape
        ids = torch.zeros(batch * length, k, dtype=torch.int64)
        log_probs = torch.zeros(batch * length, k, dtype=torch.float32)
        for rows, chunk in self._log_probs(input_ids, attention_mask, temperature):
            top = chunk.topk(k, dim=-1)  # sorted, largest first
            ids[rows], log_probs[rows] = top.indices.cpu(), top.values.cpu()
        return ids.view(batch, length, k), log_probs.view(batch, length, k)

    def sample(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        uniforms: torch.Tensor,
        temperature: float,
    ) -> torch.Tensor:
        batch, length, count = uniforms.shape
        flat_uniforms = uniforms.reshape(batch * length, count)
        draws = torch.zeros(batch * length, count, dtype=torch.int64)
        for rows, chunk in self._log_probs(input_ids, attention_mask, temperature):
            draws[rows] = inverse_cdf(chunk.exp(), flat_uniforms[rows]).cpu()
        return draws.view(batch, length, count)

    def _log_probs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, temperature: float
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(rows, log_softmax(z[rows] / temperature))`` over the valid positions of the
        flattened batch, ``chunk_size`` rows at a time (float32)."""
        layer = output_layer(self.model)
        device = layer.weight.device
        with _evaluating(self.model), torch.inference_mode():
            hidden = last_hidden_states(
                self.model, input_ids.to(device), attention_mask.to(device, torch.long)
            )  # (B, T, H)
            hidden = hidden.reshape(-1, hidden.shape[-1])  # (B·T, H)
            valid = attention_mask.reshape(-1).nonzero().squeeze(-1)  # (N,) CPU row numbers
            for start in range(0, valid.numel(), self.chunk_size):
                rows = valid[start : start + self.chunk_size]
                logits = logits_from_hidden(hidden[rows.to(device)], layer).float()  # (chunk, V)
                yield rows, torch.log_softmax(logits / temperature, dim=-1)


@contextlib.contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    """The model in eval mode (no dropout) for the block, its own mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
