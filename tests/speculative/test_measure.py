"""measure_speedup: the statistics it sums and derives from real decodings (counts, per-position
rates recomputed by hand from the rounds, the cost ratio's parts), and the prediction formula."""

from __future__ import annotations

import math

import pytest
import torch
from speculative_models import tiny_lm

from darkknowledge.speculative import GenerationOutput, expected_speedup, generate
from darkknowledge.speculative.measure import SpeedupMeasurement, measure_speedup, position_rates


def rounds(pairs):
    out = GenerationOutput(torch.zeros(1, 1, dtype=torch.long))
    for proposed, accepted in pairs:
        out.add_round(proposed, accepted)
    return out


def test_position_rates_count_rounds_that_reached_each_position():
    runs = [rounds([(3, 3), (3, 0), (3, 1)]), rounds([(2, 2), (3, 2), (0, 0)])]
    # position 1 reached by the 5 rounds proposing >= 1: accepted in 4 (all but (3, 0));
    # position 2 reached by (3,3) (3,1) (2,2) (3,2): accepted by (3,3) (2,2) (3,2);
    # position 3 reached by (3,3) (3,2) (proposed 3, first two accepted): accepted by (3,3).
    assert position_rates(runs, 3) == [4 / 5, 3 / 4, 1 / 2]
    assert math.isnan(position_rates([rounds([(1, 0)])], 2)[1])


def test_measure_speedup_sums_real_decodings():
    target, draft = tiny_lm(0), tiny_lm(1, n_layer=1, n_embd=16)
    prompts = [torch.tensor([[1, 2, 3]]), torch.tensor([4, 5])]
    result = measure_speedup(target, draft, prompts, max_new_tokens=9, gamma=3, seed=5, repeats=2)
    runs = [
        generate(target, draft, prompt, max_new_tokens=9, gamma=3,
                 generator=torch.Generator().manual_seed(5 + i))
        for i, prompt in enumerate(prompts)
    ]  # fmt: skip
    assert result.new_tokens == 18 and result.prompts == 2 and result.repeats == 2
    assert result.target_calls == sum(run.target_calls for run in runs)
    assert result.accepted_tokens == sum(run.accepted_tokens for run in runs)
    assert result.rejected_tokens == sum(run.rejected_tokens for run in runs)
    assert result.position_rates == position_rates(runs, 3)
    assert result.plain_seconds > 0 and result.speculative_seconds > 0 and result.cost_ratio > 0
    assert result.verification_cost > 0
    assert result.speedup == result.plain_seconds / result.speculative_seconds
    assert result.as_dict()["tokens_per_target_call"] == 18 / result.target_calls


def test_predicted_speedup_is_leviathan_formula_and_its_per_position_form():
    measured = SpeedupMeasurement(
        gamma=3, prompts=1, repeats=1, new_tokens=10, target_calls=4, proposed_tokens=9,
        accepted_tokens=6, rejected_tokens=2, plain_seconds=1.0, speculative_seconds=0.5,
        cost_ratio=0.2, verification_cost=1.3,
    )  # fmt: skip
    assert measured.predicted_speedup() == expected_speedup(0.75, 3, 0.2)
    assert measured.predicted_speedup([0.6, 0.6, 0.6]) == pytest.approx(
        expected_speedup(0.6, 3, 0.2)
    )
    # 1 + 0.9 + 0.9 * 0.5 + 0.9 * 0.5 * 0.2 tokens over 1 + 3 * 0.2
    assert measured.predicted_speedup([0.9, 0.5, 0.2]) == pytest.approx(2.44 / 1.6)
    # v = 1.3 in place of the 1: the target's verification call costs 1.3 plain steps
    tokens = (1 - 0.75**4) / 0.25
    assert measured.predicted_speedup(verification_cost=True) == pytest.approx(tokens / 1.9)
    assert measured.predicted_speedup([0.9, 0.5, 0.2], verification_cost=True) == pytest.approx(
        2.44 / 1.9
    )


def test_measure_speedup_refuses_bad_input():
    model = tiny_lm(0)
    with pytest.raises(ValueError, match="prompts"):
        measure_speedup(model, model, [], max_new_tokens=2, gamma=2)
    with pytest.raises(ValueError, match="repeats"):
        measure_speedup(model, model, [torch.tensor([1])], max_new_tokens=2, gamma=2, repeats=0)
    with pytest.raises(ValueError, match="gamma"):
        measure_speedup(model, model, [torch.tensor([1])], max_new_tokens=2, gamma=0)
