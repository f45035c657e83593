"""OnPolicyTask in dk.Distiller: λ = 0 is off-policy KD, λ = 1 never reads the data's
completions, the two temperatures, the loss of a sampled step against float64, accumulation."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from onpolicy_kit import VOCAB, parameters, prompt_batches, tiny_gpt2

import darkknowledge as dk
from darkknowledge.llm import CausalLMTask, GenerateSampler, OnPolicyTask, shift_labels
from darkknowledge.llm.generation import Completions
from darkknowledge.llm.on_policy import SAMPLED

sys.path.insert(0, str(Path(__file__).parents[1]))
import reference


def _fit(task, batches, *, steps=3, accumulation=1, divergence="forward_kl", dropout=0.1, seed=0):
    student, teacher = tiny_gpt2(0, dropout=dropout), tiny_gpt2(1, n_embd=24)
    distiller = dk.Distiller(
        student, teacher, batches, task=task, temperature=2.0, alpha=0.5,
        loss_options={"divergence": divergence}, optimizer="sgd", learning_rate=0.5,
        max_steps=steps, grad_accum_steps=accumulation, log_every=1, seed=seed, progress=False,
    )  # fmt: skip
    result = distiller.fit()
    return parameters(distiller.accelerator.unwrap_model(distiller.student)), result


def test_on_policy_fraction_zero_is_off_policy_kd_bitwise():
    """λ = 0 samples nothing and draws nothing from the global RNG: the same weights as
    CausalLMTask bit for bit, dropout included."""
    batches = prompt_batches(3)
    ours, _ = _fit(OnPolicyTask(fraction=0.0), batches)
    theirs, _ = _fit(CausalLMTask(), batches)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)
    initial = parameters(tiny_gpt2(0))
    assert any(not torch.equal(ours[name], initial[name]) for name in ours)  # it did train


def _poisoned(batches):
    """The same prompts and lengths, completions replaced by ids no embedding has."""
    poisoned = []
    for batch in batches:
        ids = batch["input_ids"].clone()
        positions = torch.arange(ids.shape[1])
        ids[positions >= batch["prompt_lengths"].unsqueeze(-1)] = 10**6
        poisoned.append({**batch, "input_ids": ids})
    return poisoned


def test_on_policy_fraction_one_never_reads_the_data_completions():
    batches = prompt_batches(3)
    poisoned = _poisoned(batches)
    with pytest.raises(IndexError):  # the poison works: a task that reads completions fails
        _fit(CausalLMTask(), poisoned, steps=1)
    clean, result = _fit(OnPolicyTask(fraction=1.0), batches)
    dirty, _ = _fit(OnPolicyTask(fraction=1.0), poisoned)
    assert all(torch.equal(clean[name], dirty[name]) for name in clean)
    assert all(record["hard"] == 0.0 for record in result.history if record["kind"] == "train")


def test_on_policy_sampling_temperature_changes_samples_not_the_loss():
    batch = prompt_batches(1)[0]
    student, teacher = tiny_gpt2(0), tiny_gpt2(1, n_embd=24)
    cool = OnPolicyTask(sampler=GenerateSampler(temperature=0.5))
    hot = OnPolicyTask(sampler=GenerateSampler(temperature=1.5))
    sampled = cool.prepare_batch(student, batch, step=4)
    assert sampled[SAMPLED] and not torch.equal(
        sampled["input_ids"], hot.prepare_batch(student, batch, step=4)["input_ids"]
    )
    teacher_outputs = dk.train.task.frozen_outputs(cool, teacher, sampled)

    def loss(task, temperature):
        loss_fn = dk.DistillationLoss(temperature=temperature, alpha=0.5, divergence="jsd")
        out = task.compute_loss(student, sampled, teacher_outputs, loss_fn=loss_fn, step=4)
        return out.loss.total.detach()

    assert torch.equal(loss(cool, 2.0), loss(hot, 2.0))  # the loss of given samples
    assert not torch.allclose(loss(cool, 2.0), loss(cool, 1.0))  # the loss temperature counts


def _full_logits(model, batch):
    output = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return output.logits  # (B, T, V)


@pytest.mark.parametrize("objective", ["divergence", "sampled_reverse_kl"])
def test_on_policy_sampled_step_is_the_soft_term_alone(objective):
    """On the student's own text: alpha·T²·D on completion tokens, no cross-entropy, value and
    gradient against float64 on the full logits (the sampled estimate: its surrogate)."""
    temperature, alpha = 2.0, 0.5
    student, teacher = tiny_gpt2(0), tiny_gpt2(1, n_embd=24)
    task = OnPolicyTask(objective=objective, chunk_size=5)
    sampled = task.prepare_batch(student, prompt_batches(1)[0], step=0)
    loss_fn = dk.DistillationLoss(temperature=temperature, alpha=alpha, divergence="reverse_kl")
    teacher_outputs = dk.train.task.frozen_outputs(task, teacher, sampled)
    out = task.compute_loss(student, sampled, teacher_outputs, loss_fn=loss_fn, step=0)
    ours = torch.autograd.grad(out.loss.total, list(student.parameters()))

    labels = shift_labels(
        sampled["input_ids"], sampled["attention_mask"], completion_mask=sampled["completion_mask"]
    )
    valid = labels != -100
    with torch.no_grad():
        teacher_logits = _full_logits(teacher, sampled).double()
    student_logits = _full_logits(student, sampled).double()
    if objective == "divergence":
        total, _, _ = reference.kd_loss(
            student_logits, teacher_logits, None, temperature=temperature, alpha=1.0,
            divergence="reverse_kl", mask=valid,
        )  # fmt: skip
        value = surrogate = alpha * total
    else:
        log_q = reference.softmax(student_logits, temperature).log()
        log_p = reference.softmax(teacher_logits, temperature).log()
        safe = labels.clamp_min(0).unsqueeze(-1)
        advantage = (log_q.gather(-1, safe) - log_p.gather(-1, safe)).squeeze(-1)[valid]
        weight = alpha * temperature**2 / valid.sum()
        value = weight * advantage.sum()
        surrogate = weight * (advantage.detach() * log_q.gather(-1, safe).squeeze(-1)[valid]).sum()
    want = torch.autograd.grad(surrogate, list(student.parameters()))
    torch.testing.assert_close(out.loss.total.double(), value.detach(), rtol=1e-5, atol=1e-7)
    assert float(out.loss.hard) == 0.0
    for got, expected in zip(ours, want):
        torch.testing.assert_close(got.double(), expected.double(), rtol=1e-4, atol=1e-7)


def test_on_policy_sampled_reverse_kl_needs_reverse_kl_on_the_data_steps():
    task = OnPolicyTask(objective="sampled_reverse_kl", fraction=0.0)
    with pytest.raises(ValueError, match="set divergence='reverse_kl', got 'jsd'"):
        _fit(task, prompt_batches(1), steps=1, divergence="jsd")


def test_on_policy_accumulation_equals_one_big_batch():
    """λ = 0.5: the coin is per optimizer step and each row's sample depends on its prompt,
    so two micro-batches of 2 rows give the update of one batch of 4."""
    task = OnPolicyTask(fraction=0.5, seed=0)
    coins = [task.on_policy(step) for step in range(4)]
    assert True in coins and False in coins, coins  # both kinds of step are exercised
    big = prompt_batches(4, rows=4)
    halves = [{k: v[i : i + 2] for k, v in batch.items()} for batch in big for i in (0, 2)]
    one, _ = _fit(OnPolicyTask(fraction=0.5, seed=0), big, steps=4, dropout=0.0)
    two, _ = _fit(OnPolicyTask(fraction=0.5, seed=0), halves, steps=4, accumulation=2, dropout=0.0)
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-6, msg=name)


def test_on_policy_batches_without_prompts_are_refused():
    task = OnPolicyTask()
    with pytest.raises(ValueError, match="on-policy distillation needs prompts"):
        task.prepare_batch(tiny_gpt2(0), {"input_ids": torch.randint(VOCAB, (2, 6))}, step=0)
    with pytest.raises(ValueError, match=r"fraction must be in \[0, 1\]"):
        OnPolicyTask(fraction=1.5)


def _gpt2(seed: int, vocab: int, n_embd: int = 16):
    """A tiny GPT-2 of another vocabulary than the kit's (nothing downloaded, dropout off)."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=vocab, n_positions=32, n_embd=n_embd, n_layer=1, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


def _without_padding(model, rows: int):
    """The same GPT-2 with only the first ``rows`` rows of its (tied) embedding and output
    layer: the student a padded one must train as."""
    cut = _gpt2(0, rows)
    with torch.no_grad():
        for name, param in cut.named_parameters():
            param.copy_(dict(model.named_parameters())[name][: param.shape[0]])
    return cut


@pytest.mark.parametrize(
    ("student_vocab", "teacher_vocab", "vocab_size"),
    [(256, 250, None), (64, 40, 40), (40, 40, 32)],  # padded student; explicit cuts
)
def test_on_policy_student_vocabulary_beyond_the_kept_one_is_cut(
    student_vocab, teacher_vocab, vocab_size
):
    """A student with more rows than the vocabulary the loss keeps samples only kept ids (the
    teacher could not score the others: before, an IndexError in its embedding, then a
    refusal) and trains exactly as the same student without the extra rows; those rows never
    move."""
    padded, teacher = _gpt2(0, student_vocab), _gpt2(1, teacher_vocab, n_embd=24)
    kept = vocab_size or teacher_vocab
    unpadded = _without_padding(padded, kept)
    initial = parameters(padded)
    batches = [{**b, "input_ids": b["input_ids"] % kept} for b in prompt_batches(3)]  # its text

    def fit(student):
        task = OnPolicyTask(fraction=1.0, vocab_size=vocab_size)
        distiller = dk.Distiller(
            student, teacher, batches, task=task, temperature=2.0, alpha=0.5, optimizer="sgd",
            learning_rate=0.5, max_steps=3, log_every=1, progress=False,
        )  # fmt: skip
        first = task.prepare_batch(student, batches[0], step=0)["input_ids"]
        distiller.fit()
        return first, parameters(distiller.accelerator.unwrap_model(distiller.student))

    (sampled, ours), (wanted, theirs) = fit(padded), fit(unpadded)
    assert int(sampled.max()) < kept and torch.equal(sampled, wanted)
    for name, value in theirs.items():
        torch.testing.assert_close(ours[name][: value.shape[0]], value, rtol=1e-5, atol=1e-6)
    embedding = "transformer.wte.weight"
    assert not torch.equal(ours[embedding][:kept], initial[embedding][:kept])  # it trained
    assert torch.equal(
        ours[embedding][kept:], initial[embedding][kept:]
    )  # never sampled, never moved


def test_on_policy_padded_student_without_bind_is_refused():
    """``prepare_batch`` by hand never met the teacher: the sampled batch is refused before
    the teacher reads it, with the two ways out."""
    student, teacher = _gpt2(0, 256), _gpt2(1, 250, n_embd=24)
    task = OnPolicyTask(fraction=1.0)
    sampled = task.prepare_batch(student, prompt_batches(1)[0], step=0)
    message = r"sampled from 256 ids, .* has 250 rows and the loss keeps the first 250 ids.*vocab_size=250"
    with pytest.raises(ValueError, match=message):
        dk.train.task.frozen_outputs(task, teacher, sampled)
    OnPolicyTask(fraction=1.0, vocab_size=250).prepare_batch(student, prompt_batches(1)[0], step=0)


class _NoCut:
    """A sampler of the documented call without the optional ``vocab_size``."""

    def __call__(self, model, prompt_ids, prompt_mask, *, max_new_tokens, seeds):
        return GenerateSampler()(
            model, prompt_ids, prompt_mask, max_new_tokens=max_new_tokens, seeds=seeds
        )


class _IgnoresCut:
    """Takes ``vocab_size`` and writes the padded student's last id anyway."""

    def __call__(self, model, prompt_ids, prompt_mask, *, max_new_tokens, seeds, vocab_size=None):
        ids = torch.full((prompt_ids.shape[0], max_new_tokens), 255)
        return Completions(ids, torch.ones_like(ids, dtype=torch.bool))


@pytest.mark.parametrize(
    ("sampler", "message"),
    [(_NoCut(), "sampler _NoCut takes no vocab_size keyword"),
     (_IgnoresCut(), "sampler _IgnoresCut was given vocab_size=250 but wrote id 255")],
)  # fmt: skip
def test_on_policy_padded_student_needs_a_sampler_that_cuts(sampler, message):
    student, teacher = _gpt2(0, 256), _gpt2(1, 250, n_embd=24)
    task = OnPolicyTask(fraction=1.0, sampler=sampler)
    distiller = dk.Distiller(
        student, teacher, prompt_batches(1), task=task, temperature=2.0, max_steps=1,
        progress=False,
    )  # fmt: skip
    with pytest.raises(ValueError, match=message):
        distiller.fit()


@pytest.mark.parametrize("objective", ["divergence", "sampled_reverse_kl"])
def test_on_policy_teacher_padded_beyond_the_student_is_cut(objective):
    """A teacher whose output layer is the student's 250 ids padded to 256: the sampled step's
    loss and gradient are those of the same teacher without its padding rows."""
    student, padded = _gpt2(0, 250), _gpt2(1, 256, n_embd=24)
    unpadded = _gpt2(1, 250, n_embd=24)
    with torch.no_grad():  # the same teacher: its first 250 embedding (= output) rows
        for name, param in unpadded.named_parameters():
            param.copy_(dict(padded.named_parameters())[name][: param.shape[0]])
    task = OnPolicyTask(objective=objective)
    batch = {**prompt_batches(1)[0]}
    sampled = task.prepare_batch(student, batch, step=0)
    loss_fn = dk.DistillationLoss(temperature=2.0, alpha=0.5, divergence="reverse_kl")

    def loss_and_grads(teacher):
        outputs = dk.train.task.frozen_outputs(task, teacher, sampled)
        out = task.compute_loss(student, sampled, outputs, loss_fn=loss_fn, step=0)
        return out.loss.total, torch.autograd.grad(out.loss.total, list(student.parameters()))

    (cut, cut_grads), (whole, whole_grads) = loss_and_grads(padded), loss_and_grads(unpadded)
    torch.testing.assert_close(cut, whole, rtol=1e-6, atol=1e-7)
    for got, want in zip(cut_grads, whole_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
