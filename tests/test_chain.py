"""Teacher-assistant chains: each stage's trained student teaches the next stage."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from torch.utils.data import DataLoader

from cli_helpers import tiny_data, tiny_model
from darkknowledge import Distiller
from darkknowledge.chain import distill_chain
from darkknowledge.cli import main


def test_chain_stage_teacher_is_previous_trained_student():
    torch.manual_seed(0)
    train, _ = tiny_data(48)
    teacher, assistant, student = tiny_model(16), tiny_model(8), tiny_model(4)
    initial = {name: p.detach().clone() for name, p in assistant.named_parameters()}
    taught_by = []

    def fit(index, model, current_teacher):
        distiller = Distiller(
            model, current_teacher, DataLoader(train, batch_size=12), max_steps=4, progress=False
        )
        taught_by.append(
            (distiller.teacher, {k: v.clone() for k, v in current_teacher.state_dict().items()})
        )
        return distiller.fit()

    stages = distill_chain(teacher, [assistant, student], fit)
    assert [s.index for s in stages] == [0, 1]
    assert (
        stages[0].teacher is teacher
        and stages[1].teacher is assistant
        and stages[1].student is student
    )
    # The Distiller of stage 1 was handed the trained assistant, frozen, not a fresh copy.
    assert taught_by[1][0] is assistant
    assert all(not p.requires_grad for p in assistant.parameters()) and not assistant.training
    assert any(not torch.equal(p, initial[name]) for name, p in assistant.named_parameters())
    assert all(torch.equal(v, assistant.state_dict()[k]) for k, v in taught_by[1][1].items())
    assert stages[1].result.final["step"] == 4


def test_chain_rejects_bad_students():
    with pytest.raises(ValueError, match="at least one model"):
        distill_chain(tiny_model(), [], lambda *a: None)
    model = tiny_model()
    with pytest.raises(ValueError, match="its own teacher"):
        distill_chain(model, [model], lambda *a: None)


def test_chain_from_config(tmp_path: Path, capsys):
    config = {
        "teacher": {
            "name": "cli_helpers:tiny_model",
            "args": {"width": 16},
            "train_steps": 10,
            "dtype": "float32",
        },
        "stages": [
            {"name": "cli_helpers:tiny_model", "args": {"width": 8}},
            {"name": "cli_helpers:tiny_model", "args": {"width": 4}},
        ],
        "data": {"name": "cli_helpers:tiny_data", "batch_size": 12},
        "train": {
            "max_steps": 4,
            "log_every": 2,
            "progress": False,
            "output_dir": str(tmp_path / "run"),
        },
    }
    path = tmp_path / "chain.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["distill", str(path)]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert [r["stage"] for r in results] == ["teacher", "stage0", "stage1"]
    assert results[0]["step"] == 10 and 0 <= results[0]["eval_accuracy"] <= 1
    assert all(
        (tmp_path / "run" / name / "model.safetensors").exists()
        for name in ("teacher", "stage0", "stage1")
    )
    out = capsys.readouterr().out
    assert out.index("stage0 (") < out.index("stage1 (")


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_chain_resume_loads_finished_stages_and_continues_the_rest(tmp_path: Path, capsys):
    config = {
        "teacher": {"name": "cli_helpers:tiny_model", "args": {"width": 16}, "train_steps": 6},
        "stages": [
            {"name": "cli_helpers:tiny_model", "args": {"width": 8}, "dropout": 0.0},
            {"name": "cli_helpers:tiny_model", "args": {"width": 4}},
        ],
        "data": {"name": "cli_helpers:tiny_data", "batch_size": 12},
        "train": {"max_steps": 6, "save_every": 2, "log_every": 1, "progress": False},
    }
    path = tmp_path / "chain.yaml"
    path.write_text(yaml.safe_dump(config))
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main(["distill", str(path), f"train.output_dir={whole}"]) == 0
    assert main(["distill", str(path), f"train.output_dir={cut}"]) == 0
    # As if killed during stage1 after its step-4 checkpoint: its later outputs are gone.
    stage1 = cut / "stage1"
    for name in ("summary.json", "model.safetensors"):
        (stage1 / name).unlink()
    shutil.rmtree(stage1 / "checkpoints" / "step-00000006")
    finished = {name: (cut / name / "metrics.jsonl").read_text() for name in ("teacher", "stage0")}
    capsys.readouterr()
    assert main(["distill", str(path), f"train.output_dir={cut}", "--resume"]) == 0
    out = capsys.readouterr().out
    assert "teacher (cli_helpers:tiny_model): finished before, loaded from" in out
    assert "stage0 (cli_helpers:tiny_model): finished before" in out
    assert "stage1 (cli_helpers:tiny_model): distilling" in out
    for name, log in finished.items():  # not retrained: their logs are untouched
        assert (cut / name / "metrics.jsonl").read_text() == log
    records = [json.loads(line) for line in (stage1 / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    for name in ("teacher", "stage0", "stage1"):
        expected, got = _weights(whole / name), _weights(cut / name)
        assert all(torch.equal(got[k], v) for k, v in expected.items()), name
    results = json.loads((cut / "results.json").read_text())
    reference = json.loads((whole / "results.json").read_text())
    assert [r["stage"] for r in results] == ["teacher", "stage0", "stage1"]
    for ours, theirs in zip(results, reference):
        assert (ours["total"], ours["eval_accuracy"]) == (theirs["total"], theirs["eval_accuracy"])
