"""Speculative decoding of Hugging Face causal LMs, and the plain decoding it is measured against.

Each round of :func:`generate` on a sequence of length L:

1. the drafter proposes k <= gamma tokens (k = min(gamma, remaining − 1), so the round can
   never overshoot ``max_new_tokens``);
2. one target call on the tokens the target has not cached yet plus the k draft tokens gives
   the target's distributions at the k + 1 positions;
3. :func:`~darkknowledge.speculative.verify` keeps n <= k draft tokens and adds one token;
4. both KV caches are cropped to the kept tokens (the target to L + n: the new last token is
   fed in the next round) and the sequence grows by n + 1.

Batch size 1: rows of a batch accept different numbers of tokens, which would need ragged
caches; decode rows one after the other.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from numbers import Integral

import torch
from torch import nn

from ._cache import CachedLM, vocabulary_size
from .acceptance import check_gamma
from .drafter import Draft, Drafter, ModelDrafter
from .verify import Sampler, check_sampling, verify_unchecked


class TokenRates:
    """The rates of a decoding's counts ``new_tokens``, ``target_calls``, ``accepted_tokens``
    and ``rejected_tokens`` (its :class:`GenerationOutput`, or a measurement's totals)."""

    @property
    def acceptance_rate(self) -> float:
        """Accepted over examined draft tokens (a token after a rejection is not examined; NaN
        when none was examined)."""
        examined = self.accepted_tokens + self.rejected_tokens
        return self.accepted_tokens / examined if examined else math.nan

    @property
    def tokens_per_target_call(self) -> float:
        return self.new_tokens / self.target_calls if self.target_calls else math.nan


@dataclass
class GenerationOutput(TokenRates):
    """The decoded sequence and what it cost.

    ``sequences`` is ``(1, prompt + new_tokens)``. ``target_calls`` counts forward passes of
    the target (with a drafter that wants the target's hidden states, the first one is the
    prompt alone). A round is one verification; ``accepted_per_round[i]`` draft tokens were kept
    in round i, out of ``proposed_per_round[i]``. A proposed token after the first rejection of
    its round is never examined, so the per-token acceptance estimate is
    ``accepted / (accepted + rejected)``, ``rejected`` being the rounds that ended in a rejection.
    ``draft_time_s`` is the part of ``wall_time_s`` spent in the drafter's ``propose``.
    """

    sequences: torch.Tensor
    new_tokens: int = 0
    target_calls: int = 0
    proposed_tokens: int = 0
    accepted_tokens: int = 0
    rejected_tokens: int = 0
    wall_time_s: float = 0.0
    draft_time_s: float = 0.0
    accepted_per_round: list[int] = field(default_factory=list)
    proposed_per_round: list[int] = field(default_factory=list)

    def add_round(self, proposed: int, accepted: int) -> None:
        """Count one verification: ``accepted`` of ``proposed`` draft tokens kept."""
        self.proposed_tokens += proposed
        self.accepted_tokens += accepted
        self.rejected_tokens += int(accepted < proposed)
        self.proposed_per_round.append(proposed)
        self.accepted_per_round.append(accepted)

    @property
    def rounds(self) -> int:
        return len(self.accepted_per_round)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.wall_time_s if self.wall_time_s > 0 else math.nan


@torch.no_grad()
def generate(
    target: nn.Module,
    draft: nn.Module | Drafter,
    input_ids: torch.Tensor,
    *,
    max_new_tokens: int,
    gamma: int = 4,
    temperature: float = 1.0,
    greedy: bool = False,
    generator: torch.Generator | None = None,
    eos_token_id: int | Sequence[int] | None = None,
) -> GenerationOutput:
    """Sample from ``target`` exactly, ``gamma`` draft tokens verified per target call.

    Args:
        target: a Hugging Face causal LM (put it in ``eval()`` mode).
        draft: a causal LM with the target's tokenizer (wrapped in :class:`ModelDrafter`), or
            any :class:`Drafter`, e.g. the target's own multi-token-prediction heads.
        input_ids: ``(1, L)`` or ``(L,)`` prompt token ids, L >= 1.
        max_new_tokens: exactly this many tokens are added (fewer only at ``eos_token_id``).
        gamma: draft tokens per target call, >= 1.
        temperature: both models' logits are divided by it (> 0).
        greedy: decode the target's argmax instead of sampling; the output is then the target's
            own greedy decoding, token for token.
        generator: the random source of drafting and verification (sampling only).
        eos_token_id: stop after emitting this token (or any of these); None never stops early.

    Returns a :class:`GenerationOutput`; ``.sequences`` is on the target's device.
    """
    prompt = _check_generate_arguments(
        input_ids, max_new_tokens, gamma, temperature, greedy, generator
    )
    stop_tokens = _stop_tokens(eos_token_id)
    target_lm = CachedLM(target)
    drafter = _as_drafter(draft, target)
    _warn_if_training(target, "target")
    sampler = Sampler(float(temperature), greedy, generator)
    wants_hidden = bool(getattr(drafter, "wants_target_hidden", False))
    sequence = prompt.to(target_lm.device)
    output = GenerationOutput(sequence)
    drafter.reset()
    start = time.perf_counter()
    target_hidden = None
    if wants_hidden and sequence.shape[1] > 1:  # the drafter needs the target's state at L - 2
        _, target_hidden = target_lm.extend(sequence[:, :-1], keep_logits=1, hidden=True)
        output.target_calls += 1
    while output.new_tokens < max_new_tokens:
        length = sequence.shape[1]
        budget = min(gamma, max_new_tokens - output.new_tokens - 1)
        draft_start = time.perf_counter()
        draft_tokens, draft_probs = _propose(drafter, sequence, budget, sampler, target_hidden)
        output.draft_time_s += _elapsed(draft_start, sequence.device) if budget else 0.0
        count = draft_tokens.shape[0]
        cached = target_lm.length
        fed = torch.cat([sequence[:, cached:], draft_tokens.to(sequence.device).reshape(1, -1)], 1)
        logits, hidden = target_lm.extend(fed, keep_logits=count + 1, hidden=wants_hidden)
        output.target_calls += 1
        target_probs = sampler.probs(logits)  # (count + 1, V)
        _check_draft_width(draft_probs, target_probs, drafter)
        tokens, accepted = verify_unchecked(draft_tokens, draft_probs, target_probs, generator)
        target_lm.crop(length + accepted)
        drafter.rollback(accepted)
        if wants_hidden:  # positions cached .. length + accepted - 1, now committed
            target_hidden = hidden[:, : length + accepted - cached]
        output.add_round(count, accepted)
        tokens, stopped = _cut_at_stop(tokens, stop_tokens)
        sequence = torch.cat([sequence, tokens.reshape(1, -1)], 1)
        output.new_tokens += tokens.shape[0]
        if stopped:
            break
    output.sequences = sequence
    output.wall_time_s = _elapsed(start, sequence.device)
    return output


@torch.no_grad()
def autoregressive_generate(
    target: nn.Module,
    input_ids: torch.Tensor,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    greedy: bool = False,
    generator: torch.Generator | None = None,
    eos_token_id: int | Sequence[int] | None = None,
) -> GenerationOutput:
    """Plain decoding of ``target`` with its KV cache, one target call per token: the baseline
    a speculative speed-up is measured against. Same arguments and output as :func:`generate`
    (no draft statistics)."""
    prompt = _check_generate_arguments(input_ids, max_new_tokens, 1, temperature, greedy, generator)
    stop_tokens = _stop_tokens(eos_token_id)
    target_lm = CachedLM(target)
    _warn_if_training(target, "target")
    sampler = Sampler(float(temperature), greedy, generator)
    sequence = prompt.to(target_lm.device)
    output = GenerationOutput(sequence)
    start = time.perf_counter()
    while output.new_tokens < max_new_tokens:
        logits, _ = target_lm.extend(sequence[:, target_lm.length :], keep_logits=1)
        output.target_calls += 1
        token = sampler.sample(sampler.probs(logits[-1])).reshape(1)
        token, stopped = _cut_at_stop(token, stop_tokens)
        sequence = torch.cat([sequence, token.reshape(1, -1)], 1)
        output.new_tokens += 1
        if stopped:
            break
    output.sequences = sequence
    output.wall_time_s = _elapsed(start, sequence.device)
    return output


def _propose(
    drafter: Drafter,
    sequence: torch.Tensor,
    budget: int,
    sampler: Sampler,
    target_hidden: torch.Tensor | None,
) -> Draft:
    if budget == 0:  # the last token of the budget: the target alone
        return Draft(torch.zeros(0, dtype=torch.long, device=sequence.device), torch.zeros(0, 0))
    draft = drafter.propose(sequence, budget, sampler, target_hidden)
    tokens, probs = draft
    name = type(drafter).__name__
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 1 or tokens.shape[0] > budget:
        shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise ValueError(
            f"{name}.propose must return tokens of shape (k,) with k <= {budget}, got {shape}"
        )
    if not isinstance(probs, torch.Tensor) or probs.dim() != 2 or probs.shape[0] != tokens.shape[0]:
        shape = tuple(probs.shape) if isinstance(probs, torch.Tensor) else type(probs).__name__
        raise ValueError(
            f"{name}.propose must return probs of shape (k, V) for its {tokens.shape[0]} tokens, got {shape}"
        )
    return draft


def _check_draft_width(
    draft_probs: torch.Tensor, target_probs: torch.Tensor, drafter: Drafter
) -> None:
    if draft_probs.shape[0] and draft_probs.shape[1] != target_probs.shape[1]:
        raise ValueError(
            f"{type(drafter).__name__} proposed from {draft_probs.shape[1]} tokens but the target's "
            f"vocabulary has {target_probs.shape[1]}: draft and target must share a tokenizer"
        )


def _as_drafter(draft: nn.Module | Drafter, target: nn.Module) -> Drafter:
    if isinstance(draft, Drafter):
        return draft
    if isinstance(draft, nn.Module):
        _warn_if_training(draft, "draft")
        return ModelDrafter(draft, vocab_size=vocabulary_size(target))
    raise TypeError(
        f"draft must be a Hugging Face causal LM or a Drafter (reset, propose, rollback, "
        f"wants_target_hidden), got {type(draft).__name__}"
    )


def _check_generate_arguments(
    input_ids: torch.Tensor,
    max_new_tokens: int,
    gamma: int,
    temperature: float,
    greedy: bool,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """The prompt as ``(1, L)`` long, after checking every argument."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(
            f"input_ids must be a torch.Tensor of token ids, got {type(input_ids).__name__}"
        )
    if input_ids.is_floating_point() or input_ids.dtype == torch.bool or input_ids.is_complex():
        raise TypeError(
            f"input_ids must be an integer tensor of token ids, got dtype {input_ids.dtype}"
        )
    prompt = input_ids.reshape(1, -1) if input_ids.dim() == 1 else input_ids
    if prompt.dim() != 2 or prompt.shape[0] != 1:
        raise ValueError(
            f"input_ids must have shape (1, L) or (L,): speculative decoding here runs one sequence at "
            f"a time (batch size 1), got shape {tuple(input_ids.shape)}; decode the rows one by one"
        )
    if prompt.shape[1] == 0:
        raise ValueError("input_ids is empty: the prompt needs at least one token (e.g. BOS)")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, Integral):
        raise TypeError(f"max_new_tokens must be an int >= 0, got {type(max_new_tokens).__name__}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    check_gamma(gamma)
    if isinstance(temperature, torch.Tensor):
        raise TypeError("temperature must be a float > 0, got a tensor")
    check_sampling(temperature, greedy, generator)
    return prompt.to(torch.long)


def _stop_tokens(eos_token_id: int | Sequence[int] | None) -> tuple[int, ...]:
    if eos_token_id is None:
        return ()
    values = (eos_token_id,) if isinstance(eos_token_id, Integral) else tuple(eos_token_id)
    if not values or any(isinstance(v, bool) or not isinstance(v, Integral) for v in values):
        raise TypeError(
            f"eos_token_id must be an int, a sequence of ints or None, got {eos_token_id!r}"
        )
    return tuple(int(v) for v in values)


def _cut_at_stop(tokens: torch.Tensor, stop_tokens: tuple[int, ...]) -> tuple[torch.Tensor, bool]:
    """``tokens`` up to and including the first stop token, and whether there was one."""
    if not stop_tokens:
        return tokens, False
    hits = torch.isin(tokens, torch.tensor(stop_tokens, device=tokens.device)).nonzero()
    if hits.numel() == 0:
        return tokens, False
    return tokens[: int(hits[0, 0]) + 1], True


def _warn_if_training(model: nn.Module, name: str) -> None:
    if model.training and any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules()):
        warnings.warn(
            f"the {name} model is in training mode with dropout: its distribution is random; "
            f"call {name}.eval() before decoding",
            stacklevel=3,
        )


def _elapsed(start: float, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start
