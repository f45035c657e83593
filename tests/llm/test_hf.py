import math

import lm_reference
import pytest
import torch
import transformers

from darkknowledge.hf import DistillationTrainer


def _examples(count: int, seed: int = 0, length: int = 8, vocab_size: int = 40):
    """Examples with different amounts of right padding (labels -100 there, as HF collators do)."""
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for i in range(count):
        ids = torch.randint(1, vocab_size, (length,), generator=generator)
        real = (8, 6, 4, 3)[i % 4] * length // 8  # counts 7, 5, 3, 2: no two pairs tie
        mask = (torch.arange(length) < real).long()
        labels = torch.where(mask.bool(), ids, -100)
        examples.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return examples


def _args(tmp_path, **overrides):
    options = {
        "output_dir": str(tmp_path),
        "use_cpu": True,
        "report_to": [],
        "save_strategy": "no",
        "logging_steps": 1,
        "disable_tqdm": True,
        "learning_rate": 1e-2,
        "per_device_train_batch_size": 4,
        "lr_scheduler_type": "constant",
        "seed": 0,
        **overrides,
    }
    return transformers.TrainingArguments(**options)


def test_distillation_trainer_loss_falls_and_teacher_is_unchanged(tmp_path, make_gpt2):
    student, teacher = make_gpt2(0), make_gpt2(1, n_embd=24)
    before = {name: value.clone() for name, value in teacher.state_dict().items()}
    data = _examples(8)
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=_args(tmp_path, max_steps=12),
        train_dataset=data,
        eval_dataset=data,
        temperature=2.0,
        alpha=0.5,
        chunk_size=7,
    )
    first = trainer.evaluate()["eval_loss"]
    trainer.train()
    last = trainer.evaluate()["eval_loss"]
    assert last < 0.9 * first
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 12 and losses[-1] < losses[0]
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    for name, value in teacher.state_dict().items():
        assert torch.equal(value, before[name]), name


def _flat_parameters(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("batch_size, accumulation", [(4, 1), (2, 2)])
def test_distillation_trainer_step_matches_a_hand_written_reference(
    tmp_path, make_gpt2, batch_size, accumulation
):
    """One SGD step (lr 1) on 4 left-padded rows with prompts, whole or as 2 accumulated
    micro-batches, moves the student by exactly minus the gradient of the reference loss over
    the 4 rows: full logits, labels shifted by hand, float64 kd_loss. Tokens are counted by the
    loss's rule (the Trainer's own count includes each row's first real token) and the prompt
    lengths survive remove_unused_columns (the default)."""
    data = lm_reference.left_padded(4, seed=3)
    student, teacher = make_gpt2(0), make_gpt2(1, n_embd=24)
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=_args(
            tmp_path,
            max_steps=1,
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            max_grad_norm=1e9,
        ),
        train_dataset=data,
        optimizers=(torch.optim.SGD(student.parameters(), lr=1.0), None),
        temperature=2.0,
        alpha=0.5,
    )
    assert trainer.args.remove_unused_columns
    trainer.train()

    reference_student = make_gpt2(0)
    before = _flat_parameters(reference_student)
    total, soft, hard = lm_reference.reference_parts(
        reference_student, teacher, data, temperature=2.0, alpha=0.5
    )
    total.backward()
    gradient = torch.cat([p.grad.flatten() for p in reference_student.parameters()])
    torch.testing.assert_close(_flat_parameters(student) - before, -gradient, rtol=1e-4, atol=1e-6)
    # The step's log holds the loss parts of the whole step, as dk.Distiller logs them.
    (log,) = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert log["loss"] == pytest.approx(total.item(), rel=1e-5)
    assert log["soft"] == pytest.approx(soft.item(), rel=1e-4)
    assert log["hard"] == pytest.approx(hard.item(), rel=1e-5)
    assert (log["temperature"], log["alpha"]) == (2.0, 0.5)


@pytest.mark.parametrize("batch_size", [4, 2])
def test_distillation_trainer_eval_loss_and_cross_entropy_match_the_reference(
    tmp_path, make_gpt2, batch_size
):
    """eval_loss of one left-padded batch is the reference objective over its predicted tokens;
    eval_ce / eval_perplexity / eval_soft are per-token means over the whole evaluation set,
    however it is split into batches."""
    data = lm_reference.left_padded(4, seed=5)
    student, teacher = make_gpt2(0), make_gpt2(1, n_embd=24)
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=_args(tmp_path, per_device_eval_batch_size=batch_size),
        eval_dataset=data,
        temperature=2.0,
        alpha=0.5,
    )
    metrics = trainer.evaluate()
    with torch.no_grad():
        total, soft, hard = lm_reference.reference_parts(
            student, teacher, data, temperature=2.0, alpha=0.5
        )
    if batch_size == 4:
        assert metrics["eval_loss"] == pytest.approx(float(total), rel=1e-5)
    assert metrics["eval_ce"] == pytest.approx(float(hard), rel=1e-5)
    assert metrics["eval_perplexity"] == pytest.approx(math.exp(float(hard)), rel=1e-5)
    assert metrics["eval_soft"] == pytest.approx(float(soft), rel=1e-4)


def test_distillation_trainer_mixed_precision_reaches_the_fused_loss(tmp_path, make_gpt2):
    """With bf16 the loss is computed under the Trainer's autocast: it equals the task's loss
    under torch.autocast, not the float32 one."""
    data = lm_reference.left_padded(4, seed=1)
    student, teacher = make_gpt2(0), make_gpt2(1, n_embd=24)
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=_args(tmp_path, bf16=True),
        temperature=2.0,
        alpha=0.5,
    )
    assert trainer.accelerator.mixed_precision == "bf16"
    batch = {key: lm_reference.stacked(data, key) for key in data[0]}
    loss = trainer.compute_loss(student, batch)

    def task_loss() -> float:
        outputs = trainer.task.teacher_outputs(teacher, batch)
        output = trainer.task.compute_loss(student, batch, outputs, loss_fn=trainer.loss_fn)
        return output.loss.total.item()

    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = task_loss()
    in_float32 = task_loss()
    assert abs(under_autocast - in_float32) > 1e-5  # bf16 products give another value
    assert loss.item() == under_autocast  # the same operations in the same dtypes


def test_distillation_trainer_rejects_missing_teacher(tmp_path, make_gpt2):
    with pytest.raises(TypeError, match="teacher_model"):
        DistillationTrainer(
            model=make_gpt2(0), args=_args(tmp_path, max_steps=1), train_dataset=_examples(2)
        )
