"""Completions sampled from a causal LM, behind a small interface that a serving engine can fill.

A :class:`Sampler` takes left-padded prompts ``(B, P)`` with their attention mask, the number of
tokens to generate and one seed per row, and returns :class:`Completions`: the tokens
``(B, M)`` and a mask of the ones generated (False after an end-of-sequence token and beyond).
The built-in :class:`GenerateSampler` runs Hugging Face ``model.generate`` (KV cache, attention
mask and positions handled by transformers) and chooses every token itself from the full
distribution by inverse-CDF sampling with uniform noise drawn from the row's seed, so that

- a row's completion depends on its seed and its prompt, not on the other rows of the batch
  nor on the global RNG (dropout and data order are untouched; a resumed run draws the same);
- no transformers default (``top_k=50`` of ``do_sample``, a repetition penalty from the model's
  ``generation_config``) changes the distribution: samples come from ``softmax(z / τ)`` exactly,
  truncated only by an explicit ``top_k`` / ``top_p`` (which make the samples off-policy).

A serving engine plugs in by implementing the same call; see docs/on-policy.md (vLLM: one
request per row with ``SamplingParams(seed=...)``, the student's weights pushed to the engine
before sampling). A sampler that also takes a ``vocab_size`` keyword can distil a student whose
output layer is padded beyond the vocabulary it shares with the teacher: it is then asked for
ids below ``vocab_size`` only (:func:`takes_vocab_size`).
"""

from __future__ import annotations

import inspect
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch
from torch import nn

from .heads import unwrap_model


class Completions(NamedTuple):
    """``ids`` ``(B, M)`` int64 generated tokens; ``mask`` ``(B, M)`` bool, True for the tokens
    that belong to the completion (up to and including an end-of-sequence token)."""

    ids: torch.Tensor
    mask: torch.Tensor


@runtime_checkable
class Sampler(Protocol):
    """Completions of ``prompt_ids`` ``(B, P)`` (left-padded, ``prompt_mask`` 1 at real tokens)
    by ``model``, at most ``max_new_tokens`` each, row ``b`` drawn from ``seeds[b]`` alone.

    Optional: a ``vocab_size`` keyword (int or None), given only when the student's output
    layer has rows beyond the vocabulary that the loss keeps (a padded student); the sampler
    then draws from the first ``vocab_size`` logits alone, renormalised."""

    def __call__(
        self,
        model: nn.Module,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        *,
        max_new_tokens: int,
        seeds: torch.Tensor,
    ) -> Completions: ...


def pick_tokens(
    logits: torch.Tensor,
    uniforms: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> torch.Tensor:
    """One token per row of ``logits`` ``(B, V)`` from ``softmax(logits / temperature)``, by
    inverse CDF at ``uniforms`` ``(B,)`` in [0, 1): the first token whose cumulative probability
    exceeds ``u``. With ``top_k`` / ``top_p`` the distribution is first cut to the ``k`` most
    likely tokens / the smallest set holding probability ``p``, and renormalised. The
    probabilities and their sums are float64, so tokens of probability 1e-12 keep their share.

    >>> logits = torch.log(torch.tensor([[0.5, 0.25, 0.25]]))
    >>> [int(pick_tokens(logits, torch.tensor([u]))) for u in (0.0, 0.49, 0.51, 0.74, 0.76, 0.999)]
    [0, 0, 1, 1, 2, 2]
    >>> int(pick_tokens(logits, torch.tensor([0.9]), top_k=1))
    0
    """
    probs = torch.softmax(logits.double() / temperature, dim=-1)  # (B, V)
    if top_k is not None or top_p is not None:
        probs = _truncate(probs, top_k, top_p)
    cdf = probs.cumsum(-1)  # (B, V)
    target = uniforms.to(cdf).unsqueeze(-1) * cdf[:, -1:]  # (B, 1), below the row's total
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_max_(logits.shape[-1] - 1)


def _truncate(probs: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Zero every token outside the top ``k`` / the nucleus of mass ``p`` (ties by index)."""
    ordered, order = probs.sort(dim=-1, descending=True, stable=True)  # (B, V)
    keep = torch.ones_like(ordered, dtype=torch.bool)
    if top_k is not None:
        keep[:, top_k:] = False
    if top_p is not None:  # keep a token while the mass before it is below p (the first always)
        keep &= (ordered.cumsum(-1) - ordered) < top_p
    return torch.zeros_like(probs).scatter_(-1, order, ordered * keep)


def row_uniforms(seeds: torch.Tensor, count: int) -> torch.Tensor:
    """``(B, count)`` float64 uniforms in [0, 1), row ``b`` from a generator seeded with
    ``seeds[b]`` (CPU, so the same on every device).

    >>> a, b = row_uniforms(torch.tensor([7, 8]), 3), row_uniforms(torch.tensor([8]), 3)
    >>> bool(torch.equal(a[1], b[0])), bool(torch.equal(a[0], a[1]))
    (True, False)
    """
    rows = []
    for seed in seeds.tolist():
        generator = torch.Generator().manual_seed(int(seed))
        rows.append(torch.rand(count, generator=generator, dtype=torch.float64))
    return torch.stack(rows) if rows else torch.zeros(0, count, dtype=torch.float64)


class GenerateSampler:
    """:class:`Sampler` on Hugging Face ``generate`` with a KV cache (see the module docstring).

    Args:
        temperature: the sampling temperature τ: tokens come from ``softmax(z / τ)``
            (independent of the loss temperature).
        top_k, top_p: truncate the distribution (None: the full distribution, on-policy).
        eos_token_id: a row's completion ends after this token (None: always ``max_new_tokens``
            tokens, whatever the model's own ``generation_config`` says).
        pad_token_id: written after a row's end (masked out).

    The model runs in eval mode (no dropout) under ``torch.no_grad()``; its mode is restored.
    """

    def __init__(
        self,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int = 0,
    ) -> None:
        check_sampling(temperature, top_k, top_p)
        for name, value in (("eos_token_id", eos_token_id), ("pad_token_id", pad_token_id)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise TypeError(f"{name} must be an int, got {name}={value!r}")
        self.temperature, self.top_k, self.top_p = float(temperature), top_k, top_p
        self.eos_token_id, self.pad_token_id = eos_token_id, pad_token_id

    def __call__(
        self,
        model: nn.Module,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        *,
        max_new_tokens: int,
        seeds: torch.Tensor,
        vocab_size: int | None = None,
    ) -> Completions:
        """``vocab_size``: sample among the first ``vocab_size`` ids only (a padded student's
        extra rows are never drawn); None: every row of the output layer."""
        from transformers import GenerationConfig, LogitsProcessorList

        inner = unwrap_model(model)
        if not callable(getattr(inner, "generate", None)):
            raise TypeError(
                f"GenerateSampler needs a Hugging Face model with generate(); {type(inner).__name__} "
                "has none: pass another Sampler (docs/on-policy.md)"
            )
        width = prompt_ids.shape[1]
        uniforms = row_uniforms(seeds, max_new_tokens).to(prompt_ids.device)  # (B, M)
        config = GenerationConfig(
            do_sample=False,  # the processor below leaves one finite logit: the token it chose
            max_new_tokens=max_new_tokens,
            num_beams=1,
            pad_token_id=self.pad_token_id,
            # [] and not None: None would fall back on the model's own end-of-sequence token.
            eos_token_id=[] if self.eos_token_id is None else [self.eos_token_id],
        )
        chooser = _choice_processor(self, uniforms, width, vocab_size)
        was_training = inner.training
        inner.eval()
        try:
            with torch.no_grad():
                sequences = inner.generate(
                    input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=config,
                    logits_processor=LogitsProcessorList([chooser]),
                )  # fmt: skip
        finally:
            inner.train(was_training)
        return self._completions(sequences[:, width:], max_new_tokens)

    def _completions(self, new: torch.Tensor, max_new_tokens: int) -> Completions:
        """Pad the generated ``(B, m)`` to ``(B, M)`` and mask what follows an end token."""
        missing = max_new_tokens - new.shape[1]  # generate stops early when every row ended
        if missing:
            new = torch.cat([new, new.new_full((new.shape[0], missing), self.pad_token_id)], 1)
        mask = torch.ones_like(new, dtype=torch.bool)
        mask[:, new.shape[1] - missing :] = False
        if self.eos_token_id is not None:
            ended = (new == self.eos_token_id).long().cumsum(-1)  # (B, M)
            mask &= (ended - (new == self.eos_token_id).long()) == 0  # up to the first end
        return Completions(new, mask)


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """ValueError naming the bad sampling setting."""
    if isinstance(temperature, bool) or not isinstance(temperature, int | float):
        raise TypeError(f"temperature must be a float > 0, got {temperature!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got temperature={temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be an int >= 1 or None, got top_k={top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1] or None, got top_p={top_p!r}")


def takes_vocab_size(sampler: Any) -> bool:
    """Whether ``sampler`` can be asked for ids below a ``vocab_size`` (see :class:`Sampler`).

    >>> takes_vocab_size(GenerateSampler()), takes_vocab_size(lambda model, ids, mask, **kw: 0)
    (True, True)
    >>> takes_vocab_size(lambda model, ids, mask, *, max_new_tokens, seeds: 0)
    False
    """
    try:
        parameters = inspect.signature(sampler).parameters.values()
    except (TypeError, ValueError):  # a builtin or C callable: nothing to read
        return False
    return any(
        (p.name == "vocab_size" and p.kind != p.POSITIONAL_ONLY) or p.kind == p.VAR_KEYWORD
        for p in parameters
    )


def _choice_processor(
    sampler: GenerateSampler, uniforms: torch.Tensor, width: int, vocab_size: int | None
) -> Any:
    """A transformers ``LogitsProcessor`` that picks the token (:func:`pick_tokens` with the
    step's uniforms, among the first ``vocab_size`` ids when given) and leaves it the only
    finite logit, so greedy decoding emits it."""
    from transformers import LogitsProcessor

    class _Choose(LogitsProcessor):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            step = input_ids.shape[1] - width  # tokens generated so far
            tokens = pick_tokens(
                scores[:, :vocab_size], uniforms[:, step], temperature=sampler.temperature,
                top_k=sampler.top_k, top_p=sampler.top_p,
            )  # fmt: skip
            chosen = torch.full_like(scores, float("-inf"))
            return chosen.scatter_(-1, tokens.unsqueeze(-1), 0.0)

    return _Choose()
