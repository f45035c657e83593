"""Shared by the cache tests and their subprocess worker: a tiny teacher and a ragged dataset."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "llm"))
from tiny_models import tiny_gpt2


def teacher(vocab_size: int = 40, seed: int = 3):
    """A tiny GPT-2 teacher in eval mode (dropout is off anyway)."""
    return tiny_gpt2(seed, n_embd=16, vocab_size=vocab_size).eval()


def ragged_dataset(
    count: int = 10, *, vocab_size: int = 40, seed: int = 0, with_ids: bool = True
) -> list[dict]:
    """``count`` sequences of 3 to 14 tokens; every third has no ``id`` (keyed by content), and
    one is left-padded (its attention mask hides the first two positions)."""
    generator = torch.Generator().manual_seed(seed)
    data = []
    for index in range(count):
        length = int(torch.randint(3, 15, (1,), generator=generator))
        example = {"input_ids": torch.randint(0, vocab_size, (length,), generator=generator)}
        if with_ids and index % 3 != 2:
            example["id"] = f"doc-{index}" if index % 2 else index
        data.append(example)
    mask = torch.ones_like(data[1]["input_ids"])
    mask[:2] = 0
    data[1]["attention_mask"] = mask
    return data


def direct_log_probs(model, example: dict, temperature: float = 1.0) -> torch.Tensor:
    """float64 ``log_softmax(z / T)`` ``(T, V)`` of one sequence alone (no batch, no padding)."""
    ids = torch.as_tensor(example["input_ids"])[None]
    mask = example.get("attention_mask")
    with torch.no_grad():
        logits = model(
            input_ids=ids, attention_mask=None if mask is None else torch.as_tensor(mask)[None]
        ).logits[0]
    return torch.log_softmax(logits.double() / temperature, dim=-1)


def files(folder: Path) -> dict[str, bytes]:
    """Every file of a folder (hidden ones included) by name, with its bytes."""
    return {path.name: path.read_bytes() for path in sorted(Path(folder).iterdir())}
