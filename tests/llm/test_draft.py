"""Teacher samples for draft distillation: exact sampling with a KV cache (same draws as a
naive sampler without cache; first-token frequencies against the softmax), the disk cache
keyed by settings, and the batches served to the Distiller."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_gpt2

from darkknowledge.llm.draft import SampleBatches, cached_teacher_samples, sample_continuations
from darkknowledge.speculative.verify import sample_from


def naive_samples(model, prompts, new_tokens, temperature, generator):
    """A full forward pass over the whole sequence per token, no cache."""
    sequence = prompts.clone()
    for _ in range(new_tokens):
        with torch.no_grad():
            logits = model(sequence).logits[:, -1].double()
        probs = torch.softmax(logits / temperature, -1).float()
        sequence = torch.cat([sequence, sample_from(probs, generator).reshape(-1, 1)], 1)
    return sequence


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_sample_continuations_equals_naive_sampler(temperature):
    model = tiny_gpt2(0, n_embd=16, n_layer=2).eval()
    prompts = torch.randint(40, (5, 3), generator=torch.Generator().manual_seed(1))
    fast = sample_continuations(
        model, prompts, new_tokens=12, temperature=temperature,
        generator=torch.Generator().manual_seed(7),
    )  # fmt: skip
    slow = naive_samples(model, prompts, 12, temperature, torch.Generator().manual_seed(7))
    assert torch.equal(fast, slow)
    assert len({tuple(row.tolist()) for row in fast}) == 5  # the rows differ


def test_sample_continuations_first_token_follows_the_model():
    model = tiny_gpt2(3, n_embd=16, vocab_size=6).eval()
    prompts = torch.full((20_000, 2), 1)
    tokens = sample_continuations(
        model, prompts, new_tokens=1, generator=torch.Generator().manual_seed(0)
    )[:, -1]
    with torch.no_grad():
        p = torch.softmax(model(prompts[:1]).logits[0, -1].double(), -1)
    observed = torch.bincount(tokens, minlength=6).double()
    expected = 20_000 * p
    chi_square = float(((observed - expected) ** 2 / expected).sum())
    assert chi_square < 20.5  # chi-square, 5 degrees of freedom, p = 0.001


def test_cached_teacher_samples_reads_the_cache_and_keys_it(tmp_path):
    model = tiny_gpt2(0).eval()
    text = torch.randint(40, (500,), generator=torch.Generator().manual_seed(0))
    options = {
        "count": 6,
        "prompt_length": 3,
        "length": 10,
        "cache_path": tmp_path / "s.safetensors",
    }
    first = cached_teacher_samples(model, text, key={"teacher": "a"}, **options)
    assert first.shape == (6, 10)
    starts = [any(torch.equal(row[:3], text[s : s + 3]) for s in range(498)) for row in first]
    assert all(starts)  # each prompt is a window of the text

    class Exploding(torch.nn.Module):
        def forward(self, *args, **kwargs):
            raise AssertionError("the cache should have been read")

    again = cached_teacher_samples(Exploding(), text, key={"teacher": "a"}, **options)
    assert torch.equal(again, first)
    other = cached_teacher_samples(model, text, key={"teacher": "a"}, seed=1, **options)
    assert not torch.equal(other, first)  # another seed: sampled again, and cached in its place
    with pytest.raises(ValueError, match="prompt_length"):
        cached_teacher_samples(model, text, key={}, **{**options, "prompt_length": 10})


def test_sample_batches_shapes_and_epochs():
    samples = torch.arange(40).reshape(10, 4)
    batches = SampleBatches(samples, batch_size=3, num_batches=2, seed=0)
    first = [b["input_ids"] for b in batches]
    assert len(first) == 2 and first[0].shape == (3, 4)
    assert torch.equal(torch.cat([b["input_ids"] for b in batches]), torch.cat(first))
    batches.set_epoch(1)
    assert not torch.equal(torch.cat([b["input_ids"] for b in batches]), torch.cat(first))
    with pytest.raises(ValueError, match="batch_size"):
        SampleBatches(samples, batch_size=11, num_batches=1)
