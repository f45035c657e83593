"""The sparse targets of one shard's sequences, batched through a capture backend.

Sequences are batched longest first inside the shard (less padding), right-padded with token
0, and written back in dataset order. Positions an example's own ``attention_mask`` hides get
the padding entry (id -1, value 0) in every column.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch

from .backends import CaptureBackend
from .hashing import Example, sampling_uniforms


class Request(NamedTuple):
    """What to capture (validated by :func:`write_teacher_cache`)."""

    representation: str  # "topk" | "sampled"
    width: int  # k, or the number of samples
    temperature: float
    seed: int
    values_dtype: str  # "float16" | "bfloat16", the stored dtype of values


def capture_sequences(
    backend: CaptureBackend,
    examples: Sequence[Example],
    request: Request,
    *,
    batch_size: int,
    on_batch: Callable[[int], Any] = lambda count: None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(ids, values)`` of shape ``(T_i, width)`` (int64, float32) for every example, in order."""
    order = sorted(range(len(examples)), key=lambda j: -examples[j].input_ids.numel())
    results: list[Any] = [None] * len(examples)
    for start in range(0, len(order), batch_size):
        members = order[start : start + batch_size]
        batch = [examples[j] for j in members]
        ids, values, mask = _capture_batch(backend, batch, request)
        for row, j in enumerate(members):
            length = batch[row].input_ids.numel()
            keep = mask[row, :length, None]  # (T_i, 1)
            results[j] = (
                torch.where(keep, ids[row, :length], -1),
                torch.where(keep, values[row, :length], 0.0),
            )
        on_batch(len(members))
    return results


def _capture_batch(
    backend: CaptureBackend, batch: list[Example], request: Request
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ids, values, mask)``: ``(B, T, width)`` targets of a padded batch, and its mask."""
    length = max(example.input_ids.numel() for example in batch)
    input_ids = torch.zeros(len(batch), length, dtype=torch.int64)
    mask = torch.zeros(len(batch), length, dtype=torch.bool)
    for row, example in enumerate(batch):
        size = example.input_ids.numel()
        input_ids[row, :size] = example.input_ids
        mask[row, :size] = True if example.attention_mask is None else example.attention_mask
    shape = (len(batch), length, request.width)
    if request.representation == "topk":
        ids, values = backend.topk(
            input_ids, mask, k=request.width, temperature=request.temperature
        )
        _check_output(backend, "topk", ids, shape, integer=True)
        _check_output(backend, "topk", values, shape, integer=False)
        values = values.detach().to("cpu", torch.float32)
    else:
        uniforms = torch.zeros(shape, dtype=torch.float64)
        for row, example in enumerate(batch):
            size = example.input_ids.numel()
            uniforms[row, :size] = sampling_uniforms(request.seed, example.key, size, request.width)
        ids = backend.sample(input_ids, mask, uniforms=uniforms, temperature=request.temperature)
        _check_output(backend, "sample", ids, shape, integer=True)
    ids = ids.detach().to("cpu", torch.int64)
    in_vocabulary = (ids >= 0) & (ids < backend.vocab_size)
    if not bool(in_vocabulary[mask].all()):
        raise ValueError(
            f"{type(backend).__name__} returned token ids outside [0, {backend.vocab_size}) "
            "at a valid position"
        )
    if request.representation == "sampled":
        ids, values = unique_counts(ids)
    else:  # checked once here, so that training from a verified cache need not check again
        ordered = ids.sort(dim=-1).values
        if bool((ordered[..., 1:] == ordered[..., :-1])[mask].any()):
            raise ValueError(
                f"{type(backend).__name__}.topk returned the same token id twice at a valid "
                "position; top-k ids must be distinct"
            )
    return ids, values, mask


def unique_counts(draws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``draws`` ``(..., n)``: the distinct ids in increasing order and their counts,
    padded to width ``n`` with id -1 and count 0.

    >>> ids, counts = unique_counts(torch.tensor([[5, 2, 5, 5]]))
    >>> ids.tolist(), counts.tolist()
    ([[2, 5, -1, -1]], [[1.0, 3.0, 0.0, 0.0]])
    """
    ordered = draws.sort(dim=-1).values
    starts = torch.ones_like(ordered, dtype=torch.bool)
    starts[..., 1:] = ordered[..., 1:] != ordered[..., :-1]
    slot = starts.cumsum(dim=-1) - 1  # which distinct id each draw is
    ids = torch.full_like(ordered, -1).scatter_(-1, slot, ordered)
    counts = torch.zeros(ordered.shape, dtype=torch.float32).scatter_add_(
        -1, slot, torch.ones(ordered.shape, dtype=torch.float32)
    )
    return ids, counts


def _check_output(
    backend: CaptureBackend, method: str, value: Any, shape: tuple[int, ...], *, integer: bool
) -> None:
    """A backend's output has the promised shape and kind, or the error names the backend."""
    name = f"{type(backend).__name__}.{method}"
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must return torch.Tensor outputs, got {type(value).__name__}")
    if tuple(value.shape) != shape:
        raise ValueError(
            f"{name} returned shape {tuple(value.shape)}, expected {shape} (B, T, width)"
        )
    if integer == value.is_floating_point():
        kind = "integer ids" if integer else "floating-point log-probabilities"
        raise TypeError(f"{name} must return {kind}, got dtype {value.dtype}")
