"""The classifier demo (quick setting), its transfer-set loss and the omitted-class correction."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from darkknowledge.cli import main
from darkknowledge.demo.transfer import TransferSetTask, bias_for_share
from darkknowledge.losses import DistillationLoss

PNG = b"\x89PNG\r\n\x1a\n"


def test_demo_quick_writes_table_plots_and_report(tmp_path: Path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "classifier", "--quick", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    for text in (
        "| method |",
        "gap closed",
        "student, labels only",
        "KD (fixed T)",
        "KD + learnable T",
        "teacher MLP",
    ):
        assert text in printed
    for name in ("learning_curves.png", "gradient_balance.png", "temperature.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 5_000
    results = json.loads((out / "results.json").read_text())
    assert set(results["methods"]) == {"labels", "kd", "kd_learnable_t"}
    kd = results["runs"]["kd"][0]
    assert kd["transfer"] == 1347 and 0 < kd["labelled"] < 100  # few labels, soft targets on all
    assert results["runs"]["labels"][0]["transfer"] == kd["labelled"]
    temperatures = results["runs"]["kd_learnable_t"][0]["temperature"]["temperature"]
    assert temperatures[-1] != temperatures[0]  # the learnable temperature moved
    assert set(results["runs"]["kd"][0]["temperature"]["temperature"]) == {4.0}
    assert "![gradient balance](gradient_balance.png)" in (out / "report.md").read_text()


def test_demo_omit_class_reports_both_accuracies(tmp_path: Path, capsys):
    out = tmp_path / "omit"
    assert main(["demo", "--quick", "--omit-class", "3", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert (
        "accuracy on class 3" in printed
        and "before bias correction" in printed
        and "after bias correction" in printed
    )
    results = json.loads((out / "results.json").read_text())
    for part in ("before", "after"):
        assert 0 <= results[part]["class"] <= 1 and 0 <= results[part]["overall"] <= 1
    assert results["runs"][0]["bias_delta"] >= 0 and results["omit_class"] == 3
    assert main(["demo", "--quick", "--omit-class", "12"]) == 2


def test_demo_transfer_task_matches_float64_reference():
    torch.manual_seed(0)
    student = torch.nn.Linear(5, 4).double()
    inputs, labels = (
        torch.randn(6, 5, dtype=torch.float64),
        torch.tensor([1, -100, 3, -100, -100, 0]),
    )
    teacher_logits = torch.randn(6, 4, dtype=torch.float64)
    loss_fn = DistillationLoss(temperature=2.0, alpha=0.7)
    out = TransferSetTask().compute_loss(
        student,
        (inputs, labels),
        teacher_logits,
        loss_fn=loss_fn,
        step=0,
        normalizer=6.0,
        grad_meter=True,
    )
    z = student(inputs)
    p, log_q = torch.softmax(teacher_logits / 2, -1), torch.log_softmax(z / 2, -1)
    kl = (p * (p.log() - log_q)).sum(-1)  # every row, labelled or not
    known = labels >= 0
    ce = -torch.log_softmax(z, -1)[known].gather(1, labels[known, None]).squeeze(1)
    reference = (0.7 * 4 * kl.sum() + 0.3 * ce.sum()) / 6
    torch.testing.assert_close(out.loss.total, reference)
    (grad,) = torch.autograd.grad(out.loss.total, student.weight)
    (reference_grad,) = torch.autograd.grad(reference, student.weight)
    torch.testing.assert_close(grad, reference_grad)
    assert (
        float(out.soft_grad_norm) > 0 and float(out.hard_grad_norm) > 0 and out.temperature == 2.0
    )


def test_demo_bias_for_share_is_the_smallest_sufficient_raise():
    torch.manual_seed(0)
    logits = torch.randn(200, 10) * 3
    logits[:, 3] -= 4  # a class the model under-predicts
    for share in (0.05, 0.1, 0.5):
        delta = bias_for_share(logits, 3, share)
        shifted = logits.clone()
        shifted[:, 3] += delta
        assert (shifted.argmax(1) == 3).float().mean() >= share
        shifted[:, 3] -= 2e-3 * max(1.0, delta)
        assert (shifted.argmax(1) == 3).float().mean() < share


def test_demo_plots_read_results_from_before_the_gradient_balance_rename(tmp_path: Path):
    from darkknowledge.demo.plots import gradient_balance

    series = {
        "step": [1, 2, 3],
        "soft_grad_norm": [3.0, 2.0, 1.0],
        "hard_grad_norm": [0.1, 0.2, 0.3],
    }
    old = {"kd": [{"signal": series}]}  # results.json written before the rename
    new = {"kd": [{"gradient_balance": series}]}
    labels = {"kd": "KD"}
    for runs, name in ((old, "old.png"), (new, "new.png")):
        path = gradient_balance(runs, labels, str(tmp_path / name))
        assert Path(path).read_bytes().startswith(PNG)
