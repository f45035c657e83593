"""``kill -9`` at 20 moments of one on-policy ``dk distill`` run (``distill.on_policy``, the
student samples its own completions): 7 while the student is generating, 7 while a
checkpoint is being written, 6 at random delays; each followed by ``--resume``. After every
kill each published checkpoint verifies and holds the uninterrupted run's state at its step;
the run ends with the uninterrupted run's weights and logs, bit for bit."""

from __future__ import annotations

import json
import random

import pytest
import yaml
from faultkit import DK, ENV, check_checkpoints, kill_summary, records
from kill_harness import CHECKPOINTS, Kill, Watch, Zygote, run_with_kills

from darkknowledge.cli import main
from same_files import assert_same_file

# The uninterrupted reference runs in this process and is compared byte for byte with
# what the killed subprocesses (OMP_NUM_THREADS=1) wrote: the same thread count.
pytestmark = pytest.mark.usefixtures("one_thread")

KILLS = 20
MODULES = (
    "darkknowledge.commands._build_llm", "darkknowledge.llm.on_policy",
    "transformers.models.gpt2.modeling_gpt2",
)  # fmt: skip
MARKERS = "FAULTS_GENERATION_MARKERS"
GPT2 = {"model_type": "gpt2", "n_layer": 1, "n_head": 2, "n_positions": 16}
GPT2 |= {"bos_token_id": 0, "eos_token_id": 0}
CONFIG = {
    "task": "causal_lm",
    "teacher": {"name": "hf_causal_lm", "args": {**GPT2, "n_embd": 32}, "train_steps": 4},
    "student": {"name": "hf_causal_lm", "args": {**GPT2, "n_embd": 16, "resid_pdrop": 0.1}},
    "data": {
        "name": "stdlib_bytes", "block_size": 16, "prompt_length": 8, "batch_size": 4,
        "eval_batch_size": 32, "train_bytes": 20_000, "heldout_bytes": 1_024,
    },
    "distill": {
        "temperature": 2.0, "alpha": 0.5, "divergence": "reverse_kl",
        "on_policy": {"fraction": 0.75, "sampling_temperature": 0.8,
                      "sampler": "marked_sampler:make"},
    },
    "train": {
        "max_steps": 150, "save_every": 2, "keep_last": 2, "log_every": 1, "eval_every": 50,
        "progress": False,
    },
}  # fmt: skip

# The built-in sampler (Hugging Face generate), wrapped so that a kill can aim at it: while it
# runs, a fresh folder exists in $FAULTS_GENERATION_MARKERS (when set; the reference run has
# none). The samples are GenerateSampler's own.
SAMPLER = """
import itertools, os
from pathlib import Path

from darkknowledge.llm import GenerateSampler

CALLS = itertools.count()


class Marked:
    def __init__(self, sampler):
        self.sampler = sampler

    def __call__(self, model, prompt_ids, prompt_mask, **options):
        folder = os.environ.get("FAULTS_GENERATION_MARKERS")
        if folder is None:
            return self.sampler(model, prompt_ids, prompt_mask, **options)
        marker = Path(folder) / f"generating-{os.getpid()}-{next(CALLS)}"
        marker.mkdir(parents=True)
        try:
            return self.sampler(model, prompt_ids, prompt_mask, **options)
        finally:
            marker.rmdir()


def make(temperature, top_k, top_p, eos_token_id):
    return Marked(GenerateSampler(temperature=temperature, top_k=top_k, top_p=top_p,
                                  eos_token_id=eos_token_id))
"""


@pytest.mark.faults
def test_kill_on_policy_ends_bitwise_equal_to_an_uninterrupted_run(tmp_path):
    (tmp_path / "marked_sampler.py").write_text(SAMPLER)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    reference, killed, markers = tmp_path / "reference", tmp_path / "killed", tmp_path / "markers"
    assert main(["distill", str(config), f"train.output_dir={reference}",
                 "train.keep_last=null"]) == 0  # fmt: skip
    train = [r for r in records(reference / "student" / "metrics.jsonl") if r["kind"] == "train"]
    assert {r["hard"] == 0.0 for r in train} == {True, False}  # sampled and data steps

    watch = Watch(
        progress=CHECKPOINTS.progress,
        moments={**CHECKPOINTS.moments, "generation": lambda _: list(markers.glob("*"))},
    )
    command = [*DK, "distill", str(config), f"train.output_dir={killed}"]
    checked = []

    def after_kill(attempt) -> None:
        checked.append(sum(check_checkpoints(killed / stage, reference / stage)
                           for stage in ("teacher", "student") if (killed / stage).exists()))  # fmt: skip

    rng = random.Random(3)  # generation, save, a delay, generation, ...: 7, 7 and 6
    plan = [(Kill.at("generation"), Kill.in_save(), Kill.after(rng.uniform(0, 0.05)))[i % 3]
            for i in range(KILLS)]  # fmt: skip
    with Zygote({**ENV, MARKERS: str(markers)}, MODULES) as zygote:  # attempts are its forks
        attempts = run_with_kills(
            command, [*command, "--resume"], killed, plan, watch=watch, after_kill=after_kill,
            timeout=300, zygote=zygote,
        )  # fmt: skip
    summary = kill_summary(attempts)
    print("dk distill (on-policy):", json.dumps(summary), f"checkpoints checked: {sum(checked)}")
    assert summary["kills"] == KILLS, [(a.kill, a.killed, a.seconds) for a in attempts]
    assert summary["moments"] == {"generation": 7, "save": 7, "after a delay": 6}
    assert summary["cut_a_write"] >= 14  # a generation or a checkpoint write, cut each time
    for stage in ("teacher", "student"):
        assert_same_file(
            killed / stage / "model.safetensors", reference / stage / "model.safetensors"
        )
        assert records(killed / stage / "metrics.jsonl") == records(
            reference / stage / "metrics.jsonl"
        ), stage
