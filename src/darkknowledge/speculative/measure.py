"""Measured against predicted: wall-clock speed-up of speculative decoding over plain decoding.

:func:`measure_speedup` decodes the same prompts with the target alone
(:func:`~darkknowledge.speculative.autoregressive_generate`, KV cache) and speculatively
(:func:`~darkknowledge.speculative.generate`), interleaved prompt by prompt so that a change of
machine load hits both, ``repeats`` times, and keeps the median of each. From the same runs it
derives what the formula of Leviathan et al. needs:

- ``cost_ratio`` ``c``: the drafter's time per proposed token (``draft_time_s``) over plain
  decoding's time per token (one target call and the sampling around it);
- the acceptance rate ``alpha`` (accepted over examined draft tokens) and, per draft position
  ``k``, the rate at which position ``k`` was accepted once reached (``position_rates``);

and predicts ``expected_speedup(alpha, gamma, c)``; with position rates
``(1 + a_1 + a_1 a_2 + ... + a_1 ⋯ a_gamma) / (gamma · c + 1)`` (the same formula when every
``a_k = alpha``; MTP heads have one rate per depth).

The ``1`` in that denominator is Leviathan et al.'s assumption that a target call on
``gamma + 1`` tokens costs as much as one plain decoding step. Where it fails (on a CPU a
4-token call of a small model costs about 1.3 plain steps, and verification and cache
cropping add a little), ``verification_cost`` ``v`` measures it: a round's time outside the
drafter over plain decoding's time per token, and ``predicted_speedup(...,
verification_cost=True)`` puts ``v`` in place of the ``1``.
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .acceptance import chained_tokens_per_call, check_gamma, expected_speedup
from .decode import GenerationOutput, TokenRates, autoregressive_generate, generate
from .drafter import Drafter


@dataclass
class SpeedupMeasurement(TokenRates):
    """Totals over the prompts (their medians over the repeats, for times)."""

    gamma: int
    prompts: int
    repeats: int
    new_tokens: int
    target_calls: int
    proposed_tokens: int
    accepted_tokens: int
    rejected_tokens: int
    plain_seconds: float
    speculative_seconds: float
    cost_ratio: float
    verification_cost: float = 1.0
    position_rates: list[float] = field(default_factory=list)
    load_average: tuple[float, float] | None = None  # 1-minute load before and after

    @property
    def speedup(self) -> float:
        """Measured: plain decoding's wall time over speculative decoding's."""
        return self.plain_seconds / self.speculative_seconds

    def predicted_speedup(
        self, alpha: float | Sequence[float] | None = None, *, verification_cost: bool = False
    ) -> float:
        """``expected_speedup(alpha, gamma, c)`` with the measured ``c``; ``alpha`` a float (the
        default: the measured acceptance rate) or one rate per draft position. With
        ``verification_cost`` the measured ``v`` replaces the ``1`` of the denominator."""
        alpha = self.acceptance_rate if alpha is None else alpha
        if isinstance(alpha, int | float):
            speedup = expected_speedup(float(alpha), self.gamma, self.cost_ratio)
        else:
            tokens = chained_tokens_per_call(list(alpha)[: self.gamma])
            speedup = tokens / (self.gamma * self.cost_ratio + 1.0)
        if not verification_cost:
            return speedup
        return (
            speedup
            * (self.gamma * self.cost_ratio + 1.0)
            / (self.gamma * self.cost_ratio + self.verification_cost)
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "acceptance_rate": self.acceptance_rate,
            "tokens_per_target_call": self.tokens_per_target_call,
            "speedup": self.speedup,
            "predicted_speedup": self.predicted_speedup(),
            "predicted_speedup_with_verification": self.predicted_speedup(verification_cost=True),
        }


def measure_speedup(
    target: nn.Module,
    draft: nn.Module | Drafter,
    prompts: Sequence[torch.Tensor],
    *,
    max_new_tokens: int,
    gamma: int,
    temperature: float = 1.0,
    greedy: bool = False,
    seed: int = 0,
    repeats: int = 3,
) -> SpeedupMeasurement:
    """Decode every prompt plainly and speculatively, ``repeats`` times, and compare.

    Args:
        target, draft: as :func:`~darkknowledge.speculative.generate` takes them (put them in
            ``eval()``); ``draft`` may be a model or any :class:`Drafter`.
        prompts: ``(1, L)`` or ``(L,)`` token ids, decoded one after the other.
        max_new_tokens, gamma, temperature, greedy: the decoding settings.
        seed: prompt ``i`` is decoded with a generator seeded ``seed + i`` in every repeat, so
            the repeats decode the same tokens and differ only in time.
        repeats: the times are medians over this many repeats (after one warm-up decoding of
            the first prompt each way, not counted).
    """
    check_gamma(gamma)
    if not prompts:
        raise ValueError("prompts is empty: give at least one prompt to decode")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    options = {"max_new_tokens": max_new_tokens, "temperature": temperature, "greedy": greedy}

    def plain(index: int) -> GenerationOutput:
        generator = torch.Generator().manual_seed(seed + index)
        return autoregressive_generate(target, prompts[index], generator=generator, **options)

    def speculative(index: int) -> GenerationOutput:
        generator = torch.Generator().manual_seed(seed + index)
        return generate(target, draft, prompts[index], gamma=gamma, generator=generator, **options)

    plain(0), speculative(0)  # warm-up: first calls allocate and fill caches
    load_before = _load()
    plain_times, speculative_times, ratios, verifications = [], [], [], []
    for _ in range(repeats):
        plain_runs, speculative_runs = [], []
        for index in range(len(prompts)):  # interleaved: a load change hits both
            plain_runs.append(plain(index))
            speculative_runs.append(speculative(index))
        plain_time = sum(run.wall_time_s for run in plain_runs)
        plain_tokens = sum(run.new_tokens for run in plain_runs)
        draft_time = sum(run.draft_time_s for run in speculative_runs)
        proposed = sum(run.proposed_tokens for run in speculative_runs)
        speculative_time = sum(run.wall_time_s for run in speculative_runs)
        rounds = sum(run.rounds for run in speculative_runs)
        plain_step = plain_time / max(plain_tokens, 1)
        plain_times.append(plain_time)
        speculative_times.append(speculative_time)
        ratios.append((draft_time / max(proposed, 1)) / plain_step)
        verifications.append(((speculative_time - draft_time) / max(rounds, 1)) / plain_step)
    load_after = _load()
    return SpeedupMeasurement(
        gamma=gamma,
        prompts=len(prompts),
        repeats=repeats,
        new_tokens=sum(run.new_tokens for run in speculative_runs),
        target_calls=sum(run.target_calls for run in speculative_runs),
        proposed_tokens=sum(run.proposed_tokens for run in speculative_runs),
        accepted_tokens=sum(run.accepted_tokens for run in speculative_runs),
        rejected_tokens=sum(run.rejected_tokens for run in speculative_runs),
        plain_seconds=statistics.median(plain_times),
        speculative_seconds=statistics.median(speculative_times),
        cost_ratio=statistics.median(ratios),
        verification_cost=statistics.median(verifications),
        position_rates=position_rates(speculative_runs, gamma),
        load_average=None if load_before is None else (load_before, load_after),
    )


def position_rates(runs: Sequence[GenerationOutput], gamma: int) -> list[float]:
    """Per draft position ``k = 1..gamma``: the share of rounds that accepted position ``k``
    among those that reached it (proposed it with positions ``1..k−1`` accepted); NaN where
    no round reached it."""
    rates = []
    for position in range(1, gamma + 1):
        reached = accepted = 0
        for run in runs:
            for proposed, kept in zip(run.proposed_per_round, run.accepted_per_round):
                if proposed >= position and kept >= position - 1:
                    reached += 1
                    accepted += kept >= position
        rates.append(accepted / reached if reached else math.nan)
    return rates


def _load() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # not every platform has it
        return None
