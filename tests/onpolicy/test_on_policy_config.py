"""``distill.on_policy`` in configs: validation, dk distill with both objectives, a sampler
named as package.module:callable, and kill -9 / --resume ending bitwise equal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from darkknowledge.cli import main
from darkknowledge.config import check_config
from same_files import assert_same_file

sys.path.insert(0, str(Path(__file__).parents[1] / "faults"))
from kill_harness import random_plan, run_with_kills

GPT2 = {"model_type": "gpt2", "n_layer": 1, "n_head": 2, "n_positions": 16}
GPT2 |= {"bos_token_id": 0, "eos_token_id": 0}
CONFIG = {
    "task": "causal_lm",
    "teacher": {"name": "hf_causal_lm", "args": {**GPT2, "n_embd": 32}, "train_steps": 6},
    "student": {"name": "hf_causal_lm", "args": {**GPT2, "n_embd": 16, "resid_pdrop": 0.1}},
    "data": {
        "name": "stdlib_bytes", "block_size": 16, "prompt_length": 8, "batch_size": 4,
        "eval_batch_size": 32, "train_bytes": 20_000, "heldout_bytes": 1_024,
    },
    "distill": {
        "temperature": 2.0, "alpha": 0.5, "divergence": "reverse_kl",
        "on_policy": {"fraction": 0.5, "sampling_temperature": 0.8},
    },
    "train": {
        "max_steps": 16, "save_every": 2, "keep_last": 2, "log_every": 1, "eval_every": 8,
        "progress": False,
    },
}  # fmt: skip
THROUGHPUT = ("steps_per_s", "positions_per_s", "seconds")


def _write(tmp_path: Path, raw: dict) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def _records(path: Path) -> list[dict]:
    lines = path.read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k not in THROUGHPUT} for x in lines]


@pytest.mark.parametrize(
    "change, path",
    [
        ({"data": {**CONFIG["data"], "prompt_length": 0}}, "data.prompt_length"),
        (
            {"distill": {**CONFIG["distill"], "divergence": "jsd", "on_policy": {"objective": "sampled_reverse_kl"}}},
            "distill.divergence",
        ),
        ({"distill": {**CONFIG["distill"], "on_policy": {"fraction": 2}}}, "distill.on_policy.fraction"),
        ({"distill": {**CONFIG["distill"], "on_policy": {"top_p": 0}}}, "distill.on_policy.top_p"),
        ({"distill": {**CONFIG["distill"], "on_policy": {"sampler_args": {"a": 1}}}}, "distill.on_policy.sampler_args"),
        ({"task": "classification", "teacher": {"hidden": [8]}, "student": {"hidden": [4]}, "data": {}}, "distill.on_policy"),
    ],
)  # fmt: skip
def test_on_policy_config_problems_name_their_field(change, path):
    _, errors = check_config({**CONFIG, **change})
    assert errors and errors[0].startswith(f"{path}:"), errors


def test_on_policy_config_builds_the_task_it_describes():
    from darkknowledge.commands._build_llm import on_policy_task
    from darkknowledge.config import config_from_dict

    raw = {**CONFIG, "train": {**CONFIG["train"], "seed": 7}}
    raw["distill"] = {
        **CONFIG["distill"],
        "on_policy": {**CONFIG["distill"]["on_policy"], "top_p": 0.9},
    }
    task = on_policy_task(config_from_dict(raw))
    assert (task.fraction, task.seed, task.objective, task.max_new_tokens) == (
        0.5,
        7,
        "divergence",
        None,
    )
    sampler = task.sampler
    assert (sampler.temperature, sampler.top_k, sampler.top_p, sampler.eos_token_id) == (
        0.8,
        None,
        0.9,
        None,
    )


SAMPLER = '''
from darkknowledge.llm import GenerateSampler

SEEN = []

def make(temperature, top_k, top_p, eos_token_id, note="x"):
    """A user's sampler factory: the settings of distill.on_policy arrive as arguments."""
    SEEN.append((temperature, top_k, top_p, eos_token_id, note))
    with open("sampler-settings.json", "w") as handle:
        handle.write(repr(SEEN[-1]))
    return GenerateSampler(temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=eos_token_id)
'''


def test_on_policy_config_sampled_reverse_kl_and_a_user_sampler(tmp_path, monkeypatch):
    (tmp_path / "my_sampler.py").write_text(SAMPLER)
    monkeypatch.chdir(tmp_path)
    on_policy = {
        "fraction": 1.0, "objective": "sampled_reverse_kl", "sampling_temperature": 0.9,
        "top_k": 30, "sampler": "my_sampler:make", "sampler_args": {"note": "vllm"},
    }  # fmt: skip
    raw = {
        **CONFIG,
        "distill": {**CONFIG["distill"], "on_policy": on_policy},
        "train": {**CONFIG["train"], "max_steps": 3, "output_dir": str(tmp_path / "run")},
    }
    path = _write(tmp_path, raw)
    assert main(["validate", path]) == 0
    assert main(["distill", path]) == 0
    assert (tmp_path / "sampler-settings.json").read_text() == "(0.9, 30, None, None, 'vllm')"
    records = _records(tmp_path / "run" / "student" / "metrics.jsonl")
    train = [r for r in records if r["kind"] == "train"]
    assert len(train) == 3 and all(r["hard"] == 0.0 for r in train)  # every step sampled


def test_on_policy_config_kill_and_resume_end_bitwise_equal(tmp_path):
    """SIGKILL at random moments (checkpoint writes included) and --resume: the same student
    weights and log as an uninterrupted run: the coins and samples are replayed exactly."""
    config = _write(tmp_path, CONFIG)
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "darkknowledge.cli", "distill", config]
    # The reference runs in a process of its own too: nothing of this test process's state.
    done = subprocess.run(
        [*command, f"train.output_dir={reference}"], env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    train = [r for r in _records(reference / "student" / "metrics.jsonl") if r["kind"] == "train"]
    assert {r["hard"] == 0.0 for r in train} == {True, False}  # sampled and data steps

    command.append(f"train.output_dir={killed}")
    plan = random_plan(seed=3, kills=3, max_delay=0.6)
    attempts = run_with_kills(command, [*command, "--resume"], killed, plan, env=env, timeout=300)
    assert sum(a.killed for a in attempts) >= 2, [(a.kill, a.killed, a.seconds) for a in attempts]
    for stage in ("teacher", "student"):
        assert_same_file(
            killed / stage / "model.safetensors", reference / stage / "model.safetensors"
        )
        assert _records(killed / stage / "metrics.jsonl") == _records(
            reference / stage / "metrics.jsonl"
        ), stage


def test_on_policy_config_with_a_padded_student_samples_the_shared_vocabulary(tmp_path):
    """A teacher of 260 ids (the 256 bytes and 4 more) and a student padded to 264 rows: dk
    distill samples only the 260 (before: refused at the first sampled step) and the padding
    rows, never sampled nor a target, keep their values."""
    from safetensors.torch import load_file

    teacher = {**CONFIG["teacher"], "args": {**CONFIG["teacher"]["args"], "vocab_size": 260}}
    student = {**CONFIG["student"], "args": {**CONFIG["student"]["args"], "vocab_size": 264}}
    raw = {
        **CONFIG,
        "teacher": {**teacher, "train_steps": 2},
        "student": student,
        "distill": {**CONFIG["distill"], "on_policy": {"fraction": 1.0}},
        "train": {**CONFIG["train"], "max_steps": 3, "output_dir": str(tmp_path / "run")},
    }
    assert main(["distill", _write(tmp_path, raw)]) == 0
    run = tmp_path / "run" / "student"
    train = [r for r in _records(run / "metrics.jsonl") if r["kind"] == "train"]
    assert len(train) == 3 and all(r["hard"] == 0.0 for r in train)  # every step sampled
    final = load_file(run / "model.safetensors")
    at_two = load_file(run / "checkpoints" / "step-00000002" / "student.safetensors")
    name = next(k for k in final if k.endswith("wte.weight"))
    at_two = next(v for k, v in at_two.items() if k.endswith("wte.weight"))
    assert final[name].shape[0] == 264
    assert not torch.equal(final[name][:260], at_two[:260])  # step 3 trained the shared rows
    assert torch.equal(final[name][260:], at_two[260:])  # and left the padding alone
