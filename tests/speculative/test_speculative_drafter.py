"""The Drafter protocol (target hidden states for self-speculation), ModelDrafter's vocabulary
fitting and the KV-cache rollback helpers."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
import transformers
from speculative_models import naive_greedy, naive_speculative, tiny_lm

from darkknowledge.llm import logits_from_hidden, output_layer
from darkknowledge.speculative import Draft, Drafter, Sampler, generate
from darkknowledge.speculative._cache import CachedLM, crop_cache


class HiddenStateDrafter:
    """A self-speculation-shaped drafter: it reads the target's hidden states, checks them against
    a forward pass without cache, and proposes up to two tokens from the target's own output layer
    applied to the last one (a weak draft, but any reported distribution keeps decoding exact)."""

    wants_target_hidden = True

    def __init__(self, target):
        self.target, self.layer = target, output_layer(target)
        self.received: list[tuple[int, int | None]] = []  # (sequence length, hidden positions)

    def reset(self) -> None:
        self.received.clear()

    def propose(self, input_ids, num_tokens, sampler, target_hidden=None) -> Draft:
        length = input_ids.shape[1]
        self.received.append((length, None if target_hidden is None else target_hidden.shape[1]))
        if target_hidden is None:
            return Draft(torch.zeros(0, dtype=torch.long), torch.zeros(0, 24))
        count = target_hidden.shape[1]
        with torch.no_grad():
            full = self.target(input_ids[:, :-1], output_hidden_states=True, use_cache=False)
        expected = full.hidden_states[-1][:, length - 1 - count :]
        torch.testing.assert_close(target_hidden, expected, atol=1e-5, rtol=1e-5)
        row = sampler.probs(logits_from_hidden(target_hidden[0, -1], self.layer))
        tokens = [sampler.sample(row) for _ in range(min(num_tokens, 2))]
        return Draft(torch.stack(tokens), row.expand(len(tokens), -1))

    def rollback(self, num_accepted: int) -> None:
        pass


def test_drafter_protocol_gets_the_target_hidden_states():
    target = tiny_lm(0)
    drafter = HiddenStateDrafter(target)
    assert isinstance(drafter, Drafter)
    prompt = torch.tensor([[3, 1, 4, 1, 5]])
    output = generate(target, drafter, prompt, max_new_tokens=20, gamma=4, greedy=True)
    assert torch.equal(output.sequences, naive_greedy(target, prompt, 20))
    assert output.target_calls == output.rounds + 1  # the prompt first: the drafter needs its state
    assert drafter.received[0] == (5, 4)  # the whole prompt but its last token
    lengths = [length for length, _ in drafter.received]
    for (length, count), previous in zip(drafter.received[1:], lengths):
        assert count == length - previous  # exactly the positions committed since the last call
    assert max(output.proposed_per_round) == 2 and output.accepted_tokens > 0


def test_drafter_protocol_with_a_one_token_prompt_starts_without_hidden_states():
    target = tiny_lm(0)
    drafter = HiddenStateDrafter(target)
    output = generate(target, drafter, torch.tensor([[7]]), max_new_tokens=6, greedy=True)
    assert drafter.received[0] == (1, None)
    assert output.target_calls == output.rounds  # nothing to prefill
    assert torch.equal(output.sequences, naive_greedy(target, torch.tensor([[7]]), 6))


def test_model_drafter_cuts_the_padding_logits_of_a_wider_draft():
    """A padded (wider) draft has its extra logits cut: greedy output is still the target's, and
    sampling matches the no-cache decoder run on the cut draft distributions."""
    target = tiny_lm(0)
    draft = tiny_lm(1, n_layer=1, n_embd=16, vocab_size=30)
    prompt = torch.tensor([[1, 2, 3]])
    greedy = generate(target, draft, prompt, max_new_tokens=15, gamma=3, greedy=True)
    assert torch.equal(greedy.sequences, naive_greedy(target, prompt, 15))

    class CutDraft(torch.nn.Module):  # the naive decoder's view of the fitted draft
        def forward(self, ids, use_cache=False):
            logits = draft(ids, use_cache=False).logits[..., :24]
            return transformers.modeling_outputs.CausalLMOutput(logits=logits)

    kwargs = {"max_new_tokens": 15, "gamma": 3, "temperature": 1.0}
    sampled = generate(target, draft, prompt, generator=torch.Generator().manual_seed(0), **kwargs)
    expected = naive_speculative(
        target, CutDraft(), prompt, generator=torch.Generator().manual_seed(0), **kwargs
    )
    assert torch.equal(sampled.sequences, expected)
    assert sampled.rejected_tokens > 0


def test_model_drafter_with_a_narrower_vocabulary():
    """A narrower draft never proposes the tokens it lacks; decoding is exact while the target
    does not emit them, and a clear error says so when it does."""
    target = tiny_lm(0)
    draft = tiny_lm(1, n_layer=1, n_embd=16, vocab_size=20)
    prompt = torch.tensor([[4, 5, 6]])
    reference = naive_greedy(target, prompt, 15)
    assert int(reference.max()) < 20  # this continuation stays inside the draft's vocabulary
    output = generate(target, draft, prompt, max_new_tokens=15, gamma=3, greedy=True)
    assert torch.equal(output.sequences, reference)
    with pytest.raises(ValueError, match="the draft cannot read"):
        # greedy from [1, 2, 3] emits token 20 after 8 tokens
        generate(target, draft, torch.tensor([[1, 2, 3]]), max_new_tokens=15, greedy=True)


class BadDrafter:
    wants_target_hidden = False

    def __init__(self, tokens, probs):
        self.tokens, self.probs = tokens, probs

    def reset(self):
        pass

    def propose(self, input_ids, num_tokens, sampler, target_hidden=None):
        return Draft(self.tokens, self.probs)

    def rollback(self, num_accepted):
        pass


@pytest.mark.parametrize(
    ("tokens", "probs", "message"),
    [
        (torch.zeros(5, dtype=torch.long), torch.full((5, 24), 1 / 24), r"k <= 4"),
        (torch.zeros(2, dtype=torch.long), torch.full((3, 24), 1 / 24), r"shape \(k, V\)"),
        (torch.zeros(2, dtype=torch.long), torch.full((2, 30), 1 / 30), "share a tokenizer"),
    ],
)
def test_generate_rejects_a_drafter_output_of_the_wrong_shape(tokens, probs, message):
    with pytest.raises(ValueError, match=message):
        generate(tiny_lm(0), BadDrafter(tokens, probs), torch.tensor([[1]]), max_new_tokens=8)


def test_generate_warns_about_a_target_in_training_mode_with_dropout():
    target = tiny_lm(0)
    target.config.attn_pdrop = 0.0
    target.train()
    target.transformer.drop.p = 0.1
    with pytest.warns(UserWarning, match=r"target.eval\(\)"):
        generate(target, tiny_lm(1), torch.tensor([[1]]), max_new_tokens=2, greedy=True)
    target.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        generate(target, tiny_lm(1), torch.tensor([[1]]), max_new_tokens=2, greedy=True)


def legacy_tuple(cache) -> tuple:
    """A cache as the legacy per-layer (key, value) tuple, whichever transformers made it."""
    if isinstance(cache, tuple):
        return cache
    if hasattr(cache, "to_legacy_cache"):
        return cache.to_legacy_cache()
    return tuple((layer.keys, layer.values) for layer in cache.layers)


def from_legacy_tuple(legacy: tuple):
    if "ddp_cache_data" in inspect.signature(transformers.DynamicCache.__init__).parameters:
        return transformers.DynamicCache(ddp_cache_data=legacy)
    return transformers.DynamicCache.from_legacy_cache(legacy)


@pytest.mark.parametrize("legacy", [False, True])
def test_crop_cache_then_continue_matches_no_cache(legacy):
    """Fill a cache with 9 tokens, drop the last 4, feed 3 others: the logits equal a forward
    pass without cache on the 5 kept + 3 new tokens. Legacy tuple caches are cropped by slicing."""
    model = tiny_lm(0)
    tokens = torch.tensor([[1, 5, 2, 8, 3, 9, 9, 4, 7]])
    other = torch.tensor([[11, 12, 13]])
    lm = CachedLM(model)
    with torch.no_grad():
        lm.extend(tokens, keep_logits=1)
        if legacy:
            cropped = crop_cache(legacy_tuple(lm.cache), 4)
            assert all(tensor.shape[-2] == 5 for layer in cropped for tensor in layer)
            lm.cache, lm.length = from_legacy_tuple(cropped), 5
        else:
            lm.crop(5)
        logits, _ = lm.extend(other, keep_logits=3)
        expected = model(torch.cat([tokens[:, :5], other], 1), use_cache=False).logits[0, -3:]
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


def test_sampler_greedy_and_temperature():
    logits = torch.tensor([[1.0, 3.0, 2.0]])
    torch.testing.assert_close(Sampler(temperature=2.0).probs(logits), (logits / 2).softmax(-1))
    assert Sampler(greedy=True).probs(logits).tolist() == [[0.0, 1.0, 0.0]]
