"""``dk cache-teacher CONFIG`` and ``dk distill`` with ``teacher: {cache: PATH}``: capture, rerun,
interruption, torchrun, training from the cache against the live teacher, refusals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from cachekit import files

from darkknowledge.cli import main
from two_processes import torchrun

GPT2 = {"model_type": "gpt2", "n_layer": 1, "n_head": 2, "n_positions": 16}
GPT2 |= {"bos_token_id": 0, "eos_token_id": 0}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


@pytest.fixture(scope="module")
def teacher_folder(tmp_path_factory) -> Path:
    """A trained-teacher stand-in: a random tiny GPT-2 saved with save_pretrained."""
    folder = tmp_path_factory.mktemp("teacher") / "teacher"
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=256, n_embd=16, **GPT2)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


def _config(tmp_path: Path, teacher_folder: Path, name: str = "config.yaml", **sections) -> str:
    raw = {
        "task": "causal_lm",
        "teacher": {
            "name": "hf_causal_lm", "args": {**GPT2, "n_embd": 16},
            "checkpoint": str(teacher_folder), "cache": str(tmp_path / "cache"),
        },
        "student": {"name": "hf_causal_lm", "args": {**GPT2, "n_embd": 8}},
        "data": {
            "name": "stdlib_bytes", "block_size": 16, "batch_size": 4, "eval_batch_size": 16,
            "train_bytes": 2048, "heldout_bytes": 512,
        },
        "distill": {"temperature": 1.0, "alpha": 0.9},
        "cache": {"representation": "topk", "k": 8, "shard_size": 32},
        "train": {"max_steps": 4, "log_every": 1, "progress": False},
    }  # fmt: skip
    for section, changes in sections.items():
        raw[section] = {**raw.get(section, {}), **changes}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def _totals(run: Path) -> list[float]:
    lines = (run / "student" / "metrics.jsonl").read_text().splitlines()
    return [r["total"] for r in map(json.loads, lines) if r["kind"] == "train"]


def test_cache_teacher_writes_a_cache_that_dk_distill_trains_from(tmp_path, teacher_folder, capsys):
    """A full-vocabulary top-k cache (k = V = 256): ``dk distill`` from it follows the live
    teacher's run of the same config step by step (to 1e-4: the cache holds float16
    log-probabilities, the live teacher float32; see test_training.py)."""
    config = _config(tmp_path, teacher_folder, cache={"k": 256})
    assert main(["cache-teacher", config]) == 0
    out = capsys.readouterr().out
    cache = tmp_path / "cache"
    assert f"done: {cache} holds 128 sequences, 2048 positions, 1024 bytes/token" in out
    assert f"train from it: dk distill {config}" in out
    written = files(cache)
    assert main(["cache-teacher", config]) == 0  # a finished cache is reported, not redone
    assert files(cache) == written

    cached, live = tmp_path / "cached", tmp_path / "live"
    assert main(["distill", config, f"train.output_dir={cached}"]) == 0
    assert "no teacher model in memory" in capsys.readouterr().out
    assert main(["distill", config, "teacher.cache=null", f"train.output_dir={live}"]) == 0
    results = json.loads((cached / "results.json").read_text())
    assert results[0]["stage"] == "teacher" and results[0]["source"] == str(cache)
    assert results[0]["bytes_per_token"]["payload"] == 1024
    torch.testing.assert_close(_totals(cached), _totals(live), rtol=1e-4, atol=0)
    assert len(_totals(cached)) == 4


def test_cache_teacher_rerun_continues_after_a_kill(tmp_path, teacher_folder):
    """SIGKILL once two shards are on disk, rerun: the files of an uninterrupted capture."""
    data = {"train_bytes": 8192}  # 512 sequences, 16 shards
    config = _config(tmp_path, teacher_folder, data=data)
    reference = _config(tmp_path, teacher_folder, "reference.yaml", data=data)
    assert main(["cache-teacher", reference, f"teacher.cache={tmp_path / 'reference'}"]) == 0
    cache = tmp_path / "cache"
    command = [sys.executable, "-m", "darkknowledge.cli", "cache-teacher", config]
    process = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while len(list(cache.glob("shard-*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (cache / "manifest.json").exists(), "the capture finished before the kill"
    assert (cache / "capture.json").exists()
    done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert files(cache) == files(tmp_path / "reference")


def test_cache_teacher_under_torchrun_writes_the_one_process_files(tmp_path, teacher_folder):
    config = _config(tmp_path, teacher_folder)
    assert main(["cache-teacher", config, f"teacher.cache={tmp_path / 'one'}"]) == 0
    done = torchrun(
        "-m", "darkknowledge.cli", "cache-teacher", config, f"teacher.cache={tmp_path / 'two'}",
        logs=tmp_path / "logs", env={"PYTHONWARNINGS": "ignore"},
    )  # fmt: skip
    assert done.stdout.count("done: ") == 1  # one report, from process 0
    assert files(tmp_path / "two") == files(tmp_path / "one")


def test_cache_teacher_captures_twelve_draws_by_default(tmp_path, teacher_folder, capsys):
    config = _config(tmp_path, teacher_folder)
    raw = yaml.safe_load(Path(config).read_text())
    raw["cache"] = {"shard_size": 32}  # representation and width left to their defaults
    Path(config).write_text(yaml.safe_dump(raw))
    assert main(["cache-teacher", config]) == 0
    assert "48 bytes/token of targets" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert (manifest["representation"], manifest["num_samples"]) == ("sampled", 12)
    assert main(["validate", config, "cache.k=8"]) == 2
    err = capsys.readouterr().err
    assert "cache.k: not used by cache.representation 'sampled' (it takes cache.num_samples)" in err


def test_cache_cli_refuses_what_it_cannot_use(tmp_path, teacher_folder, capsys):
    config = _config(tmp_path, teacher_folder)
    assert main(["cache-teacher", config, "teacher.cache=null"]) == 2
    assert "teacher.cache: missing" in capsys.readouterr().err
    untrained = ["teacher.checkpoint=null", "teacher.train_steps=10"]
    assert main(["cache-teacher", config, *untrained]) == 2
    assert "capture a trained teacher" in capsys.readouterr().err
    assert main(["distill", config, f"train.output_dir={tmp_path / 'none'}"]) == 2
    assert "teacher.cache: no teacher cache at" in capsys.readouterr().err
    assert main(["validate", config]) == 2
    assert "teacher.cache: no teacher cache at" in capsys.readouterr().err

    assert main(["cache-teacher", config]) == 0
    other_data = ["data.train_bytes=1024", f"train.output_dir={tmp_path / 'other'}"]
    assert main(["distill", config, *other_data]) == 2
    assert "dataset_fingerprint is" in capsys.readouterr().err
    assert main(["validate", config, "distill.divergence=jsd"]) == 2
    err = capsys.readouterr().err
    assert "distill.divergence: training from teacher.cache is forward KL" in err
    smaller = ["student.args.vocab_size=300", f"train.output_dir={tmp_path / 'vocab'}"]
    assert main(["distill", config, *smaller]) == 2
    assert "vocab_size is 256 in the cache, 300 here" in capsys.readouterr().err
