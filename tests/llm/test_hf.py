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


def test_distillation_trainer_accumulation_equals_one_batch(tmp_path, make_gpt2):
    """2 micro-batches of 2 with different token counts == 1 batch of 4 (one SGD step)."""
    data = _examples(4, seed=3)
    params = []
    for batch_size, accumulation in ((4, 1), (2, 2)):
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
        trainer.train()
        params.append(torch.cat([p.detach().flatten() for p in student.parameters()]))
    initial = torch.cat([p.detach().flatten() for p in make_gpt2(0).parameters()])
    assert not torch.allclose(params[0], initial)
    torch.testing.assert_close(params[1], params[0], rtol=1e-5, atol=1e-6)


def test_distillation_trainer_rejects_missing_teacher(tmp_path, make_gpt2):
    with pytest.raises(TypeError, match="teacher_model"):
        DistillationTrainer(
            model=make_gpt2(0), args=_args(tmp_path, max_steps=1), train_dataset=_examples(2)
        )
