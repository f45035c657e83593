"""Configs for MTP students and drafts: ``dk distill`` trains an MTP student (heads saved with
the model), ``dk speculate`` measures a distilled draft against its teacher and an MTP student
against itself, and the config refuses what does not fit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from safetensors import safe_open

from darkknowledge.cli import main
from darkknowledge.config import ConfigError, config_from_dict

GPT2 = {"model_type": "gpt2", "n_layer": 1, "n_head": 2, "n_positions": 32}
GPT2 |= {"bos_token_id": 0, "eos_token_id": 0}
TINY = {
    "task": "causal_lm",
    "teacher": {"name": "hf_causal_lm", "args": {**GPT2, "n_embd": 32}, "train_steps": 3},
    "student": {"name": "hf_causal_lm", "args": {**GPT2, "n_embd": 16}},
    "data": {
        "name": "stdlib_bytes", "block_size": 32, "batch_size": 4, "eval_batch_size": 16,
        "train_bytes": 20_000, "heldout_bytes": 1_024,
    },
    "distill": {"temperature": 1.0, "alpha": 1.0, "divergence": "tvd"},
    "train": {"max_steps": 3, "log_every": 1, "progress": False},
    "speculate": {"gamma": 2, "max_new_tokens": 8, "prompts": 2, "prompt_length": 8, "repeats": 1},
}  # fmt: skip


def write(tmp_path: Path, raw: dict) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_speculate_command_measures_a_distilled_draft(tmp_path, capsys):
    run = tmp_path / "run"
    config = write(tmp_path, {**TINY, "train": {**TINY["train"], "output_dir": str(run)}})
    assert main(["distill", config]) == 0
    capsys.readouterr()
    assert main(["speculate", config]) == 0
    printed = capsys.readouterr().out
    assert f"target (teacher): {run / 'teacher' / 'model.safetensors'}" in printed
    assert f"draft (student): {run / 'student' / 'model.safetensors'}" in printed
    assert "speed-up over plain decoding with KV cache" in printed
    report = json.loads((run / "speculate.json").read_text())
    assert report["new_tokens"] == 16 and report["gamma"] == 2
    assert 0 <= report["offline_acceptance"] <= 1 and report["speedup"] > 0
    assert report["tokens_per_target_call"] <= 3


def test_distill_mtp_student_saves_heads_with_the_model_and_self_speculates(tmp_path, capsys):
    run = tmp_path / "run"
    raw = {
        **TINY,
        "mtp": {"kind": "sequential", "num_depths": 2, "depth_weights": [0.5, 0.25]},
        "train": {**TINY["train"], "output_dir": str(run)},
        "distill": {"temperature": 1.0, "alpha": 0.9},
    }
    config = write(tmp_path, raw)
    assert main(["distill", config]) == 0
    log = [
        json.loads(line) for line in (run / "student" / "metrics.jsonl").read_text().splitlines()
    ]
    train = [r for r in log if r["kind"] == "train"]
    assert {"depth0/total", "depth1/soft", "depth2/hard"} <= set(train[-1])
    with safe_open(str(run / "student" / "model.safetensors"), "pt") as weights:
        names = set(weights.keys())
    assert any(n.startswith("heads.layers.1.") for n in names)
    assert any(n.startswith("model.transformer.") for n in names)
    capsys.readouterr()
    assert main(["eval", config, "--checkpoint", str(run / "student")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["count"] > 0
    assert main(["speculate", config]) == 0
    printed = capsys.readouterr().out
    assert "student (MTP self-speculation)" in printed and "(per depth)" in printed
    report = json.loads((run / "speculate.json").read_text())
    assert len(report["offline_acceptance"]) == 2 and report["gamma"] == 2


def test_mtp_config_refuses_what_does_not_fit():
    with pytest.raises(ConfigError, match=r"mtp\.depth_weights: one weight per depth"):
        config_from_dict({**TINY, "mtp": {"num_depths": 2, "depth_weights": [1.0]}})
    with pytest.raises(ConfigError, match="mtp: heads that predict tokens ahead; set task"):
        config_from_dict({"student": {"hidden": [8]}, "mtp": {"num_depths": 2}})
    with pytest.raises(ConfigError, match=r"mtp\.kind"):
        config_from_dict({**TINY, "mtp": {"kind": "diagonal"}})


def test_speculate_command_refuses_missing_weights_and_long_decodings(tmp_path, capsys):
    run = str(tmp_path / "none")
    config = write(tmp_path, {**TINY, "train": {**TINY["train"], "output_dir": run}})
    assert main(["speculate", config]) == 2
    error = capsys.readouterr().err
    assert "no weights for the target: set speculate.target_checkpoint" in error
    assert f"looked for {run}/teacher/model.safetensors" in error
    assert main(["speculate", config, "speculate.max_new_tokens=30"]) == 2
    error = capsys.readouterr().err
    assert (
        "speculate.prompt_length + speculate.max_new_tokens = 38 exceeds the target's 32" in error
    )
    assert main(["speculate", config, "speculate.gamma=0"]) == 2
    assert "speculate.gamma" in capsys.readouterr().err
