"""Causal-LM distillation with dk.Distiller, run by torchrun (2 processes) or directly (1).

Usage: ``python -m torch.distributed.run --standalone --nproc_per_node 2 lm_ddp_worker.py OUT``.
The global batch of every micro-step has 4 rows with different amounts of padding; process r
takes rows r, r + W, ...; rank 0 writes the student's parameters to OUT (safetensors).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import tiny_gpt2

import darkknowledge as dk
from darkknowledge.llm import CausalLMTask


def global_batches(steps: int = 2, accumulation: int = 2) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(steps * accumulation):
        ids = torch.randint(1, 40, (4, 8), generator=generator)
        lengths = torch.tensor([8, 3, 7, 5])  # ranks get different token counts
        mask = (torch.arange(8) < lengths[:, None]).long()
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def train(rank: int, world_size: int) -> dict[str, torch.Tensor]:
    local = [
        {key: value[rank::world_size] for key, value in batch.items()} for batch in global_batches()
    ]
    student, teacher = tiny_gpt2(0), tiny_gpt2(1, n_embd=24)
    distiller = dk.Distiller(
        student,
        teacher,
        local,
        task=CausalLMTask(chunk_size=5),
        temperature=2.0,
        alpha=0.5,
        optimizer="sgd",
        learning_rate=0.5,
        max_steps=2,
        grad_accum_steps=2,
        progress=False,
    )
    distiller.fit()
    model = distiller.accelerator.unwrap_model(distiller.student)
    # lm_head.weight is wte.weight (tied): save each tensor once.
    return {name: p.detach().clone() for name, p in model.named_parameters()}


if __name__ == "__main__":
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    params = train(rank, world_size)
    if rank == 0:
        save_file(params, sys.argv[1])
    dk.train.end_processes()
