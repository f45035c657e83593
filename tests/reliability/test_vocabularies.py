"""Teacher and student vocabularies: an output layer padded for speed is cut automatically and
the loss is the float64 reference's on the shared tokens; a real tokenizer mismatch is
refused (the refusals themselves are rows of the bad-input table)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml
from cases_models import Tokenizer, batch, gpt2
from catalogue import dk

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for reference.py
import reference
from darkknowledge.llm import CausalLMTask, shared_vocab_size
from darkknowledge.llm.vocab import is_padding
from darkknowledge.losses import DistillationLoss


@pytest.mark.parametrize(
    ("smaller", "larger", "padding"),
    [
        (50257, 50304, True),  # GPT-2 in nanoGPT: a multiple of 64
        (151936, 152064, True),  # Qwen2 0.5B and 72B: a multiple of 256
        (32000, 32768, True),  # a multiple of 1024, 2.4% more
        (250, 256, True),
        (50257, 50258, False),  # one extra token: a different tokenizer
        (32000, 32064, False),  # 32000 is already a multiple of 64
        (256, 512, False),  # twice the rows is not padding
        (32000, 128256, False),  # Llama 2 and Llama 3
    ],
)
def test_vocab_is_padding_rule(smaller, larger, padding):
    assert is_padding(smaller, larger) is padding
    if padding:
        assert shared_vocab_size(larger, smaller) == smaller
        assert shared_vocab_size(smaller, larger) == smaller
    else:
        with pytest.raises(ValueError, match="not one vocabulary"):
            shared_vocab_size(smaller, larger)


def test_vocab_tokenizers_cut_to_their_shared_ids():
    base = [f"<{i}>" for i in range(240)]
    student, teacher = Tokenizer([*base, "<a>", "<b>"]), Tokenizer(base)
    # Rows 250 and 256 are not a padding of one another (256 is), but the tokenizers agree.
    assert shared_vocab_size(250, 300, student_tokenizer=student, teacher_tokenizer=teacher) == 240
    assert shared_vocab_size(240, 240, student_tokenizer=teacher, teacher_tokenizer=teacher) is None
    assert shared_vocab_size(250, 300, vocab_size=240) == 240


@pytest.mark.parametrize(("student_vocab", "teacher_vocab"), [(250, 256), (256, 250)])
def test_causal_lm_task_padded_vocab_matches_reference(student_vocab, teacher_vocab):
    torch.manual_seed(0)
    student, teacher = gpt2(student_vocab), gpt2(teacher_vocab, seed=1)
    task, loss_fn = CausalLMTask(chunk_size=5), DistillationLoss(temperature=2.0, alpha=0.5)
    with torch.no_grad():
        teacher_outputs = task.teacher_outputs(teacher, batch())
    loss = task.compute_loss(student, batch(), teacher_outputs, loss_fn=loss_fn).loss
    loss.total.backward()
    grad = student.transformer.wte.weight.grad.clone()
    student.zero_grad()
    # The reference: full logits of both, cut to the 250 shared ids, shifted by hand.
    ids = batch()["input_ids"]
    student_logits = student(ids).logits[:, :-1, :250].double()
    with torch.no_grad():
        teacher_logits = teacher(ids).logits[:, :-1, :250].double()
    expected = reference.kd_loss(
        student_logits, teacher_logits, ids[:, 1:], temperature=2.0, alpha=0.5
    )
    for actual, wanted in zip(loss, expected):
        torch.testing.assert_close(actual.double(), wanted, rtol=1e-5, atol=1e-6)
    expected[0].backward()
    torch.testing.assert_close(grad, student.transformer.wte.weight.grad, rtol=1e-4, atol=1e-6)


def test_distillation_trainer_padded_vocab_trains(tmp_path):
    import transformers

    from darkknowledge.hf import DistillationTrainer

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=2, save_strategy="no",
        disable_tqdm=True, per_device_train_batch_size=2, logging_steps=1,
    )  # fmt: skip
    examples = [{"input_ids": row} for row in batch()["input_ids"]]
    trainer = DistillationTrainer(
        model=gpt2(250), teacher_model=gpt2(256, seed=1), args=args, train_dataset=examples
    )
    assert trainer.task.vocab_size == 250
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))


def test_dk_distill_padded_teacher_vocab(tmp_path, monkeypatch):
    """A causal-LM config whose teacher has 264 rows and student 260 (260 tokens): validated,
    and distilled, the 4 padding rows cut."""
    monkeypatch.chdir(tmp_path)
    gpt2_args = {"model_type": "gpt2", "n_layer": 1, "n_embd": 8, "n_head": 2, "n_positions": 16}
    config = {
        "task": "causal_lm",
        "data": {"name": "stdlib_bytes", "train_bytes": 2048, "heldout_bytes": 512,
                 "block_size": 16, "batch_size": 4, "vocab_size": 260},
        "teacher": {"name": "hf_causal_lm", "args": {**gpt2_args, "vocab_size": 264}},
        "student": {"name": "hf_causal_lm", "args": {**gpt2_args, "vocab_size": 260}},
        "train": {"max_steps": 2, "progress": False, "log_every": 1},
    }  # fmt: skip
    Path("config.yaml").write_text(yaml.safe_dump(config))
    assert dk("validate", "config.yaml").code == 0
    outcome = dk("distill", "config.yaml")
    assert outcome.code == 0, outcome.stderr
    config["teacher"]["args"]["vocab_size"] = 300  # not a padding of 260
    Path("config.yaml").write_text(yaml.safe_dump(config))
    refused = dk("distill", "config.yaml")
    assert refused.code == 2 and "student.args.vocab_size: 260" in refused.stderr
