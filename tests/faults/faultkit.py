"""Checks the fault tests run after every kill: nothing on disk is half-written or published
incomplete, and what is published is exactly what an uninterrupted run wrote."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

from kill_harness import DK  # noqa: F401  (re-exported for the tests)

from darkknowledge._files import file_sha256
from darkknowledge.cache.manifest import MANIFEST, read_manifest
from darkknowledge.train import checkpoint as ckpt
from same_files import assert_same_file

THROUGHPUT = ("steps_per_s", "positions_per_s", "seconds")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
# Files of a checkpoint that do not depend on which run wrote it (config.json holds the
# run's own train.keep_last, which a resume may change).
SAME_AS_REFERENCE = ("student.safetensors", "optimizer.safetensors", "optimizer.json")


def records(path: Path) -> list[dict]:
    """The lines of a metrics.jsonl, without the throughput (time) fields."""
    lines = path.read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k not in THROUGHPUT} for x in lines]


def check_checkpoints(stage: Path, reference: Path) -> int:
    """Every published checkpoint of a stage verifies against its manifest and holds the
    uninterrupted run's student and optimizer at that step; a stage's exported model is the
    reference's. Returns how many checkpoints were checked."""
    checked = 0
    for folder in ckpt.complete_checkpoints(stage):
        ckpt.verify(folder)  # every file of the manifest, size and CRC-32
        for name in SAME_AS_REFERENCE:
            ours, theirs = folder / name, reference / ckpt.CHECKPOINTS / folder.name / name
            assert_same_file(ours, theirs)
        checked += 1
    model = stage / "model.safetensors"
    if model.exists():
        assert_same_file(model, reference / "model.safetensors")
    return checked


def check_cache(cache: Path, reference: Path) -> int:
    """Every published shard is the uninterrupted capture's file; a manifest, once there, is
    the reference's and every shard it names verifies. Returns the shards on disk."""
    shards = sorted(cache.glob("shard-*.safetensors"))
    for shard in shards:
        assert_same_file(shard, reference / shard.name)
    if (cache / MANIFEST).exists():
        manifest = read_manifest(cache)
        assert_same_file(cache / MANIFEST, reference / MANIFEST)
        for entry in manifest["shards"]:
            assert file_sha256(cache / entry["file"]) == entry["sha256"], entry["file"]
    return len(shards)


def kill_summary(attempts: list) -> dict:
    """Counts for the report: kills, kills at each moment, kills that cut a write."""
    kills = [a for a in attempts if a.killed]
    moments: dict[str, int] = {}
    for attempt in kills:
        name = attempt.kill.moment or "after a delay"
        moments[name] = moments.get(name, 0) + 1
    return {
        "kills": len(kills),
        "moments": moments,
        "cut_a_write": sum(a.left_temporary for a in kills),
        "seconds": round(sum(a.seconds for a in attempts), 1),
    }


def launch_two(command: list[str], env: dict[str, str]) -> list[subprocess.Popen]:
    """Both processes of a 2-process CPU run (gloo), started by hand as a launcher would (no
    torchrun, whose agent would stop a survivor itself); stderr is piped."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    processes = []
    for rank in range(2):
        environment = {
            **ENV, **env, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
            "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
        }  # fmt: skip
        output = {"stdout": subprocess.DEVNULL, "stderr": subprocess.PIPE, "text": True}
        processes.append(subprocess.Popen(command, env=environment, **output))
    return processes
