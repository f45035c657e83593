"""Self-speculation with MTP heads: exact greedy decoding, per-round acceptance computed
independently, the reported distributions, the offline acceptance rate, and distillation
raising it."""

from __future__ import annotations

import pytest
import torch
from mtp_models import padded_batch, tiny_lm

from darkknowledge.llm import logits_from_hidden, output_layer, shift_labels
from darkknowledge.mtp import (
    MTPDrafter,
    MTPStudent,
    depth_acceptance_rates,
    mtp_batch_loss,
    self_speculate,
)
from darkknowledge.speculative import Drafter, Sampler, autoregressive_generate


def make_student(kind: str, depths: int = 3, seed: int = 0) -> MTPStudent:
    student = MTPStudent.from_model(
        tiny_lm(seed, n_embd=32, n_layer=2), kind, depths, intermediate_size=48
    )
    with torch.no_grad():  # heads that disagree with the model often, but not always
        for parameter in student.heads.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return student.eval()


def naive_greedy(model, prompt, count):
    """Greedy decoding with a full forward pass per token, no cache."""
    sequence = prompt.reshape(1, -1)
    for _ in range(count):
        token = model(sequence).logits[0, -1].argmax()
        sequence = torch.cat([sequence, token.reshape(1, 1)], 1)
    return sequence


def teacher_forced_drafts(student, sequence):
    """``drafts[k - 1][i]``: depth k's argmax at row i over the whole final sequence (the
    sequential form reads the sequence's own tokens)."""
    with torch.no_grad():
        out = student(sequence)
        layer = output_layer(student.model)
        return [logits_from_hidden(h[0], layer).argmax(-1) for h in out.depth_hidden]


@pytest.mark.parametrize("kind", ["parallel", "sequential"])
def test_self_speculate_greedy_is_the_model_greedy_decoding(kind):
    student = make_student(kind)
    prompt = torch.tensor([[3, 1, 4, 1, 5]])
    out = self_speculate(student, prompt, max_new_tokens=30, greedy=True)
    plain = autoregressive_generate(student.model, prompt, max_new_tokens=30, greedy=True)
    assert torch.equal(out.sequences, plain.sequences)
    assert torch.equal(out.sequences, naive_greedy(student.model, prompt, 30))
    # Statistics: each round proposes at most D tokens and yields at most D + 1.
    assert max(out.proposed_per_round) <= 3 and out.new_tokens == 30
    assert out.new_tokens <= 4 * (out.target_calls - 1)  # the first call reads the prompt
    assert all(0 <= a <= p for a, p in zip(out.accepted_per_round, out.proposed_per_round))
    assert 0 < out.accepted_tokens < out.proposed_tokens  # neither trivial case
    # Every round's accepted count, recomputed from one forward pass over the final sequence:
    # in a round at length L, depth k drafts from row L - 2 the token at L + k - 1; the round
    # keeps the drafts up to the first one that differs from the sequence.
    drafts = teacher_forced_drafts(student, out.sequences)
    sequence, length = out.sequences[0], prompt.shape[1]
    for proposed, accepted in zip(out.proposed_per_round, out.accepted_per_round):
        expected = 0
        while expected < proposed and drafts[expected][length - 2] == sequence[length + expected]:
            expected += 1
        assert accepted == expected
        length += accepted + 1


@pytest.mark.parametrize("kind", ["parallel", "sequential"])
def test_mtp_drafter_draws_each_token_from_the_row_it_reports(kind):
    """Row k of Draft.probs is softmax(z_k / T) of depth k at position L − 2 (the sequential
    form reading the earlier draft tokens), and token k is the sampler's draw from that row."""
    student, temperature = make_student(kind), 1.7
    drafter = MTPDrafter(student)
    assert isinstance(drafter, Drafter) and drafter.wants_target_hidden
    sequence = torch.tensor([[2, 7, 1, 8, 2, 8]])
    length = sequence.shape[1]
    with torch.no_grad():
        hidden = student(sequence).hidden  # (1, L, H), no cache
        drafter.reset()
        draft = drafter.propose(
            sequence, 3, Sampler(temperature, False, torch.Generator().manual_seed(7)),
            target_hidden=hidden[:, : length - 1],
        )  # fmt: skip
        extended = torch.cat([sequence, draft.tokens.reshape(1, -1)], 1)
        states = student(extended).depth_hidden  # teacher forcing on the drafted tokens
        layer = output_layer(student.model)
        expected = torch.stack(
            [
                torch.softmax(logits_from_hidden(s[0, length - 2], layer) / temperature, -1)
                for s in states
            ]
        )
    torch.testing.assert_close(draft.probs, expected)
    generator = torch.Generator().manual_seed(7)
    redrawn = torch.stack(
        [torch.multinomial(row, 1, generator=generator)[0] for row in draft.probs]
    )
    assert torch.equal(draft.tokens, redrawn)


def test_mtp_drafter_proposes_at_most_num_depths_and_nothing_without_a_state():
    student = make_student("parallel", depths=2)
    drafter = MTPDrafter(student)
    drafter.reset()
    sampler = Sampler(greedy=True)
    nothing = drafter.propose(torch.tensor([[4]]), 2, sampler, target_hidden=None)
    assert nothing.tokens.shape == (0,) and nothing.probs.shape == (0, 32)
    hidden = torch.randn(1, 3, 32)
    assert drafter.propose(torch.tensor([[4, 5, 6, 7]]), 5, sampler, hidden).tokens.shape == (2,)
    assert drafter.propose(torch.tensor([[4, 5, 6, 7]]), 1, sampler, hidden).tokens.shape == (1,)
    # A one-token prompt: the first round is the target alone, then the heads draft.
    out = self_speculate(student, torch.tensor([[4]]), max_new_tokens=12, greedy=True)
    assert out.proposed_per_round[0] == 0 and out.proposed_tokens > 0


def test_self_speculate_sampling_keeps_the_round_bounds():
    student = make_student("sequential")
    out = self_speculate(
        student, torch.tensor([[1, 2, 3]]), max_new_tokens=40, temperature=0.8,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert out.sequences.shape == (1, 43) and out.new_tokens == 40
    assert all(a <= p <= 3 for a, p in zip(out.accepted_per_round, out.proposed_per_round))
    assert sum(a + 1 for a in out.accepted_per_round) == 40


def test_depth_acceptance_rates_match_position_by_position_computation():
    student = make_student("sequential", depths=2)
    input_ids, attention_mask, targets = padded_batch(32)
    labels = shift_labels(targets, attention_mask)
    rates = depth_acceptance_rates(
        student, input_ids, labels, attention_mask=attention_mask, temperature=1.3, chunk_size=4
    )
    with torch.no_grad():
        out = student(input_ids, attention_mask)
        layer = output_layer(student.model)
        for depth in (1, 2):
            values = []
            for b in range(3):
                for i in range(9):
                    j = i + depth + 1  # the drafted token, verified by the target at j - 1
                    mask = attention_mask[b]
                    if j >= 9 or not (mask[i] and mask[j - 1] and mask[j]) or targets[b, j] == -100:
                        continue
                    q = torch.softmax(
                        logits_from_hidden(out.depth_hidden[depth - 1][b, i], layer).double() / 1.3,
                        -1,
                    )
                    p = torch.softmax(
                        logits_from_hidden(out.hidden[b, j - 1], layer).double() / 1.3, -1
                    )
                    values.append(torch.minimum(p, q).sum())
            torch.testing.assert_close(
                rates[depth - 1].double(), torch.stack(values).mean(), rtol=1e-5, atol=1e-6
            )


@pytest.mark.parametrize("kind", ["parallel", "sequential"])
def test_heads_distilled_from_the_model_raise_its_acceptance_rate(kind):
    """Heads trained (trunk frozen) to match the model's own distribution at i + k, on text the
    model sampled, accept more of its tokens on held-out samples than before training."""
    student = MTPStudent.from_model(tiny_lm(0, n_embd=32, n_layer=2), kind, 2, intermediate_size=64)
    student.eval().model.requires_grad_(False)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        starts = torch.randint(32, (64, 1), generator=generator)
        text = student.model.generate(
            starts, do_sample=True, max_new_tokens=23, min_new_tokens=23, top_k=0, pad_token_id=0
        )
    train, held_out = text[:48], text[48:]
    before = depth_acceptance_rates(student, held_out, shift_labels(held_out))
    optimizer = torch.optim.Adam(student.heads.parameters(), lr=3e-3)
    layer = output_layer(student.model)
    for _ in range(100):
        batch = train[torch.randint(48, (16,), generator=generator)]
        with torch.no_grad():
            teacher_hidden = student(batch).hidden  # the model itself is the teacher
        loss = mtp_batch_loss(
            student, batch, shift_labels(batch), teacher_hidden=teacher_hidden, teacher_layer=layer,
            main_weight=0.0, temperature=1.0, alpha=1.0,
        )  # fmt: skip
        optimizer.zero_grad()
        loss.total.backward()
        optimizer.step()
    after = depth_acceptance_rates(student, held_out, shift_labels(held_out))
    assert bool((after > before + 0.04).all()), (before, after)
