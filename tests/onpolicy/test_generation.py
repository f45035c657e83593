"""Sampling completions: inverse-CDF token choice, and GenerateSampler (Hugging Face generate
with a KV cache) against a full forward pass without a cache."""

from __future__ import annotations

import pytest
import torch
from onpolicy_kit import VOCAB, tiny_gpt2

from darkknowledge.llm import Completions, GenerateSampler, Sampler
from darkknowledge.llm.generation import pick_tokens, row_uniforms
from darkknowledge.llm.on_policy import sampled_batch


def test_pick_tokens_frequencies_are_the_probabilities():
    """Uniforms on a regular grid give each token a share equal to its probability (to the
    grid's resolution): the full distribution, or its top-k / nucleus renormalised."""
    torch.manual_seed(0)
    logits = torch.randn(1, 7) * 2
    count = 70_000
    grid = (torch.arange(count, dtype=torch.float64) + 0.5) / count

    def shares(**options):
        tokens = pick_tokens(logits.expand(count, 7), grid, **options)
        return torch.bincount(tokens, minlength=7).double() / count

    probs = torch.softmax(logits[0].double() / 0.6, -1)
    torch.testing.assert_close(shares(temperature=0.6), probs, rtol=0, atol=2 / count)
    order = probs.argsort(descending=True)
    top3 = torch.zeros_like(probs)
    top3[order[:3]] = probs[order[:3]] / probs[order[:3]].sum()
    torch.testing.assert_close(shares(temperature=0.6, top_k=3), top3, rtol=0, atol=2 / count)
    mass = probs[order].cumsum(0)
    kept = order[: int((mass < 0.8).sum()) + 1]  # the smallest set holding 0.8
    nucleus = torch.zeros_like(probs)
    nucleus[kept] = probs[kept] / probs[kept].sum()
    torch.testing.assert_close(shares(temperature=0.6, top_p=0.8), nucleus, rtol=0, atol=2 / count)


def _left_padded_prompts():
    generator = torch.Generator().manual_seed(1)
    lengths = [4, 2, 5]
    ids = torch.zeros(3, 5, dtype=torch.long)
    mask = torch.zeros(3, 5, dtype=torch.long)
    for row, length in enumerate(lengths):
        ids[row, 5 - length :] = torch.randint(1, VOCAB, (length,), generator=generator)
        mask[row, 5 - length :] = 1
    return ids, mask


def test_generate_sampler_samples_what_a_full_forward_pass_gives():
    """Every sampled token is the inverse-CDF choice of the model's distribution at the sampling
    temperature, given the tokens before it, as a forward pass without KV cache computes it on
    the prompt + completion laid out from position 0 (left padding does not shift positions)."""
    model = tiny_gpt2(0).train()
    prompts, mask = _left_padded_prompts()
    seeds = torch.tensor([11, 12, 13])
    sampler = GenerateSampler(temperature=0.7)
    assert isinstance(sampler, Sampler)
    rng = torch.get_rng_state()
    out = sampler(model, prompts, mask, max_new_tokens=6, seeds=seeds)
    assert torch.equal(torch.get_rng_state(), rng), "sampling must not touch the global RNG"
    assert model.training, "the model's mode is restored"
    assert out.ids.shape == (3, 6) and bool(out.mask.all())
    batch = sampled_batch(prompts, mask, out)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    uniforms = row_uniforms(seeds, 6)
    for row, length in enumerate(mask.sum(-1).tolist()):
        for step in range(6):
            position = length + step - 1  # the logits that predict completion token `step`
            chosen = pick_tokens(
                logits[row, position].unsqueeze(0),
                uniforms[row, step].unsqueeze(0),
                temperature=0.7,
            )
            assert int(chosen) == int(out.ids[row, step]), (row, step)
    # A row's completion depends on its prompt and seed only, not on the rest of the batch.
    alone = sampler(model, prompts[1:2, 3:], mask[1:2, 3:], max_new_tokens=6, seeds=seeds[1:2])
    assert torch.equal(alone.ids[0], out.ids[1])
    hotter = GenerateSampler(temperature=2.0)(model, prompts, mask, max_new_tokens=6, seeds=seeds)
    assert not torch.equal(hotter.ids, out.ids), "the sampling temperature changes the samples"


def test_generate_sampler_ends_rows_only_at_its_own_end_token():
    model = tiny_gpt2(2)
    prompts, mask = _left_padded_prompts()
    seeds = torch.tensor([5, 6, 7])
    free = GenerateSampler()(model, prompts, mask, max_new_tokens=8, seeds=seeds)
    end = int(free.ids[0, 2])  # a token row 0 emits third
    model.generation_config.eos_token_id = end  # the model's own default must not stop us
    again = GenerateSampler()(model, prompts, mask, max_new_tokens=8, seeds=seeds)
    assert torch.equal(again.ids, free.ids) and bool(again.mask.all())
    ended = GenerateSampler(eos_token_id=end, pad_token_id=0)(
        model, prompts, mask, max_new_tokens=8, seeds=seeds
    )
    for row in range(3):
        hits = (free.ids[row] == end).nonzero()
        stop = int(hits[0]) + 1 if len(hits) else 8  # up to and including the end token
        assert ended.mask[row].tolist() == [True] * stop + [False] * (8 - stop)
        assert torch.equal(ended.ids[row, :stop], free.ids[row, :stop])
    assert isinstance(ended, Completions)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"top_k": 0}, "top_k must be an int >= 1"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
    ],
)
def test_generate_sampler_refuses_bad_settings(options, message):
    with pytest.raises(ValueError, match=message):
        GenerateSampler(**options)
