"""SIGINT/SIGTERM during fit: save and stop with a message; never swallowed; twice aborts."""

from __future__ import annotations

import os
import signal

import pytest
from trainkit import loader, mlp, points, teacher_mlp

import darkknowledge as dk
from darkknowledge.train import checkpoint as ckpt

# Tiny models on a shared 2-core machine: intra-op threads only spin and wait.
pytestmark = pytest.mark.usefixtures("one_thread")


def _distiller(output_dir, max_steps, **options):
    return dk.Distiller(
        mlp(0), teacher_mlp(), loader(points(128), 32, shuffle=True), max_steps=max_steps,
        output_dir=output_dir, log_every=1, progress=False, **options,
    )  # fmt: skip


def _send_at(step, signum, times=1):
    def callback(distiller, record):
        if distiller.step == step:
            for _ in range(times):
                os.kill(os.getpid(), signum)

    return callback


@pytest.mark.parametrize(
    ("signum", "raised", "code"),
    [(signal.SIGTERM, dk.train.Terminated, 143), (signal.SIGINT, dk.train.Interrupted, None)],
)
def test_distiller_signal_saves_a_checkpoint_and_stops(tmp_path, signum, raised, code):
    previous = signal.getsignal(signum)
    distiller = _distiller(tmp_path, 50, callbacks=[_send_at(3, signum)])
    with pytest.raises(raised) as info:
        distiller.fit()
    path = ckpt.checkpoint_dir(tmp_path, 3)
    assert distiller.step == 3 and ckpt.latest_checkpoint(tmp_path) == path
    assert str(info.value) == (
        f"interrupted at step 3; checkpoint saved to {path}; rerun with fit(resume=True)"
    )
    assert info.value.describe("--resume").endswith("rerun with --resume")
    assert isinstance(info.value, KeyboardInterrupt if code is None else SystemExit)
    if code is not None:
        assert info.value.code == code
    assert signal.getsignal(signum) is previous  # handlers restored after fit
    assert _distiller(tmp_path, 5).fit(resume=True).history[0]["step"] == 4


def test_distiller_signal_during_the_last_step_is_not_swallowed(tmp_path):
    distiller = _distiller(tmp_path, 4, callbacks=[_send_at(4, signal.SIGINT)])
    with pytest.raises(dk.train.Interrupted) as info:
        distiller.fit()
    assert info.value.step == 4 and info.value.checkpoint == ckpt.checkpoint_dir(tmp_path, 4)
    assert ckpt.latest_checkpoint(tmp_path) == info.value.checkpoint  # saved once, the final one


class _SignalWhileEvaluating:
    """Eval batches that send SIGTERM while the final evaluation reads them."""

    def __init__(self, after_steps):
        self.after_steps, self.distiller = after_steps, None
        self.batches = list(loader(points(32, seed=1), 16))

    def __iter__(self):
        if self.distiller.step == self.after_steps:
            os.kill(os.getpid(), signal.SIGTERM)
        return iter(self.batches)


def test_distiller_signal_during_the_final_evaluation_is_not_swallowed(tmp_path):
    evaluation = _SignalWhileEvaluating(after_steps=3)
    distiller = _distiller(tmp_path, 3, eval_data=evaluation)
    evaluation.distiller = distiller
    with pytest.raises(dk.train.Terminated) as info:
        distiller.fit()
    assert info.value.step == 3 and info.value.checkpoint == ckpt.checkpoint_dir(tmp_path, 3)
    assert (info.value.checkpoint / "state.json").exists()


def test_distiller_second_signal_aborts_at_once(tmp_path):
    previous = signal.getsignal(signal.SIGINT)
    distiller = _distiller(tmp_path, 50, callbacks=[_send_at(3, signal.SIGINT, times=2)])
    with pytest.raises(KeyboardInterrupt) as info:
        distiller.fit()
    assert not isinstance(info.value, dk.train.Interrupted)  # not the orderly stop
    assert distiller.step == 3 and ckpt.latest_checkpoint(tmp_path) is None  # nothing saved
    assert signal.getsignal(signal.SIGINT) is previous
