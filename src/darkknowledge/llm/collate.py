"""``PaddingCollator``: ragged token sequences -> one padded causal-LM batch.

Each example is a mapping with ``input_ids`` (a list of ints or a 1-D tensor) and optionally
``attention_mask``, unshifted ``labels``, ``completion_mask`` (same length as ``input_ids``) and
``prompt_lengths`` (one int). The batch has what :class:`darkknowledge.llm.CausalLMTask` and
:class:`darkknowledge.hf.DistillationTrainer` read: ``input_ids`` and ``attention_mask``
``(B, L)``, and ``labels``, ``completion_mask`` ``(B, L)`` and ``prompt_lengths`` ``(B,)`` when
the examples have them. Padding is marked 0 in ``attention_mask``, ``ignore_index`` in
``labels`` and False in ``completion_mask``; ``prompt_lengths`` count from the first real token,
so they need no change on either side.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

# Keys with one value per token (padded), and all the keys an example may have.
_PER_TOKEN = ("input_ids", "attention_mask", "labels", "completion_mask")
KEYS = (*_PER_TOKEN, "prompt_lengths")


class PaddingCollator:
    """Pad ragged examples into one batch (a ``collate_fn`` / ``data_collator``).

    Args:
        pad_token_id: the id written into ``input_ids`` at padding (masked out anyway).
        padding_side: ``"right"`` (training) or ``"left"`` (generation, and what many chat
            pipelines use); the loss gives the same value either way.
        pad_to_multiple_of: round the padded length up to a multiple of this (e.g. 8 for
            tensor cores), or None.
        ignore_index: the ``labels`` value at padding.

    >>> collate = PaddingCollator(pad_token_id=0, padding_side="left")
    >>> batch = collate([{"input_ids": [5, 6, 7], "prompt_lengths": 1}, {"input_ids": [8, 9], "prompt_lengths": 1}])
    >>> batch["input_ids"]
    tensor([[5, 6, 7],
            [0, 8, 9]])
    >>> batch["attention_mask"]
    tensor([[1, 1, 1],
            [0, 1, 1]])
    >>> batch["prompt_lengths"]
    tensor([1, 1])
    """

    def __init__(
        self,
        pad_token_id: int = 0,
        *,
        padding_side: str = "right",
        pad_to_multiple_of: int | None = None,
        ignore_index: int = -100,
    ) -> None:
        for name, value in (("pad_token_id", pad_token_id), ("ignore_index", ignore_index)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {name}={value!r}")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if pad_to_multiple_of is not None and (
            isinstance(pad_to_multiple_of, bool)
            or not isinstance(pad_to_multiple_of, int)
            or pad_to_multiple_of < 1
        ):
            raise ValueError(
                f"pad_to_multiple_of must be a positive int or None, got {pad_to_multiple_of!r}"
            )
        self.pad_token_id, self.padding_side = pad_token_id, padding_side
        self.pad_to_multiple_of, self.ignore_index = pad_to_multiple_of, ignore_index

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        keys = _check_keys(examples)
        rows = [_sequences(example, index, keys) for index, example in enumerate(examples)]
        length = max(row["input_ids"].numel() for row in rows)
        if self.pad_to_multiple_of is not None:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        fill = {
            "input_ids": self.pad_token_id,
            "attention_mask": 0,
            "labels": self.ignore_index,
            "completion_mask": False,
        }
        batch = {
            key: torch.stack([self._pad(row[key], length, fill[key]) for row in rows])
            for key in (*_PER_TOKEN[:2], *(k for k in _PER_TOKEN[2:] if k in keys))
        }  # each (B, L)
        if "prompt_lengths" in keys:
            batch["prompt_lengths"] = torch.tensor(
                [int(example["prompt_lengths"]) for example in examples], dtype=torch.long
            )  # (B,)
        return batch

    def _pad(self, values: torch.Tensor, length: int, fill: Any) -> torch.Tensor:
        padding = values.new_full((length - values.numel(),), fill)
        parts = (padding, values) if self.padding_side == "left" else (values, padding)
        return torch.cat(parts)


def _check_keys(examples: Sequence[Mapping[str, Any]]) -> frozenset[str]:
    if not isinstance(examples, Sequence) or not examples:
        raise ValueError(
            f"examples must be a non-empty list of mappings, got {type(examples).__name__}"
            + (" of length 0" if isinstance(examples, Sequence) else "")
        )
    first = examples[0]
    if not isinstance(first, Mapping) or "input_ids" not in first:
        raise TypeError(
            "each example must be a mapping with 'input_ids', got "
            + (f"keys {sorted(first)}" if isinstance(first, Mapping) else type(first).__name__)
        )
    keys = frozenset(first)
    unknown = sorted(keys - set(KEYS))
    if unknown:
        raise ValueError(
            f"examples have keys {unknown} that PaddingCollator does not know how to pad; "
            f"allowed: {', '.join(KEYS)} (drop the others first)"
        )
    for index, example in enumerate(examples):
        if not isinstance(example, Mapping) or frozenset(example) != keys:
            found = sorted(example) if isinstance(example, Mapping) else type(example).__name__
            raise ValueError(
                f"example {index} has keys {found}, example 0 has {sorted(keys)}: "
                "every example needs the same keys"
            )
    return keys


def _sequences(example: Mapping[str, Any], index: int, keys: frozenset[str]) -> dict:
    """The example's per-token values as 1-D tensors of one length."""
    ids = _as_1d(example["input_ids"], index, "input_ids", torch.long)
    row = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids)
        if "attention_mask" not in keys
        else _as_1d(example["attention_mask"], index, "attention_mask", torch.long),
    }
    if "labels" in keys:
        row["labels"] = _as_1d(example["labels"], index, "labels", torch.long)
    if "completion_mask" in keys:
        row["completion_mask"] = _as_1d(
            example["completion_mask"], index, "completion_mask", torch.bool
        )
    for key, values in row.items():
        if values.numel() != ids.numel():
            raise ValueError(
                f"example {index}: {key} has {values.numel()} entries, input_ids has {ids.numel()}"
            )
    return row


def _as_1d(values: Any, index: int, key: str, dtype: torch.dtype) -> torch.Tensor:
    tensor = torch.as_tensor(values)
    if tensor.dim() != 1 or tensor.dtype.is_floating_point:
        raise ValueError(
            f"example {index}: {key} must be a 1-D sequence of integers, got shape "
            f"{tuple(tensor.shape)} and dtype {tensor.dtype}"
        )
    return tensor.to(dtype)
