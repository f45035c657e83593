"""``kill -9`` at 20 random moments of one ``dk cache-teacher`` capture (10 of them while a
shard file is being written), each followed by the same command, which continues the capture:
after every kill each published shard is the uninterrupted capture's file and no manifest
names a shard that is not complete; the capture ends with the uninterrupted capture's files,
byte for byte."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from faultkit import DK, ENV, check_cache, kill_summary
from kill_harness import Watch, Zygote, random_plan, run_with_kills

from darkknowledge.cli import main
from same_files import assert_same_folder

# The uninterrupted reference runs in this process and is compared byte for byte with
# what the killed subprocesses (OMP_NUM_THREADS=1) wrote: the same thread count.
pytestmark = pytest.mark.usefixtures("one_thread")

KILLS = 20
MODULES = ("darkknowledge.commands.cache_teacher", "transformers.models.gpt2.modeling_gpt2")
GPT2 = {"model_type": "gpt2", "n_layer": 1, "n_head": 2, "n_positions": 16}
GPT2 |= {"bos_token_id": 0, "eos_token_id": 0}


def _config(tmp_path: Path) -> Path:
    """A random tiny GPT-2 saved as the trained teacher; 2,048 sequences of 16 bytes in
    256 shards of 8, so that 20 kills land before the capture ends."""
    teacher = tmp_path / "teacher"
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=256, n_embd=16, **GPT2)
    ).save_pretrained(teacher)
    raw = {
        "task": "causal_lm",
        "teacher": {"name": "hf_causal_lm", "args": {**GPT2, "n_embd": 16},
                    "checkpoint": str(teacher), "cache": str(tmp_path / "cache")},
        "student": {"name": "hf_causal_lm", "args": {**GPT2, "n_embd": 8}},
        "data": {"name": "stdlib_bytes", "block_size": 16, "batch_size": 4,
                 "train_bytes": 32_768, "heldout_bytes": 512},
        "cache": {"representation": "topk", "k": 16, "shard_size": 8, "batch_size": 8},
        "train": {"progress": False},
    }  # fmt: skip
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _shards(cache: Path) -> tuple:
    return tuple(sorted(p.name for p in cache.glob("shard-*"))), (cache / "capture.json").exists()


# Progress: a shard published; the moment: a shard's temporary file (_files.atomic_path's).
CAPTURE = Watch(
    progress=_shards, moments={"shard write": lambda cache: list(cache.glob(".shard-*"))}
)


@pytest.mark.faults
def test_kill_cache_teacher_ends_with_the_uninterrupted_capture(tmp_path):
    config = _config(tmp_path)
    reference, cache = tmp_path / "reference", tmp_path / "cache"
    assert main(["cache-teacher", str(config), f"teacher.cache={reference}"]) == 0
    assert len(list(reference.glob("shard-*"))) == 256

    command = [*DK, "cache-teacher", str(config)]
    on_disk = []
    plan = random_plan(seed=5, kills=KILLS, max_delay=0.02, moments=("shard write",))
    with Zygote(ENV, MODULES) as zygote:  # each attempt a fork of a process that imported them
        attempts = run_with_kills(
            command, command, cache, plan, watch=CAPTURE, timeout=300, zygote=zygote,
            after_kill=lambda attempt: on_disk.append(check_cache(cache, reference)),
        )  # fmt: skip
    summary = kill_summary(attempts)
    print("dk cache-teacher:", json.dumps(summary), "shards after each kill:", on_disk)
    assert summary["kills"] == KILLS, [(a.kill, a.killed, a.seconds) for a in attempts]
    assert summary["moments"] == {"shard write": KILLS // 2, "after a delay": KILLS // 2}
    # Most kills aimed at a shard write leave its file; a write takes about a millisecond, so
    # on a loaded machine the odd one ends between the harness seeing the file and the kill.
    assert summary["cut_a_write"] >= KILLS // 2 - 3
    assert on_disk == sorted(on_disk) and on_disk[-1] < 256  # resumed, never restarted
    assert not list(cache.glob(".shard-*"))  # the last run removed the killed writes' files
    assert_same_folder(cache, reference)
