"""MTPTask in the Distiller: the logged step loss and per-depth parts against the float64
per-depth reference with the step's global normalizer (two micro-batches of different valid
counts), labels-only training, heads-only training on a frozen model, and bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from mtp_models import padded_batch, reference_mtp_loss, tiny_lm

import darkknowledge as dk
from darkknowledge.mtp import MTPStudent, MTPTask

VOCAB = 32
WEIGHTS = [0.6, 0.3]


def micro_batches():
    """Two micro-batches: padded rows (right and left) and a full one of another length."""
    input_ids, attention_mask, _ = padded_batch(VOCAB, seed=1)
    full = torch.randint(VOCAB, (2, 7), generator=torch.Generator().manual_seed(2))
    return [
        {"input_ids": input_ids, "attention_mask": attention_mask},
        {"input_ids": full, "attention_mask": torch.ones_like(full)},
    ]


def make_student(kind: str) -> MTPStudent:
    student = MTPStudent.from_model(tiny_lm(0, n_embd=16, vocab_size=VOCAB), kind, 2)
    with torch.no_grad():  # heads off their identity start, so every depth differs
        for parameter in student.heads.parameters():
            parameter.add_(0.2 * torch.randn_like(parameter))
    return student


def reference_step(student, teacher, batches, *, alpha, temperature, divergence):
    """Σ over micro-batches of the reference loss, every depth divided by the step's count of
    next-token targets; returns (total, {depth: summed total})."""
    count = sum(
        int((b["attention_mask"][:, :-1] & b["attention_mask"][:, 1:]).sum()) for b in batches
    )
    total, per_depth = 0.0, {0: 0.0, 1: 0.0, 2: 0.0}
    for batch in batches:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        with torch.no_grad():
            out = student(ids, mask)
            teacher_hidden = None
            if teacher is not None:
                teacher_hidden = dk.llm.last_hidden_states(teacher, ids, mask)
        part_total, parts = reference_mtp_loss(
            [out.hidden, *out.depth_hidden], student.output_layer().weight, ids, mask, ids,
            [0, 1, 2], [1.0, *WEIGHTS], teacher_hidden=teacher_hidden,
            teacher_weight=None if teacher is None else dk.llm.output_layer(teacher).weight,
            temperature=temperature, alpha=alpha, divergence=divergence, normalizer=count,
        )  # fmt: skip
        total += float(part_total.detach())
        for depth, part in parts.items():
            per_depth[depth] += float(part[0].detach())
    return total, per_depth


@pytest.mark.parametrize(
    ("kind", "divergence"), [("parallel", "forward_kl"), ("sequential", "tvd")]
)
def test_mtp_task_step_loss_matches_reference(kind, divergence):
    student = make_student(kind).eval()  # no dropout in tiny_lm; eval for the reference
    teacher = tiny_lm(5, n_embd=24, n_layer=2, vocab_size=VOCAB).eval()
    batches = micro_batches()
    expected, expected_depths = reference_step(
        copy.deepcopy(student), teacher, batches, alpha=0.7, temperature=2.0, divergence=divergence
    )
    distiller = dk.Distiller(
        student, teacher, batches, task=MTPTask(depth_weights=WEIGHTS, chunk_size=5),
        temperature=2.0, alpha=0.7, loss_options={"divergence": divergence},
        grad_accum_steps=2, max_steps=1, log_every=1, progress=False,
    )  # fmt: skip
    record = distiller.fit().history[0]
    assert record["total"] == pytest.approx(expected, rel=1e-5)
    for depth, value in expected_depths.items():
        assert record[f"depth{depth}/total"] == pytest.approx(value, rel=1e-5)
    assert record["temperature"] == 2.0


def test_mtp_task_without_teacher_trains_every_depth_on_labels():
    student = make_student("parallel")
    batches = micro_batches()
    expected, _ = reference_step(
        copy.deepcopy(student).eval(), None, batches, alpha=0.0, temperature=1.0,
        divergence="forward_kl",
    )  # fmt: skip
    distiller = dk.Distiller(
        student, None, batches, task=MTPTask(depth_weights=WEIGHTS), grad_accum_steps=2,
        max_steps=1, log_every=1, progress=False,
    )  # fmt: skip
    record = distiller.fit().history[0]
    assert record["total"] == pytest.approx(expected, rel=1e-5)
    assert record["soft"] == 0.0 and record["depth2/soft"] == 0.0 and record["depth2/hard"] > 0


def test_mtp_task_frozen_model_trains_heads_alone_without_dropout():
    model = tiny_lm(0, n_embd=16, vocab_size=VOCAB)
    model.config.resid_pdrop = 0.5
    model = type(model)(model.config)  # the same sizes, with dropout
    student = MTPStudent.from_model(model, "sequential", 2, freeze_model=True)
    before = copy.deepcopy(student.state_dict())
    ids = torch.randint(VOCAB, (2, 10))
    student.train()
    assert not student.model.training and student.heads.training
    assert torch.equal(student(ids).hidden, student(ids).hidden)  # no dropout in the trunk
    dk.Distiller(
        student, None, [{"input_ids": ids}], task=MTPTask(main_weight=0.0), max_steps=2,
        learning_rate=1e-2, progress=False,
    ).fit()  # fmt: skip
    after = student.state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(name.startswith("heads.") for name in changed)


def test_mtp_task_refuses_depth_weights_of_another_length():
    student = make_student("parallel")
    distiller = dk.Distiller(
        student, None, micro_batches(), task=MTPTask(depth_weights=[1.0, 1.0, 1.0]),
        max_steps=1, progress=False,
    )  # fmt: skip
    with pytest.raises(ValueError, match="depth_weights has 3 weights but the student has 2"):
        distiller.fit()
    with pytest.raises(ValueError, match="depth_weights"):
        MTPTask(depth_weights=[1.0, -1.0])
    with pytest.raises(ValueError, match="main_weight"):
        MTPTask(main_weight=float("nan"))
