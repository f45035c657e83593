"""generate and autoregressive_generate on tiny GPT-2 models, against decoders without a cache."""

from __future__ import annotations

import pytest
import torch
from speculative_models import naive_greedy, naive_speculative, perturbed, tiny_llama, tiny_lm

from darkknowledge.speculative import autoregressive_generate, generate

PROMPTS = (
    torch.tensor([[1, 2, 3, 4]]),
    torch.tensor([[7]]),
    torch.tensor([[5, 9, 11, 2, 2, 8, 3]]),
)


@pytest.fixture(scope="module")
def target():
    return tiny_lm(0)


@pytest.fixture(scope="module")
def drafts(target):
    """A perturbed copy of the target (agrees often) and a smaller, unrelated model (rarely)."""
    return {"perturbed": perturbed(target, 0.3, seed=1), "small": tiny_lm(1, n_layer=1, n_embd=16)}


@pytest.mark.parametrize("draft_name", ["perturbed", "small"])
@pytest.mark.parametrize("gamma", [1, 3, 5])
def test_generate_greedy_equals_the_target_greedy_decoding(target, drafts, draft_name, gamma):
    accepted = rejected = 0
    for prompt in PROMPTS:
        output = generate(
            target, drafts[draft_name], prompt, max_new_tokens=30, gamma=gamma, greedy=True
        )
        assert torch.equal(output.sequences, naive_greedy(target, prompt, 30))
        accepted += output.accepted_tokens
        rejected += output.rejected_tokens
    assert accepted > 0 and rejected > 0  # both the all-accepted and the rollback paths ran


@pytest.mark.parametrize("max_new_tokens", [0, 1, 2, 7, 13, 24])
def test_generate_respects_max_new_tokens_and_gamma_plus_one(target, drafts, max_new_tokens):
    gamma = 4
    generator = torch.Generator().manual_seed(0)
    for draft in drafts.values():
        output = generate(
            target,
            draft,
            PROMPTS[0],
            max_new_tokens=max_new_tokens,
            gamma=gamma,
            generator=generator,
        )
        assert output.sequences.shape == (1, 4 + max_new_tokens)
        assert output.new_tokens == max_new_tokens
        assert output.target_calls == output.rounds
        assert all(
            0 <= a <= p <= gamma
            for a, p in zip(output.accepted_per_round, output.proposed_per_round)
        )
        # each round adds its accepted tokens plus one: at most gamma + 1 per target call
        assert sum(a + 1 for a in output.accepted_per_round) == max_new_tokens
        assert output.new_tokens <= (gamma + 1) * output.target_calls
        assert output.accepted_tokens == sum(output.accepted_per_round)
        assert output.proposed_tokens == sum(output.proposed_per_round)
        assert 0 <= output.draft_time_s <= output.wall_time_s
        assert (output.draft_time_s > 0) == (output.proposed_tokens > 0)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_generate_sampled_equals_a_decoder_without_cache(target, drafts, temperature):
    """Same random draws, distributions recomputed from scratch at every step: any error in
    feeding or rolling back either KV cache changes a distribution and, soon, a token."""
    for draft in drafts.values():
        for seed, prompt in enumerate(PROMPTS):
            kwargs = {"max_new_tokens": 25, "gamma": 3, "temperature": temperature}
            output = generate(
                target, draft, prompt, generator=torch.Generator().manual_seed(seed), **kwargs
            )
            expected = naive_speculative(
                target, draft, prompt, generator=torch.Generator().manual_seed(seed), **kwargs
            )
            assert torch.equal(output.sequences, expected)
            assert output.rejected_tokens > 0 or draft is drafts["perturbed"]


def test_generate_with_llama_models_rotary_positions_after_rollback():
    """Rotary position embeddings read the position from the cache length: after a crop the
    next token must get the right one. Greedy and sampled, against the decoders without cache."""
    target = tiny_llama(0)
    draft = perturbed(target, 0.3, seed=2)
    prompt = PROMPTS[2]
    greedy = generate(target, draft, prompt, max_new_tokens=25, gamma=3, greedy=True)
    assert torch.equal(greedy.sequences, naive_greedy(target, prompt, 25))
    kwargs = {"max_new_tokens": 25, "gamma": 3, "temperature": 1.0}
    sampled = generate(target, draft, prompt, generator=torch.Generator().manual_seed(0), **kwargs)
    expected = naive_speculative(
        target, draft, prompt, generator=torch.Generator().manual_seed(0), **kwargs
    )
    assert torch.equal(sampled.sequences, expected)
    assert min(greedy.rejected_tokens, sampled.rejected_tokens) > 0
    assert min(greedy.accepted_tokens, sampled.accepted_tokens) > 0


def test_generate_draft_equal_to_target_accepts_everything(target):
    output = generate(
        target,
        target,
        PROMPTS[0],
        max_new_tokens=23,
        gamma=4,
        generator=torch.Generator().manual_seed(0),
    )
    assert output.rejected_tokens == 0
    assert output.accepted_tokens == output.proposed_tokens == 23 - output.rounds
    assert output.accepted_per_round == [4, 4, 4, 4, 2]  # 5 + 5 + 5 + 5 + 3 tokens
    assert output.acceptance_rate == 1.0
    assert output.tokens_per_target_call == pytest.approx(23 / 5)


def test_generate_stops_after_the_eos_token(target, drafts):
    reference = naive_greedy(target, PROMPTS[0], 30)[0, 4:].tolist()
    eos = reference[10]
    first = reference.index(eos)
    for draft in drafts.values():
        output = generate(
            target, draft, PROMPTS[0], max_new_tokens=30, greedy=True, eos_token_id=[99, eos]
        )
        assert output.sequences[0, 4:].tolist() == reference[: first + 1]
        baseline = autoregressive_generate(
            target, PROMPTS[0], max_new_tokens=30, greedy=True, eos_token_id=eos
        )
        assert torch.equal(baseline.sequences, output.sequences)


def test_autoregressive_generate_matches_the_decoder_without_cache(target):
    output = autoregressive_generate(target, PROMPTS[2], max_new_tokens=20, greedy=True)
    assert torch.equal(output.sequences, naive_greedy(target, PROMPTS[2], 20))
    assert output.target_calls == 20 and output.tokens_per_target_call == 1.0
    assert output.wall_time_s > 0
    sampled = autoregressive_generate(
        target,
        PROMPTS[0],
        max_new_tokens=20,
        temperature=0.8,
        generator=torch.Generator().manual_seed(3),
    )
    generator, sequence = torch.Generator().manual_seed(3), PROMPTS[0]
    with torch.no_grad():
        for _ in range(20):
            row = (target(sequence).logits[0, -1] / 0.8).softmax(-1)
            sequence = torch.cat(
                [sequence, torch.multinomial(row, 1, generator=generator).reshape(1, 1)], 1
            )
    assert torch.equal(sampled.sequences, sequence)


def test_generate_accepts_a_one_dimensional_prompt(target, drafts):
    output = generate(target, drafts["small"], PROMPTS[0][0], max_new_tokens=5, greedy=True)
    assert torch.equal(output.sequences, naive_greedy(target, PROMPTS[0], 5))


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"input_ids": torch.tensor([[1, 2], [3, 4]])}, ValueError, "batch size 1"),
        ({"input_ids": torch.zeros(1, 0, dtype=torch.long)}, ValueError, "at least one token"),
        ({"input_ids": torch.tensor([[1.0, 2.0]])}, TypeError, "integer"),
        ({"max_new_tokens": -1}, ValueError, "max_new_tokens"),
        ({"max_new_tokens": 2.5}, TypeError, "max_new_tokens"),
        ({"gamma": 0}, ValueError, "gamma"),
        ({"temperature": 0.0}, ValueError, "temperature"),
        ({"greedy": 1}, TypeError, "greedy"),
        ({"generator": 3}, TypeError, "generator"),
        ({"eos_token_id": "x"}, TypeError, "eos_token_id"),
        ({"draft": "gpt2"}, TypeError, "draft must be"),
    ],
)
def test_generate_rejects_bad_arguments(target, drafts, kwargs, error, message):
    arguments = {
        "target": target,
        "draft": drafts["small"],
        "input_ids": PROMPTS[0],
        "max_new_tokens": 3,
        **kwargs,
    }
    with pytest.raises(error, match=message):
        generate(**arguments)
