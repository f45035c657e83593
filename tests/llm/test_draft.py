"""Teacher samples for draft distillation (drawn by the on-policy GenerateSampler, whose
exactness tests/onpolicy checks): the disk cache keyed by settings, and the batches served to
the Distiller."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_gpt2

from darkknowledge.llm.draft import SampleBatches, cached_teacher_samples


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
    prompted = next(iter(SampleBatches(samples, batch_size=3, num_batches=1, prompt_length=2)))
    assert prompted["prompt_lengths"].tolist() == [2, 2, 2]
    with pytest.raises(ValueError, match="batch_size"):
        SampleBatches(samples, batch_size=11, num_batches=1)
