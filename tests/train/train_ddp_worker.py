"""Run by ``torchrun --nproc_per_node 2`` from test_train_multiprocess.py (CPU, gloo).

Usage: train_ddp_worker.py OUTPUT_DIR [accumulate]. Trains 4 steps and saves, then resumes to 6
steps in a new Distiller, then exports the student to OUTPUT_DIR/student. With ``accumulate``:
batches of 8 and grad_accum_steps=2 (a global batch of 32) for 6 steps, no resume.
"""

import sys

import torch
from trainkit import loader, mlp, points, teacher_mlp

import darkknowledge as dk


def distiller(output_dir, max_steps, batch_size, grad_accum_steps=1):
    return dk.Distiller(
        mlp(0), teacher_mlp(), loader(points(128, ignore_every=3), batch_size, shuffle=True),
        alpha=0.5, optimizer="sgd", learning_rate=0.1, max_steps=max_steps, output_dir=output_dir,
        eval_data=loader(points(40, seed=1), 8), grad_accum_steps=grad_accum_steps, log_every=1,
        max_grad_norm=1.0 if grad_accum_steps > 1 else None, progress=False,
    )  # fmt: skip


if __name__ == "__main__":
    torch.set_num_threads(1)
    output_dir = sys.argv[1]
    if sys.argv[2:] == ["accumulate"]:
        run = distiller(output_dir, 6, 8, grad_accum_steps=2)
        assert run.accelerator.num_processes == 2, run.accelerator.state
        run.fit()
        run.export_student(f"{output_dir}/student")
        dk.train.end_processes()
    first = distiller(output_dir, 4, 16)
    assert first.accelerator.num_processes == 2, first.accelerator.state
    first.fit()
    second = distiller(output_dir, 6, 16)
    result = second.fit(resume=True)
    assert [r["step"] for r in result.history if r["kind"] == "train"] == [5, 6]
    assert result.final["eval_count"] == 40, result.final
    second.export_student(f"{output_dir}/student")
    dk.train.end_processes()
