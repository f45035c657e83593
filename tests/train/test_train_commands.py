"""dk distill / dk train and their output folder: refusals, --overwrite, --resume checks,
the transfer-set option for user data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from darkknowledge.cli import main

# Tiny models on a shared 2-core machine: intra-op threads only spin and wait.
pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = {
    "teacher": {"hidden": [16], "train_steps": 4},
    "student": {"hidden": [8]},
    "data": {"name": "trainkit:partly_labelled", "batch_size": 16},
    "distill": {"temperature": 2.0, "alpha": 0.5},
    "train": {"max_steps": 4, "log_every": 1, "progress": False},
}


def _config(tmp_path: Path, **train) -> str:
    raw = {**CONFIG, "train": {**CONFIG["train"], "output_dir": str(tmp_path / "run"), **train}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def _error(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"dk {command}: error: "), err
    return err


def test_run_refuses_a_used_output_folder_and_overwrite_replaces_it(tmp_path, capsys):
    path = _config(tmp_path)
    assert main(["distill", path]) == 0
    out = capsys.readouterr().out
    run = tmp_path / "run"
    assert f"results:     {run / 'results.json'}" in out and "weights:" in out
    first = (run / "student" / "model.safetensors").read_bytes()
    assert main(["distill", path]) == 2
    err = _error(capsys, "distill")
    assert f"train.output_dir {run} is not empty" in err
    assert "--resume" in err and "--overwrite" in err and "train.output_dir=" in err
    assert main(["train", path]) == 2  # another command's run: not silently mixed in
    assert "is not empty" in _error(capsys, "train")
    (run / "notes.txt").write_text("mine")
    assert main(["train", path, "--overwrite"]) == 0
    assert sorted(p.name for p in run.iterdir()) == [
        "baseline",
        "notes.txt",
        "results.json",
        "run.json",
    ]
    assert [r["stage"] for r in json.loads((run / "results.json").read_text())] == ["baseline"]
    assert main(["distill", path, "--overwrite"]) == 0
    assert (run / "student" / "model.safetensors").read_bytes() == first  # same run again
    assert main(["distill", path, "--resume", "--overwrite"]) == 2
    assert "give one" in _error(capsys, "distill")


def test_run_resume_refuses_another_config_or_command(tmp_path, capsys):
    path = _config(tmp_path)
    assert main(["distill", path]) == 0
    capsys.readouterr()
    assert main(["distill", path, "distill.alpha=0.9", "train.seed=3", "--resume"]) == 2
    err = _error(capsys, "distill")
    assert (
        "cannot resume the run in" in err
        and "distill.alpha (0.5 -> 0.9), train.seed (0 -> 3)" in err
    )
    assert main(["train", path, "--resume"]) == 2
    assert "holds a `dk distill` run" in _error(capsys, "train")
    # train.max_steps may grow: the student continues from its last checkpoint.
    assert main(["distill", path, "train.max_steps=6", "--resume"]) == 0
    out = capsys.readouterr().out
    assert "teacher (mlp [16]): finished before" in out and "student (mlp [8]): distilling" in out
    latest = tmp_path / "run" / "student" / "checkpoints" / "step-00000004"
    assert f"distilling for 6 steps, continuing from {latest}" in out  # where the run picks up
    student = [
        json.loads(x)
        for x in (tmp_path / "run" / "student" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in student if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert main(["distill", path, "train.max_steps=5", "--resume"]) == 2
    assert "train.max_steps (6 -> 5: it may only grow)" in _error(capsys, "distill")


def test_run_unlabelled_distill_option_reaches_the_task(tmp_path):
    """distill.unlabelled=distill: unlabelled examples (-100) get soft targets and count in the
    mean, so the first step's hard term is CE over the labelled / all the batch (not / labelled)."""

    def first_record(unlabelled: str) -> dict:
        run = tmp_path / unlabelled
        args = [
            "distill",
            _config(tmp_path),
            f"distill.unlabelled={unlabelled}",
            f"train.output_dir={run}",
        ]
        assert main(args) == 0
        return json.loads((run / "student" / "metrics.jsonl").read_text().splitlines()[0])

    skip, distill = first_record("skip"), first_record("distill")
    labelled = 16 * distill["hard"] / skip["hard"]  # labelled examples in the first batch of 16
    assert labelled == pytest.approx(round(labelled), abs=1e-4) and 0 < round(labelled) < 16
    assert distill["positions_per_s"] / skip["positions_per_s"] != 1.0


def test_run_every_preset_saves_periodically_and_keeps_few():
    from darkknowledge.config import load_config

    presets = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))
    assert presets
    for preset in presets:
        train = load_config(preset).train
        assert 0 < train.save_every <= train.max_steps // 5, preset.name
        assert train.keep_last is not None and train.keep_last >= 2, (
            preset.name
        )  # one to fall back on
