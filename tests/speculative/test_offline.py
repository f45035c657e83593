"""offline_acceptance_rate against a naive float64 reference written position by position from
full logits (padding, prompts, chunks with a leftover, temperature, greedy, a narrower draft)."""

from __future__ import annotations

import pytest
import torch
import transformers
from speculative_models import tiny_lm

from darkknowledge.speculative import offline_acceptance_rate


def naive_rate(target, draft, batches, *, temperature, greedy, vocab):
    """Mean over counted positions (t predicts t + 1: both real, t + 1 past the prompt) of
    Σ_x min(p, q), from the models' full logits in float64."""
    total, count = 0.0, 0
    for batch in batches:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        prompt = batch.get("prompt_lengths")
        with torch.no_grad():
            p_logits = target(input_ids=ids, attention_mask=mask).logits.double()
            q_logits = draft(input_ids=ids, attention_mask=mask).logits.double()
        for b in range(ids.shape[0]):
            real = [t for t in range(ids.shape[1]) if mask[b, t]]
            first = real[0]
            for t in real:
                if t + 1 >= ids.shape[1] or not mask[b, t + 1]:
                    continue
                if prompt is not None and t + 1 - first < int(prompt[b]):
                    continue
                p_row, q_row = p_logits[b, t], q_logits[b, t]
                if q_row.shape[0] < vocab:  # tokens the draft lacks: probability 0
                    q_row = torch.cat(
                        [q_row, q_row.new_full((vocab - q_row.shape[0],), -torch.inf)]
                    )
                if greedy:
                    overlap = float(p_row.argmax() == q_row.argmax())
                else:
                    p = torch.softmax(p_row / temperature, -1)
                    q = torch.softmax(q_row / temperature, -1)
                    overlap = float(torch.minimum(p, q).sum())
                total += overlap
                count += 1
    return total / count, count


def batches_with_padding(vocab: int):
    generator = torch.Generator().manual_seed(0)
    right = torch.randint(vocab, (2, 11), generator=generator)
    right_mask = torch.ones_like(right)
    right_mask[1, 7:] = 0
    left = torch.randint(vocab, (2, 11), generator=generator)
    left_mask = torch.ones_like(left)
    left_mask[0, :3] = 0
    return [
        {"input_ids": right, "attention_mask": right_mask},
        {"input_ids": left, "attention_mask": left_mask, "prompt_lengths": torch.tensor([2, 4])},
    ]


@pytest.mark.parametrize(("temperature", "greedy"), [(1.0, False), (0.7, False), (1.0, True)])
def test_offline_acceptance_rate_matches_naive_reference(temperature, greedy):
    target, draft = tiny_lm(0), tiny_lm(1, n_layer=1, n_embd=16)
    batches = batches_with_padding(24)
    expected, count = naive_rate(
        target, draft, batches, temperature=temperature, greedy=greedy, vocab=24
    )
    result = offline_acceptance_rate(
        target, draft, batches, temperature=temperature, greedy=greedy, chunk_size=5
    )
    assert result.positions == count
    assert result.rate == pytest.approx(expected, abs=1e-6)
    assert 0.0 < result.rate < 1.0  # the random models neither agree nor disagree everywhere


def test_offline_acceptance_rate_narrower_draft_gives_missing_tokens_zero():
    target = tiny_lm(0)
    config = transformers.GPT2Config(
        vocab_size=20, n_positions=64, n_embd=16, n_layer=1, n_head=2, initializer_range=0.2
    )
    torch.manual_seed(2)
    draft = transformers.GPT2LMHeadModel(config).eval()
    batch = {
        "input_ids": torch.randint(20, (3, 9)),
        "attention_mask": torch.ones(3, 9, dtype=torch.long),
    }
    expected, _ = naive_rate(target, draft, [batch], temperature=1.0, greedy=False, vocab=24)
    result = offline_acceptance_rate(target, draft, [batch["input_ids"]])
    assert result.rate == pytest.approx(expected, abs=1e-6)


def test_offline_acceptance_rate_refuses_bad_input():
    model = tiny_lm(0)
    with pytest.raises(ValueError, match="temperature"):
        offline_acceptance_rate(model, model, [torch.zeros(1, 4, dtype=torch.long)], temperature=0)
    with pytest.raises(ValueError, match="chunk_size"):
        offline_acceptance_rate(model, model, [torch.zeros(1, 4, dtype=torch.long)], chunk_size=0)
    empty = {"input_ids": torch.zeros(1, 4, dtype=torch.long), "attention_mask": torch.zeros(1, 4)}
    with pytest.raises(ValueError, match="no position"):
        offline_acceptance_rate(model, model, [empty])
