"""Resume: bitwise equal to the uninterrupted run, wherever the cut falls; refused for another run."""

from __future__ import annotations

import json

import pytest
import torch
from trainkit import loader, mlp, points, state, teacher_mlp

import darkknowledge as dk
from darkknowledge.train import checkpoint as ckpt

# Tiny models on a shared 2-core machine: intra-op threads only spin and wait.
pytestmark = pytest.mark.usefixtures("one_thread")


def _distiller(output_dir, max_steps, temperature=None, **options):
    # Dropout and a shuffled loader: the resumed run must restore the RNG and the data position.
    # 8 batches per epoch, grad_accum_steps=2: 4 steps per epoch.
    return dk.Distiller(
        mlp(0, dropout=0.2), teacher_mlp(), loader(points(256), 32, shuffle=True),
        temperature=temperature or dk.schedules.linear(6.0, 2.0, 21),
        learning_rate=dk.schedules.cosine(1e-2, 1e-3, 21), grad_accum_steps=2, max_grad_norm=1.0,
        max_steps=max_steps, output_dir=output_dir, log_every=1, progress=False, **options,
    )  # fmt: skip


def _assert_same_student(a: dk.Distiller, b: dk.Distiller) -> None:
    expected, got = state(a.student), state(b.student)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


class _Kill(Exception):
    pass


def _crash_at(step):
    def callback(distiller, record):
        if distiller.step == step:
            raise _Kill

    return callback


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_distiller_resume_reproduces_the_uninterrupted_run_bitwise(tmp_path):
    whole = _distiller(tmp_path / "whole", 21)
    whole.fit()
    with pytest.raises(_Kill):  # a crash two steps after the checkpoint of step 7
        _distiller(tmp_path / "cut", 21, callbacks=[_crash_at(9)], save_every=7).fit()
    assert ckpt.latest_checkpoint(tmp_path / "cut").name == "step-00000007"
    resumed = _distiller(tmp_path / "cut", 21)
    assert resumed.fit(resume=True).history[0]["step"] == 8
    _assert_same_student(whole, resumed)
    for group_whole, group_resumed in zip(
        whole.optimizer.state.values(), resumed.optimizer.state.values()
    ):
        assert torch.equal(group_whole["exp_avg_sq"], group_resumed["exp_avg_sq"])
    # The log was rewound to the checkpoint, so each step appears once, as in the whole run.
    cut_log, whole_log = (
        _lines(tmp_path / "cut" / "metrics.jsonl"),
        _lines(tmp_path / "whole" / "metrics.jsonl"),
    )
    assert [r["step"] for r in cut_log] == list(range(1, 22))
    for a, b in zip(whole_log, cut_log):
        assert (a["total"], a["epoch"], a["temperature"]) == (
            b["total"],
            b["epoch"],
            b["temperature"],
        )


def test_distiller_resume_with_learnable_temperature_at_an_epoch_boundary(tmp_path):
    """Step 4 ends epoch 0 exactly (8 micro-batches): the resumed run opens epoch 1."""

    def run(output_dir, max_steps, **options):
        temperature = dk.LearnableTemperature(4.0, curriculum_steps=6)
        return _distiller(output_dir, max_steps, temperature=temperature, **options)

    whole = run(tmp_path / "whole", 7)
    whole.fit()
    with pytest.raises(_Kill):
        run(tmp_path / "cut", 7, callbacks=[_crash_at(6)], save_every=4).fit()
    saved = json.loads((ckpt.checkpoint_dir(tmp_path / "cut", 4) / "state.json").read_text())
    assert (saved["epoch"], saved["batch_index"]) == (0, 8)  # the end of epoch 0
    resumed = run(tmp_path / "cut", 7)
    history = resumed.fit(resume=True).history
    assert [r["epoch"] for r in history] == [1, 1, 1]
    _assert_same_student(whole, resumed)
    theta_whole = whole.temperature_module.theta.detach()
    assert torch.equal(resumed.temperature_module.theta.detach(), theta_whole)
    assert history[-1]["temperature"] == whole.fit().final["temperature"]  # a second fit: no steps


def test_distiller_save_checkpoint_from_a_callback_records_the_data_position(tmp_path):
    whole = _distiller(tmp_path / "whole", 6)
    whole.fit()

    def save_at_3(distiller, record):
        if distiller.step == 3:
            distiller.save_checkpoint()
        if distiller.step == 5:
            raise _Kill

    with pytest.raises(_Kill):
        _distiller(tmp_path / "cut", 6, callbacks=[save_at_3]).fit()
    saved = json.loads((ckpt.checkpoint_dir(tmp_path / "cut", 3) / "state.json").read_text())
    assert (saved["epoch"], saved["batch_index"]) == (0, 6)  # 3 steps x 2 micro-batches
    resumed = _distiller(tmp_path / "cut", 6)
    resumed.fit(resume=True)
    _assert_same_student(whole, resumed)


def test_distiller_second_fit_continues_the_data_stream():
    def run(max_steps):
        return dk.Distiller(
            mlp(0, dropout=0.2), teacher_mlp(), loader(points(128), 32, shuffle=True),
            max_steps=max_steps, progress=False,
        )  # fmt: skip

    whole = run(7)  # built and run before the other: the two share the global RNG
    whole.fit()
    split = run(3)
    split.fit()
    split.max_steps = 7
    assert split.fit().final["step"] == 7
    assert split.stream.epoch == whole.stream.epoch == 1
    _assert_same_student(whole, split)


def test_distiller_resume_refuses_another_config_and_allows_more_steps(tmp_path):
    config = {"train": {"max_steps": 4, "seed": 0}, "distill": {"alpha": 0.9}}
    _distiller(tmp_path, 4, config=config).fit()
    checkpoint = ckpt.latest_checkpoint(tmp_path)
    assert json.loads((checkpoint / "config.json").read_text()) == config
    assert len(json.loads((checkpoint / "state.json").read_text())["config_hash"]) == 16
    changed = {"train": {"max_steps": 4, "seed": 1}, "distill": {"alpha": 0.5}}
    with pytest.raises(
        ValueError, match=r"distill\.alpha \(0\.9 -> 0\.5\), train\.seed \(0 -> 1\)"
    ):
        _distiller(tmp_path, 4, config=changed).fit(resume=True)
    longer = {"train": {"max_steps": 6, "seed": 0}, "distill": {"alpha": 0.9}}
    assert _distiller(tmp_path, 6, config=longer).fit(resume=True).final["step"] == 6
    with pytest.raises(ValueError, match="past max_steps=5"):
        _distiller(tmp_path, 5).fit(resume=True)


def test_distiller_fresh_fit_refuses_a_used_output_dir(tmp_path):
    _distiller(tmp_path, 2).fit()
    with pytest.raises(ValueError, match=r"holds a previous run \(metrics.jsonl, checkpoints\)"):
        _distiller(tmp_path, 2).fit()


def test_distiller_resume_drops_a_half_written_log_line(tmp_path):
    whole = _distiller(tmp_path / "whole", 4)
    whole.fit()
    with pytest.raises(_Kill):
        _distiller(tmp_path / "cut", 4, callbacks=[_crash_at(3)], save_every=2).fit()
    with (tmp_path / "cut" / "metrics.jsonl").open("a") as log:
        log.write('{"kind": "train", "st')  # killed while writing a line
    _distiller(tmp_path / "cut", 4).fit(resume=True)
    assert [r["step"] for r in _lines(tmp_path / "cut" / "metrics.jsonl")] == [1, 2, 3, 4]


def test_distiller_resume_without_checkpoint_starts_afresh(tmp_path):
    result = _distiller(tmp_path, 2).fit(resume=True)
    assert [r["step"] for r in result.history] == [1, 2]
    with pytest.raises(ValueError, match="output_dir"):
        dk.Distiller(mlp(0), None, loader(points(32), 8), max_steps=1, progress=False).fit(
            resume=True
        )
