"""Checkpoints: pickle-free layout, bitwise resume, SIGTERM/SIGINT saves."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from trainkit import loader, mlp, points, state, teacher_mlp

import darkknowledge as dk
from darkknowledge.train import checkpoint as ckpt


def _distiller(output_dir, max_steps, callbacks=(), save_every=0):
    # Dropout and a shuffled loader: the resumed run must restore the RNG and the data position.
    # 5 + 1/4 epochs of 8 batches (grad_accum_steps=2: 4 steps per epoch), checkpoints mid-epoch.
    return dk.Distiller(
        mlp(0, dropout=0.2), teacher_mlp(), loader(points(256), 32, shuffle=True),
        temperature=dk.schedules.linear(6.0, 2.0, 21), learning_rate=dk.schedules.cosine(1e-2, 1e-3, 21),
        grad_accum_steps=2, max_grad_norm=1.0, max_steps=max_steps, save_every=save_every,
        output_dir=output_dir, log_every=1, callbacks=callbacks, progress=False,
    )  # fmt: skip


class _Kill(Exception):
    pass


def test_distiller_resume_reproduces_the_uninterrupted_run_bitwise(tmp_path):
    whole = _distiller(tmp_path / "whole", 21)
    whole.fit()

    def kill_at_step_9(distiller, record):  # a crash two steps after the checkpoint of step 7
        if distiller.step == 9:
            raise _Kill

    with pytest.raises(_Kill):
        _distiller(tmp_path / "cut", 21, callbacks=[kill_at_step_9], save_every=7).fit()
    assert ckpt.latest_checkpoint(tmp_path / "cut").name == "step-00000007"

    resumed = _distiller(tmp_path / "cut", 21)
    result = resumed.fit(resume=True)
    assert result.history[0]["step"] == 8
    expected, got = state(whole.student), state(resumed.student)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    for group_whole, group_resumed in zip(
        whole.optimizer.state.values(), resumed.optimizer.state.values()
    ):
        assert torch.equal(group_whole["exp_avg_sq"], group_resumed["exp_avg_sq"])
    # The log was rewound to the checkpoint, so each step appears once, as in the whole run.
    steps = [
        json.loads(line)["step"]
        for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == list(range(1, 22))
    whole_log = (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()
    cut_log = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    for a, b in zip(whole_log, cut_log):
        a, b = json.loads(a), json.loads(b)
        assert (a["total"], a["epoch"], a["temperature"]) == (
            b["total"],
            b["epoch"],
            b["temperature"],
        )


def test_checkpoint_layout_is_json_and_safetensors_only(tmp_path):
    _distiller(tmp_path, 3).fit()
    path = ckpt.latest_checkpoint(tmp_path)
    names = sorted(p.name for p in path.iterdir())
    assert names == [
        "optimizer.json", "optimizer.safetensors", "rng-rank0.json", "rng-rank0.safetensors",
        "state.json", "student.safetensors",
    ]  # fmt: skip
    meta = json.loads((path / "state.json").read_text())
    assert meta["step"] == 3 and meta["world_size"] == 1
    assert (meta["epoch"], meta["batch_index"]) == (0, 6)  # 3 steps x 2 micro-batches
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


@pytest.mark.parametrize(
    ("signum", "raised"), [(signal.SIGTERM, SystemExit), (signal.SIGINT, KeyboardInterrupt)]
)
def test_distiller_signal_saves_a_checkpoint_and_stops(tmp_path, signum, raised):
    previous = signal.getsignal(signum)

    def send_signal(distiller, record):
        if distiller.step == 3:
            os.kill(os.getpid(), signum)

    distiller = _distiller(tmp_path, 50, callbacks=[send_signal])
    with pytest.raises(raised):
        distiller.fit()
    assert distiller.step == 3
    assert ckpt.latest_checkpoint(tmp_path).name == "step-00000003"
    assert signal.getsignal(signum) is previous  # handlers restored after fit
    resumed = _distiller(tmp_path, 5)
    assert resumed.fit(resume=True).history[0]["step"] == 4


def test_distiller_resume_without_checkpoint_starts_afresh(tmp_path):
    result = _distiller(tmp_path, 2).fit(resume=True)
    assert [r["step"] for r in result.history] == [1, 2]
    with pytest.raises(ValueError, match="output_dir"):
        dk.Distiller(mlp(0), None, loader(points(32), 8), max_steps=1, progress=False).fit(
            resume=True
        )
