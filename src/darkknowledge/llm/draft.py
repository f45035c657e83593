"""Training data for draft distillation (DistillSpec, Zhou et al., 2024): sequences generated
by the teacher, sampled once and cached on disk.

A draft is accepted where its next-token distribution overlaps the target's on the text that
speculative decoding visits: the target's own samples. DistillSpec therefore distils the draft
on sequences the teacher (or the draft) generated rather than on the training text alone.
:func:`sample_continuations` draws them exactly from the teacher (full distribution at the
given temperature: no top-k, no top-p), a batch at a time with a KV cache;
:func:`cached_teacher_samples` keeps them in a safetensors file keyed by everything that
determines them; :class:`SampleBatches` serves them as causal-LM batches for the Distiller.
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


@torch.no_grad()
def sample_continuations(
    model: nn.Module,
    prompts: torch.Tensor,
    *,
    new_tokens: int,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``prompts`` ``(B, L)`` (no padding) followed by ``new_tokens`` tokens sampled from
    ``model``, ``x_t ~ softmax(z_t / temperature)``: ``(B, L + new_tokens)`` long, on CPU.

    >>> import transformers
    >>> transformers.logging.set_verbosity_error()
    >>> config = transformers.GPT2Config(vocab_size=16, n_positions=16, n_embd=8, n_layer=1, n_head=2)
    >>> model = transformers.GPT2LMHeadModel(config).eval()
    >>> sample_continuations(model, torch.zeros(3, 2, dtype=torch.long), new_tokens=5).shape
    torch.Size([3, 7])
    """
    from ..speculative._cache import CachedLM
    from ..speculative.verify import check_sampling, sample_from

    check_sampling(temperature, False, generator)
    if not isinstance(prompts, torch.Tensor) or prompts.dim() != 2 or prompts.shape[1] < 1:
        raise ValueError(
            f"prompts must be a (B, L) tensor of token ids with L >= 1, got {prompts!r}"
        )
    if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or new_tokens < 0:
        raise ValueError(f"new_tokens must be an int >= 0, got {new_tokens!r}")
    lm = CachedLM(model)
    sequence, pending = prompts.long().cpu(), prompts.long()
    for _ in range(new_tokens):
        logits = lm.forward(pending, keep_logits=1).logits[:, -1]  # (B, V)
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        pending = sample_from(probs, generator).reshape(-1, 1)  # (B, 1)
        sequence = torch.cat([sequence, pending.cpu()], dim=1)
    return sequence


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
    if not 1 <= prompt_length < length:
        raise ValueError(
            f"prompt_length must be in [1, length) = [1, {length}), got {prompt_length}"
        )
    settings = {
        **key, "count": count, "prompt_length": prompt_length, "length": length,
        "temperature": temperature, "seed": seed,
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
    new_tokens = length - prompt_length
    parts = [
        sample_continuations(
            teacher, batch, new_tokens=new_tokens, temperature=temperature, generator=generator
        )
        for batch in prompts.split(batch_size)
    ]
    samples = torch.cat(parts)
    tag = torch.tensor(list(fingerprint.encode()), dtype=torch.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temporary:
        save_file({"input_ids": samples.to(torch.int32), "fingerprint": tag}, str(temporary))
    return samples


class SampleBatches:
    """Batches ``{"input_ids": (batch_size, T)}`` of rows of ``samples`` ``(N, T)``,
    ``num_batches`` per epoch in an order seeded by ``seed`` and the epoch (like
    :class:`~darkknowledge.llm.data.RandomWindows`, the Distiller calls ``set_epoch``)."""

    def __init__(
        self, samples: torch.Tensor, *, batch_size: int, num_batches: int, seed: int = 0
    ) -> None:
        if samples.dim() != 2 or samples.shape[0] < batch_size:
            raise ValueError(
                f"samples must be (N, T) with N >= batch_size={batch_size}, got {tuple(samples.shape)}"
            )
        self.samples, self.batch_size = samples.long(), batch_size
        self.num_batches, self.seed, self.epoch = num_batches, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        generator = torch.Generator().manual_seed(self.seed + 100_003 * self.epoch)
        for _ in range(self.num_batches):
            rows = torch.randint(self.samples.shape[0], (self.batch_size,), generator=generator)
            yield {"input_ids": self.samples[rows]}  # (B, T)
