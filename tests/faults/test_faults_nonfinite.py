"""A NaN or Inf in a step's loss or gradients: the run stops naming the step and the term,
with no checkpoint after it (``on_nonfinite="stop"``), or skips the step with no update and
counts it (``"skip"``)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

import darkknowledge as dk
from darkknowledge.train import checkpoint as ckpt
from darkknowledge.train.failures import NonFiniteLoss

DIM, CLASSES = 6, 3


class Poisoned(torch.nn.Module):
    """``model``, whose output on its calls number ``bad_calls`` (1-based) is changed by
    ``poison`` (a fault injected into one step's teacher or student)."""

    def __init__(self, model: torch.nn.Module, bad_calls: set[int], poison) -> None:
        super().__init__()
        self.model, self.bad_calls, self.poison, self.calls = model, bad_calls, poison, 0

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        out = self.model(inputs)
        return self.poison(out) if self.calls in self.bad_calls else out


def _nan(logits: torch.Tensor) -> torch.Tensor:
    return logits * float("nan")


class HardTermBreaks(dk.ClassificationTask):
    """The hard term of step ``bad_step`` (1-based) is +inf, the soft term is left as it is:
    e.g. a cross-entropy computed in a precision it overflows."""

    def __init__(self, bad_step: int) -> None:
        super().__init__()
        self.bad_step = bad_step

    def compute_loss(self, student, batch, teacher_outputs, **options) -> dk.train.TaskOutput:
        out = super().compute_loss(student, batch, teacher_outputs, **options)
        if options["step"] + 1 != self.bad_step:
            return out
        hard = out.loss.hard * float("inf")
        return out._replace(loss=out.loss._replace(total=out.loss.total + hard, hard=hard))


def _batches(steps: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(8, DIM, generator=generator), torch.zeros(8, dtype=torch.long))
        for _ in range(steps)
    ]


def _models(seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(seed)
    return torch.nn.Linear(DIM, CLASSES), torch.nn.Linear(DIM, CLASSES)


def _distiller(student, teacher, data, **options) -> dk.Distiller:
    defaults = dict(max_steps=len(data), temperature=2.0, alpha=0.5, progress=False)
    return dk.Distiller(student, teacher, data, **{**defaults, **options})


def test_nonfinite_stop_names_the_soft_term_and_keeps_the_last_good_checkpoint(tmp_path):
    student, teacher = _models()
    data = _batches(12)
    run = _distiller(
        student, Poisoned(teacher, {5}, _nan), data, save_every=2, log_every=5,
        output_dir=tmp_path,
    )  # fmt: skip
    with pytest.raises(NonFiniteLoss) as caught:
        run.fit()
    last_good = ckpt.checkpoint_dir(tmp_path, 4)
    assert str(caught.value) == (
        "non-finite soft loss (NaN or Inf) at step 5; the run stopped and saved nothing after "
        f"it: the last good checkpoint is {last_good}; on_nonfinite='skip' "
        "(train.on_nonfinite: skip) skips such steps instead"
    )
    assert ckpt.complete_checkpoints(tmp_path) == [last_good, ckpt.checkpoint_dir(tmp_path, 2)]
    ckpt.verify(last_good)
    saved = ckpt.read_safetensors(last_good / "student.safetensors")
    assert all(bool(t.isfinite().all()) for t in saved.values())
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [5] and math.isnan(logged[0]["soft"])

    # The cause removed, the run resumes from the last good checkpoint and finishes.
    resumed = _distiller(*_models(1), data, save_every=2, log_every=5, output_dir=tmp_path)
    resumed.teacher.load_state_dict(teacher.state_dict())
    assert resumed.fit(resume=True).final["step"] == 12


def test_nonfinite_stop_names_the_hard_term(tmp_path):
    student, teacher = _models()
    run = _distiller(student, teacher, _batches(6), task=HardTermBreaks(3))
    with pytest.raises(NonFiniteLoss, match=r"^non-finite hard loss \(NaN or Inf\) at step 3; "):
        run.fit()


def test_nonfinite_stop_names_a_gradient_under_a_finite_loss():
    """With clipping, the gradient norm of every step is known: a NaN gradient whose loss is
    finite (a backward hook poisons step 4) is named as such."""
    student, teacher = _models()
    calls = {"n": 0}

    def poison(grad: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        return grad * float("nan") if calls["n"] == 4 else grad

    student.weight.register_hook(poison)
    run = _distiller(student, teacher, _batches(6), max_grad_norm=1.0, log_every=3)
    with pytest.raises(
        NonFiniteLoss, match=r"non-finite gradient \(its loss was finite\) .* step 4;"
    ):
        run.fit()


def test_nonfinite_stop_without_output_dir_says_nothing_was_saved():
    student, teacher = _models()
    run = _distiller(student, Poisoned(teacher, {2}, _nan), _batches(4))
    with pytest.raises(NonFiniteLoss, match=r"at step 2; .*: no checkpoint was saved before it;"):
        run.fit()


def _reference_without(steps_skipped: set[int], data, student, teacher) -> torch.nn.Module:
    """The same training in plain PyTorch, the skipped steps' batches consumed unused."""
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    for number, (inputs, labels) in enumerate(data, start=1):
        if number in steps_skipped:
            continue
        with torch.no_grad():
            teacher_logits = teacher(inputs)
        loss = dk.kd_loss(student(inputs), teacher_logits, labels, temperature=2.0, alpha=0.5)
        loss.total.backward()
        optimizer.step()
        optimizer.zero_grad()
    return student


def test_nonfinite_skip_makes_no_update_and_counts_the_steps(tmp_path):
    student, teacher = _models()
    reference_student, _ = _models()
    data = _batches(8)
    run = _distiller(
        student, Poisoned(teacher, {3, 4}, _nan), data, on_nonfinite="skip", log_every=1,
        optimizer=lambda groups: torch.optim.SGD(groups, lr=0.1), save_every=4,
        output_dir=tmp_path,
    )  # fmt: skip
    result = run.fit()
    train = [r for r in result.history if r["kind"] == "train"]
    assert [r["nonfinite_steps"] for r in train] == [0, 0, 1, 2, 2, 2, 2, 2]
    assert math.isnan(train[2]["soft"]) and math.isfinite(train[4]["soft"])
    expected = _reference_without({3, 4}, data, reference_student, teacher)
    for name, value in expected.state_dict().items():
        torch.testing.assert_close(student.state_dict()[name], value, rtol=1e-6, atol=1e-7)

    # The count is part of the checkpoint: a resumed run goes on counting from it.
    state = json.loads((ckpt.checkpoint_dir(tmp_path, 4) / "state.json").read_text())
    assert state["nonfinite_steps"] == 2
    again = _distiller(
        *_models(), data, on_nonfinite="skip", log_every=1, output_dir=tmp_path,
        optimizer=lambda groups: torch.optim.SGD(groups, lr=0.1), max_steps=9,
    )  # fmt: skip
    again.teacher.load_state_dict(teacher.state_dict())
    resumed = again.fit(resume=True).history
    assert [r["nonfinite_steps"] for r in resumed if r["kind"] == "train"] == [2]


def test_nonfinite_policy_is_checked():
    student, teacher = _models()
    with pytest.raises(
        ValueError, match=r"on_nonfinite must be one of \('stop', 'skip'\), got 'ignore'"
    ):
        _distiller(student, teacher, _batches(2), on_nonfinite="ignore")


def test_nonfinite_stop_names_the_first_of_several_bad_steps():
    """Steps are looked at in bulk (every 64 steps, at log steps and before checkpoints): the
    first non-finite step is named even when a later one follows, across a fold."""
    student, teacher = _models()
    run = _distiller(student, Poisoned(teacher, {30, 70}, _nan), _batches(100), log_every=100)
    with pytest.raises(NonFiniteLoss, match=r"soft loss and hard loss|at step 30;") as caught:
        run.fit()
    assert "at step 30;" in str(caught.value)
    student, teacher = _models()
    run = _distiller(student, Poisoned(teacher, {70}, _nan), _batches(100), log_every=100)
    with pytest.raises(NonFiniteLoss, match=r"^non-finite soft loss \(NaN or Inf\) at step 70;"):
        run.fit()


NAN_DATA = """
import torch
from torch.utils.data import TensorDataset


def make():
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(256, 8, generator=generator)
    inputs[37] = float("nan")  # one bad example: it lands on one of the two processes
    labels = torch.randint(4, (256,), generator=generator)
    return TensorDataset(inputs, labels), TensorDataset(inputs[:64].nan_to_num(), labels[:64])
"""


@pytest.mark.faults
def test_nonfinite_two_processes_stop_together_at_the_same_step(tmp_path):
    """Two ``dk distill`` processes (gloo), a NaN example in one process's batch: both stop at
    once with the same line (the earliest bad step over the processes), neither waits for the
    other, and the checkpoints before it are intact."""
    import subprocess

    import yaml
    from faultkit import DK, launch_two

    (tmp_path / "nan_data.py").write_text(NAN_DATA)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"name": "nan_data:make", "batch_size": 16, "eval_batch_size": 64},
        "teacher": {"hidden": [8], "train_steps": 0}, "student": {"hidden": [8]},
        "train": {"max_steps": 40, "save_every": 2, "log_every": 5, "progress": False},
    }))  # fmt: skip
    run = tmp_path / "run"
    processes = launch_two([*DK, "distill", str(config), f"train.output_dir={run}"], {})
    lines = []
    for process in processes:
        try:
            _, stderr = process.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for other in processes:
                other.kill()
            pytest.fail("a process still runs: the two did not stop together")
        assert process.returncode == 1, stderr[-3000:]
        lines.append(stderr.strip().splitlines()[-1])
    assert lines[0] == lines[1], lines
    found = re.match(r"^dk distill: error: non-finite (.+) \(NaN or Inf\) at step (\d+); .* "
                     r"the last good checkpoint is (\S+); ", lines[0])  # fmt: skip
    assert found and found[1] == "soft loss and hard loss", lines[0]
    step = int(found[2])
    assert Path(found[3]) == ckpt.latest_checkpoint(run / "student")
    assert all(int(p.name.split("-")[1]) < step for p in ckpt.complete_checkpoints(run / "student"))
    ckpt.verify(Path(found[3]))
