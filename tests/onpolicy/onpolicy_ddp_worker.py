"""On-policy distillation with dk.Distiller, run by torchrun (2 processes) or directly (1).

Usage: ``python -m torch.distributed.run --standalone --nproc_per_node 2 onpolicy_ddp_worker.py OUT``.
Every micro-step's global batch has 4 rows with prompts of different lengths; process r takes
rows r, r + W, ...; λ = 0.5 with 2-step accumulation, so some steps sample from the student and
some use the data. Rank 0 writes the student's parameters to OUT (safetensors).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from onpolicy_kit import parameters, prompt_batches, tiny_gpt2

import darkknowledge as dk
from darkknowledge.llm import GenerateSampler, OnPolicyTask

STEPS, ACCUMULATION, SEED = 4, 2, 0


def train(rank: int, world_size: int) -> dict:
    local = [
        {key: value[rank::world_size] for key, value in batch.items()}
        for batch in prompt_batches(STEPS * ACCUMULATION, rows=4)
    ]
    task = OnPolicyTask(
        fraction=0.5, seed=SEED, sampler=GenerateSampler(temperature=0.9), chunk_size=5
    )
    distiller = dk.Distiller(
        tiny_gpt2(0), tiny_gpt2(1, n_embd=24), local, task=task, temperature=2.0, alpha=0.5,
        loss_options={"divergence": "jsd"}, optimizer="sgd", learning_rate=0.5,
        max_steps=STEPS, grad_accum_steps=ACCUMULATION, seed=SEED, progress=False,
    )  # fmt: skip
    distiller.fit()
    return parameters(distiller.accelerator.unwrap_model(distiller.student))


if __name__ == "__main__":
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    params = train(rank, world_size)
    if rank == 0:
        save_file(params, sys.argv[1])
    dk.train.end_processes()
