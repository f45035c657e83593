"""Training data for draft distillation (DistillSpec, Zhou et al., 2024): sequences generated
by the teacher, sampled once and cached on disk.

A draft is accepted where its next-token distribution overlaps the target's on the text that
speculative decoding visits: the target's own samples. DistillSpec therefore distils the draft
on sequences the teacher (or the draft) generated rather than on the training text alone.
:func:`cached_teacher_samples` draws them from the teacher with the on-policy sampler
(:class:`~darkknowledge.llm.generation.GenerateSampler`: Hugging Face ``generate`` with a KV
cache, each token chosen from the full ``softmax(z / T)``, no top-k, no top-p, one seed per
row) and keeps them in a safetensors file keyed by everything that determines them;
:class:`SampleBatches` serves them as causal-LM batches for the Distiller (with
``prompt_lengths``, so that the on-policy task can also complete the same prompts with the
draft itself).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .._files import atomic_path
from .data import EpochBatches


def cached_teacher_samples(
    teacher: nn.Module,
    text: torch.Tensor,
    *,
    count: int,
    prompt_length: int,
    length: int,
    cache_path: str | Path,
    key: dict[str, Any],
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 256,
) -> torch.Tensor:
    """``(count, length)`` teacher samples, each a random ``prompt_length``-token window of
    ``text`` (1-D token ids) continued by the teacher; read from ``cache_path`` when it holds
    samples made with the same settings and ``key`` (what identifies the teacher and the text,
    e.g. a hash of its weights' source), else sampled and written there atomically."""
    from .generation import GenerateSampler

    if not 1 <= prompt_length < length:
        raise ValueError(
            f"prompt_length must be in [1, length) = [1, {length}), got {prompt_length}"
        )
    settings = {
        **key, "count": count, "prompt_length": prompt_length, "length": length,
        "temperature": temperature, "seed": seed, "sampler": "GenerateSampler",
    }  # fmt: skip
    fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    path = Path(cache_path)
    if path.is_file():
        stored = load_file(str(path))
        if (
            "fingerprint" in stored
            and bytes(stored["fingerprint"].tolist()).decode() == fingerprint
        ):
            return stored["input_ids"].long()
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(text.numel() - prompt_length, (count, 1), generator=generator)
    prompts = text[starts + torch.arange(prompt_length)].long()  # (count, prompt_length)
    sampler = GenerateSampler(temperature=temperature)
    seeds = seed * 1_000_003 + torch.arange(count)  # one stream per row
    parts = []
    for rows in torch.arange(count).split(batch_size):
        completions = sampler(
            teacher, prompts[rows], torch.ones_like(prompts[rows]),
            max_new_tokens=length - prompt_length, seeds=seeds[rows],
        )  # fmt: skip
        parts.append(torch.cat([prompts[rows], completions.ids.cpu()], dim=1))
    samples = torch.cat(parts)  # (count, length)
    tag = torch.tensor(list(fingerprint.encode()), dtype=torch.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temporary:
        save_file({"input_ids": samples.to(torch.int32), "fingerprint": tag}, str(temporary))
    return samples


class SampleBatches(EpochBatches):
    """Batches ``{"input_ids": (batch_size, T)}`` of rows of ``samples`` ``(N, T)``,
    ``num_batches`` per epoch in an order seeded by ``seed`` and the epoch (like
    :class:`~darkknowledge.llm.data.RandomWindows`, the Distiller calls ``set_epoch``); with
    ``prompt_length`` also ``prompt_lengths`` ``(batch_size,)``: the loss then counts the
    completions only, and :class:`~darkknowledge.llm.OnPolicyTask` can sample them anew."""

    def __init__(
        self,
        samples: torch.Tensor,
        *,
        batch_size: int,
        num_batches: int,
        seed: int = 0,
        prompt_length: int = 0,
    ) -> None:
        if samples.dim() != 2 or samples.shape[0] < batch_size:
            raise ValueError(
                f"samples must be (N, T) with N >= batch_size={batch_size}, got {tuple(samples.shape)}"
            )
        super().__init__(num_batches=num_batches, seed=seed)
        self.samples, self.batch_size = samples.long(), batch_size
        self.prompt_length = prompt_length

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        generator = self.generator()
        for _ in range(self.num_batches):
            rows = torch.randint(self.samples.shape[0], (self.batch_size,), generator=generator)
            batch = {"input_ids": self.samples[rows]}  # (B, T)
            if self.prompt_length:
                batch["prompt_lengths"] = torch.full((self.batch_size,), self.prompt_length)
            yield batch
