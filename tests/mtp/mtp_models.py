"""Tiny GPT-2 students and float64 references for the dk.mtp tests (nothing downloaded)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for reference.py
import reference

transformers.logging.set_verbosity_error()
IGNORE = -100


def tiny_lm(seed: int = 0, *, n_embd: int = 16, n_layer: int = 1, vocab_size: int = 32):
    """A GPT-2 without dropout; initializer_range 0.2 makes its greedy continuations vary."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=vocab_size, n_positions=64, n_embd=n_embd, n_layer=n_layer, n_head=2,
        initializer_range=0.2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


def padded_batch(vocab: int, seed: int = 0):
    """``input_ids``, ``attention_mask`` (row 1 right-padded, row 2 left-padded) and
    Hugging Face-style unshifted ``targets`` (row 0's two prompt tokens are ``IGNORE``)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(vocab, (3, 9), generator=generator)
    attention_mask = torch.ones(3, 9, dtype=torch.long)
    attention_mask[1, 6:] = 0
    attention_mask[2, :2] = 0
    targets = input_ids.clone()
    targets[0, :2] = IGNORE
    return input_ids, attention_mask, targets


def reference_triples(input_ids, attention_mask, targets, depth):
    """``(b, i, token)`` for every row ``i`` of depth ``depth`` that predicts a counted token,
    written out position by position: the predicted token is ``j = i + depth + 1``; positions
    ``i``, ``i + depth`` (the teacher's) and ``j`` must be real, and ``targets[b, j]`` counted."""
    batch, length = input_ids.shape
    triples = []
    for b in range(batch):
        for i in range(length):
            j = i + depth + 1
            if j >= length:
                continue
            if not (attention_mask[b, i] and attention_mask[b, i + depth] and attention_mask[b, j]):
                continue
            if targets[b, j] == IGNORE:
                continue
            triples.append((b, i, int(input_ids[b, j])))
    return triples


def reference_mtp_loss(
    states, weight, input_ids, attention_mask, targets, depths, weights, *,
    teacher_hidden=None, teacher_weight=None, temperature=1.0, alpha=0.0,
    divergence="forward_kl", normalizer=None,
):  # fmt: skip
    """``Σ_d w_d · L_d`` from full float64 logits; returns the total and ``{d: (total, soft,
    hard)}``. Teacher row for student row i of depth d: i + d."""
    total, parts = 0.0, {}
    for state, depth, w in zip(states, depths, weights):
        triples = reference_triples(input_ids, attention_mask, targets, depth)
        if not triples:
            parts[depth] = (torch.zeros((), dtype=torch.float64),) * 3
            continue
        rows = torch.stack([state[b, i] for b, i, _ in triples]).double()
        labels = torch.tensor([token for _, _, token in triples])
        student_logits = rows @ weight.double().T
        if teacher_hidden is None:
            hard = -torch.log_softmax(student_logits, -1).gather(-1, labels[:, None]).squeeze(-1)
            hard = hard.sum() / (normalizer or len(triples))
            part = (hard, torch.zeros_like(hard), hard)
        else:
            teacher_rows = torch.stack([teacher_hidden[b, i + depth] for b, i, _ in triples])
            teacher_logits = teacher_rows.double() @ teacher_weight.double().T
            part = reference.kd_loss(
                student_logits, teacher_logits, labels, temperature=temperature, alpha=alpha,
                divergence=divergence, normalizer=normalizer,
            )  # fmt: skip
        parts[depth] = part
        total = total + w * part[0]
    return total, parts
