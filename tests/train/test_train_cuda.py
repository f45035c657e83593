"""The Distiller on a GPU (skipped without CUDA): mixed precision, a bf16 teacher, accumulation."""

from __future__ import annotations

import math

import pytest
import torch
from trainkit import loader, mlp, points, state, teacher_mlp

import darkknowledge as dk

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.usefixtures("one_thread"),
]


@pytest.mark.parametrize("mixed_precision", ["no", "bf16", "fp16"])
def test_distiller_cuda_mixed_precision_learns(tmp_path, mixed_precision):
    teacher = teacher_mlp()
    distiller = dk.Distiller(
        mlp(0), teacher, loader(points(), 32, shuffle=True), max_steps=40, learning_rate=1e-2,
        grad_accum_steps=2, max_grad_norm=1.0, mixed_precision=mixed_precision, teacher_dtype="bf16",
        eval_data=loader(points(128, seed=1), 64), output_dir=tmp_path, log_every=5, progress=False,
    )  # fmt: skip
    result = distiller.fit()
    train = [r for r in result.history if r["kind"] == "train"]
    assert all(math.isfinite(r["total"]) for r in train)
    assert train[-1]["hard"] < train[0]["hard"]
    assert next(teacher.parameters()).device.type == "cuda"
    assert next(teacher.parameters()).dtype == torch.bfloat16
    assert next(distiller.student.parameters()).device.type == "cuda"
    assert result.final["eval_accuracy"] > 0.5


def test_distiller_cuda_resume_matches(tmp_path):
    """On a GPU the resumed run matches the whole run (CUDA RNG state restored for dropout)."""

    def make(output_dir, max_steps):
        return dk.Distiller(
            mlp(0, dropout=0.2), teacher_mlp(), loader(points(), 32, shuffle=True),
            max_steps=max_steps, output_dir=output_dir, progress=False,
        )  # fmt: skip

    whole = make(tmp_path / "whole", 12)
    whole.fit()
    make(tmp_path / "cut", 5).fit()  # ends with a checkpoint at step 5
    resumed = make(tmp_path / "cut", 12)
    resumed.fit(resume=True)
    expected, got = state(whole.student), state(resumed.student)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6)
