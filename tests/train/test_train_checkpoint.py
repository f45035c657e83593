"""Checkpoint folders: pickle-free layout, crash-safe writing, verification, pruning."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from trainkit import loader, mlp, points, state, teacher_mlp

import darkknowledge as dk
from darkknowledge.train import checkpoint as ckpt

# Tiny models on a shared 2-core machine: intra-op threads only spin and wait.
pytestmark = pytest.mark.usefixtures("one_thread")


def _distiller(output_dir, max_steps, **options):
    # Dropout and a shuffled loader: a resumed run must restore the RNG and the data position.
    # 8 batches per epoch, grad_accum_steps=2: 4 steps per epoch.
    return dk.Distiller(
        mlp(0, dropout=0.2), teacher_mlp(), loader(points(256), 32, shuffle=True),
        temperature=dk.schedules.linear(6.0, 2.0, 21), learning_rate=dk.schedules.cosine(1e-2, 1e-3, 21),
        grad_accum_steps=2, max_grad_norm=1.0, max_steps=max_steps, output_dir=output_dir,
        log_every=1, progress=False, **options,
    )  # fmt: skip


def test_checkpoint_layout_is_json_and_safetensors_only(tmp_path):
    _distiller(tmp_path, 3).fit()
    path = ckpt.latest_checkpoint(tmp_path)
    names = sorted(p.name for p in path.iterdir())
    assert names == [
        "manifest.json", "optimizer.json", "optimizer.safetensors", "rng-rank0.json",
        "rng-rank0.safetensors", "state.json", "student.safetensors",
    ]  # fmt: skip
    meta = json.loads((path / "state.json").read_text())
    assert meta["step"] == 3 and meta["world_size"] == 1
    assert (meta["epoch"], meta["batch_index"]) == (0, 6)  # 3 steps x 2 micro-batches
    manifest = json.loads((path / "manifest.json").read_text())
    assert sorted(manifest) == [n for n in names if n != "manifest.json"]
    assert manifest["student.safetensors"]["bytes"] == (path / "student.safetensors").stat().st_size
    assert not list(path.parent.glob(".tmp-*"))


def test_checkpoint_tree_round_trip_keeps_optimizer_state():
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.8, 0.9))
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    tensors = {}
    tree = json.loads(json.dumps(ckpt.encode_tree(optimizer.state_dict(), tensors)))
    restored = ckpt.decode_tree(tree, tensors)
    original = optimizer.state_dict()
    assert restored["param_groups"] == original["param_groups"]
    assert restored["param_groups"][0]["betas"] == (0.8, 0.9)
    for index, values in original["state"].items():
        for name, value in values.items():
            assert torch.equal(restored["state"][index][name], value)
    with pytest.raises(TypeError, match="cannot store"):
        ckpt.encode_tree({"fn": print}, {})


def test_checkpoint_leftover_temporary_folder_is_removed_not_published(tmp_path):
    # A save killed half-way left a temporary folder with a stray file, at the same step.
    leftover = tmp_path / "checkpoints" / ".tmp-step-00000002"
    leftover.mkdir(parents=True)
    (leftover / "stray.bin").write_bytes(b"half a file")
    (tmp_path / "checkpoints" / ".old-step-00000001").mkdir()
    _distiller(tmp_path, 2).fit(resume=True)
    published = ckpt.checkpoint_dir(tmp_path, 2)
    assert not (published / "stray.bin").exists()
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000002"]


def test_checkpoint_files_and_rename_are_fsynced(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def spy(descriptor):
        synced.append(os.readlink(f"/proc/self/fd/{descriptor}"))
        return real_fsync(descriptor)

    if not os.path.exists("/proc/self/fd"):
        pytest.skip("needs /proc to name file descriptors")
    monkeypatch.setattr(os, "fsync", spy)
    _distiller(tmp_path, 1).fit()
    final = ckpt.checkpoint_dir(tmp_path, 1)
    temporary = str(final.with_name(f".tmp-{final.name}"))
    for name in sorted(p.name for p in final.iterdir()):
        assert f"{temporary}/{name}" in synced, name  # each file, before the rename
    assert temporary in synced  # the folder's entries
    assert str(final.parent) in synced  # the rename itself
    assert synced.index(temporary) < synced.index(str(final.parent))


def test_checkpoint_keep_last_prunes_the_oldest(tmp_path):
    _distiller(tmp_path, 5, save_every=1, keep_last=2).fit()
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path)] == [
        "step-00000005",
        "step-00000004",
    ]
    assert not list((tmp_path / "checkpoints").glob(".*"))


def _corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # inside the tensor data: the file still parses
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["corrupt_student", "missing_optimizer", "truncated_state"])
def test_checkpoint_damaged_file_falls_back_to_the_previous_one(tmp_path, damage):
    whole = _distiller(tmp_path / "whole", 8)
    whole.fit()
    _distiller(tmp_path / "cut", 6, save_every=2).fit()
    newest = ckpt.checkpoint_dir(tmp_path / "cut", 6)
    name = {
        "corrupt_student": "student.safetensors",
        "missing_optimizer": "optimizer.json",
        "truncated_state": "state.json",
    }[damage]
    if damage == "corrupt_student":
        _corrupt(newest / name)
    elif damage == "missing_optimizer":
        (newest / name).unlink()
    else:
        (newest / name).write_text((newest / name).read_text()[:20])
    resumed = _distiller(tmp_path / "cut", 8)
    with pytest.warns(RuntimeWarning, match=f"{newest / name}.*previous checkpoint step-00000004"):
        result = resumed.fit(resume=True)
    assert result.history[0]["step"] == 5  # continued from step 4
    expected = state(whole.student)
    assert all(torch.equal(v, expected[k]) for k, v in state(resumed.student).items())


def test_checkpoint_damaged_without_fallback_names_the_file(tmp_path):
    _distiller(tmp_path, 2).fit()
    path = ckpt.checkpoint_dir(tmp_path, 2) / "rng-rank0.safetensors"
    _corrupt(path)
    with pytest.raises(dk.train.CheckpointError, match=f"checkpoint file {path} is corrupted"):
        _distiller(tmp_path, 4).fit(resume=True)
    # Without a manifest (a checkpoint from before manifests), parsing still names the file.
    (path.parent / "manifest.json").unlink()
    path.write_bytes(b"\x00" * 5)
    with pytest.raises(dk.train.CheckpointError, match=f"checkpoint file {path} is corrupted"):
        _distiller(tmp_path, 4).fit(resume=True)


DATA = Path(__file__).parent / "data" / "checkpoint_v0"


def test_checkpoint_from_before_manifests_resumes_bitwise(tmp_path):
    """A checkpoint written by the code before this change (no manifest, no config hash)."""
    shutil.copytree(DATA / "checkpoints", tmp_path / "checkpoints")

    def run(output_dir):
        return dk.Distiller(
            mlp(0, hidden=8, dropout=0.2), teacher_mlp(), loader(points(64), 16, shuffle=True),
            temperature=dk.LearnableTemperature(4.0, curriculum_steps=3), max_steps=4,
            output_dir=output_dir, progress=False,
        )  # fmt: skip

    resumed = run(tmp_path)
    assert resumed.fit(resume=True).history[0]["step"] == 4  # the last step is logged
    from safetensors.torch import load_file

    old_run = load_file(str(DATA / "student_step4.safetensors"))
    for name, value in state(resumed.student).items():
        assert torch.equal(value, old_run[name]), name
