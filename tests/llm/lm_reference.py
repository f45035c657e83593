"""A hand-written reference for causal-LM distillation: full logits, labels shifted by hand.

Shares nothing with darkknowledge but the models: the labels follow the rule of docs/llm.md
written out position by position, and the loss is tests/reference.py's float64 ``kd_loss``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for reference.py
import reference

IGNORE = -100


def shifted_labels_by_hand(examples: list[dict]) -> torch.Tensor:
    """``(B, T)``: position t predicts token t+1 when t and t+1 are real, t+1 is past the
    prompt (counted from the row's first real token) and its HF label is not IGNORE."""
    rows = []
    for example in examples:
        ids, mask = example["input_ids"].tolist(), example["attention_mask"].tolist()
        hf_labels = example.get("labels", example["input_ids"]).tolist()
        prompt = int(example.get("prompt_lengths", 0))
        first_real = mask.index(1)
        row = [IGNORE] * len(ids)
        for t in range(len(ids) - 1):
            both_real = mask[t] and mask[t + 1]
            if both_real and hf_labels[t + 1] != IGNORE and t + 1 - first_real >= prompt:
                row[t] = ids[t + 1]
        rows.append(row)
    return torch.tensor(rows)


def stacked(examples: list[dict], key: str) -> torch.Tensor:
    return torch.stack([example[key] for example in examples])


def reference_parts(student, teacher, examples, *, temperature: float, alpha: float):
    """``(total, soft, hard)`` over all examples as one batch, float64, differentiable."""
    ids, mask = stacked(examples, "input_ids"), stacked(examples, "attention_mask")
    student_logits = student(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
    with torch.no_grad():
        teacher_logits = teacher(input_ids=ids, attention_mask=mask).logits
    labels = shifted_labels_by_hand(examples)
    vocab = student_logits.shape[-1]
    return reference.kd_loss(
        student_logits.reshape(-1, vocab),
        teacher_logits.reshape(-1, vocab),
        labels.reshape(-1),
        temperature=temperature,
        alpha=alpha,
    )


def left_padded(count: int, *, seed: int = 0, length: int = 8, vocab_size: int = 40) -> list[dict]:
    """Left-padded examples of different lengths and prompt lengths, HF-style labels (IGNORE
    on padding), as a tokenizer with ``padding_side="left"`` and a collator give them."""
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for i in range(count):
        real = (8, 6, 5, 3)[i % 4]
        mask = (torch.arange(length) >= length - real).long()
        ids = torch.randint(1, vocab_size, (length,), generator=generator) * mask
        examples.append(
            {
                "input_ids": ids,
                "attention_mask": mask,
                "labels": torch.where(mask.bool(), ids, IGNORE),
                "prompt_lengths": torch.tensor((2, 1, 2, 0)[i % 4]),
            }
        )
    return examples
