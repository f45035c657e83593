import pytest
import torch
import torch.nn.functional as F

import darkknowledge as dk
from darkknowledge.llm import CausalLMTask, shift_labels


def _batch(seed: int = 0, rows: int = 3, length: int = 7, vocab_size: int = 40):
    """Left- and right-padded rows with prompts of different lengths."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(vocab_size, (rows, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding
    mask[-1, -3:] = 0  # right padding
    prompt_lengths = torch.arange(rows) % 3 + 1
    return {"input_ids": ids, "attention_mask": mask, "prompt_lengths": prompt_lengths}


def _grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_causal_lm_task_loss_equals_kd_loss_on_full_shifted_logits(make_gpt2, divergence):
    student, teacher = make_gpt2(0).eval(), make_gpt2(1, n_embd=24, n_layer=2).eval()
    batch = _batch()
    loss_fn = dk.DistillationLoss(temperature=2.0, alpha=0.7, divergence=divergence, beta=0.3)
    task = CausalLMTask(chunk_size=5)  # 21 positions: a leftover chunk
    with torch.inference_mode():  # as the Distiller runs it
        teacher_outputs = task.teacher_outputs(teacher, batch)
    fused = task.compute_loss(
        student, batch, teacher_outputs, loss_fn=loss_fn, step=0, normalizer=None, grad_meter=False
    )
    fused.loss.total.backward()
    fused_grads = _grads(student)
    assert fused.soft_grad_norm is None and fused.hard_grad_norm is None
    student.zero_grad()

    labels = shift_labels(
        batch["input_ids"], batch["attention_mask"], prompt_lengths=batch["prompt_lengths"]
    )
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        teacher_logits = teacher(**inputs).logits
    full = dk.kd_loss(
        student(**inputs).logits,
        teacher_logits,
        labels,
        temperature=2.0,
        alpha=0.7,
        divergence=divergence,
        beta=0.3,
    )
    full.total.backward()
    for got, want in zip(fused.loss, full):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert fused_grads.keys() == _grads(student).keys()
    for name, grad in _grads(student).items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert int(task.count_valid(batch)) == int((labels != -100).sum()) > 0


def test_causal_lm_task_labels_only_is_cross_entropy(make_gpt2):
    student = make_gpt2(0).eval()
    batch = _batch(seed=3)
    task = CausalLMTask(chunk_size=4)
    out = task.compute_loss(
        student, batch, None, loss_fn=None, step=0, normalizer=None, grad_meter=False
    )
    labels = shift_labels(
        batch["input_ids"], batch["attention_mask"], prompt_lengths=batch["prompt_lengths"]
    )
    logits = student(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    ).logits.double()
    reference = F.cross_entropy(logits.reshape(-1, 40), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss.total.double(), reference, rtol=1e-5, atol=1e-6)


def test_causal_lm_task_accumulation_with_global_normalizer_equals_one_batch(make_gpt2):
    student, teacher = make_gpt2(0).eval(), make_gpt2(1, n_embd=24).eval()
    loss_fn = dk.DistillationLoss(temperature=3.0, alpha=0.5)
    task = CausalLMTask(chunk_size=8)
    micro = [_batch(seed=s, rows=2) for s in range(3)]  # different valid counts per micro-batch
    normalizer = sum(task.count_valid(b) for b in micro)
    for b in micro:
        out = task.compute_loss(
            student, b, task.teacher_outputs(teacher, b), loss_fn=loss_fn, normalizer=normalizer
        )
        out.loss.total.backward()  # summed over micro-batches, never divided by k
    accumulated = _grads(student)
    student.zero_grad()
    big = {key: torch.cat([b[key] for b in micro]) for key in micro[0]}
    task.compute_loss(
        student, big, task.teacher_outputs(teacher, big), loss_fn=loss_fn
    ).loss.total.backward()
    for name, grad in _grads(student).items():
        torch.testing.assert_close(accumulated[name], grad, rtol=1e-4, atol=1e-7, msg=name)


def test_causal_lm_task_eval_sums_match_naive_reference(make_gpt2):
    student = make_gpt2(2).eval()
    batch = _batch(seed=5)
    sums = CausalLMTask(chunk_size=3).eval_sums(student, batch)
    labels = shift_labels(
        batch["input_ids"], batch["attention_mask"], prompt_lengths=batch["prompt_lengths"]
    )
    with torch.no_grad():
        logits = student(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits
    valid = labels != -100
    nll = F.cross_entropy(logits[valid].double(), labels[valid], reduction="sum")
    assert sums["count"] == float(valid.sum())
    assert sums["correct"] == float((logits[valid].argmax(-1) == labels[valid]).sum())
    assert sums["loss"] == pytest.approx(float(nll), rel=1e-5)


def test_causal_lm_task_rejects_unsupported_options_and_batches(make_gpt2):
    student, teacher = make_gpt2(0), make_gpt2(1)
    task = CausalLMTask()
    batch = _batch()
    loss_fn = dk.DistillationLoss(temperature=2.0, alpha=0.5, standardize=True)
    with pytest.raises(ValueError, match="standardize"):
        task.compute_loss(student, batch, task.teacher_outputs(teacher, batch), loss_fn=loss_fn)
    with pytest.raises(TypeError, match="input_ids"):
        task.count_valid({"ids": batch["input_ids"]})
    with pytest.raises(ValueError, match="chunk_size"):
        CausalLMTask(chunk_size=0)
