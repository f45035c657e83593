"""Training from a teacher cache in its own process, for the two-process and kill/resume tests.

Usage: ``python training_worker.py CACHE OUT [--resume]``, or under
``python -m torch.distributed.run --standalone --nproc_per_node 2 training_worker.py CACHE OUT``.
The global batch is 4 sequences (``4 / processes`` per process), shuffled by the Distiller's
seed, two micro-batches per step, a checkpoint every step; the student goes to
``OUT/student/model.safetensors``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from cachekit import ragged_dataset

sys.path.insert(0, str(Path(__file__).parents[1] / "llm"))
from tiny_models import tiny_gpt2

import darkknowledge as dk

VOCAB = 40
STEPS = 8


def dataset() -> list[dict]:
    """The ragged cache dataset, every example with an attention mask (one collatable form)."""
    data = ragged_dataset(16, vocab_size=VOCAB)
    for example in data:
        example.setdefault("attention_mask", [1] * len(example["input_ids"]))
    return data


def train(cache: Path, out: Path, *, resume: bool = False, world_size: int = 1) -> dk.Distiller:
    student = tiny_gpt2(5, n_embd=8, vocab_size=VOCAB)
    loader = dk.cache.cached_loader(
        dataset(), cache, batch_size=4 // world_size, shuffle=True, num_workers=1
    )
    distiller = dk.Distiller(
        student,
        dk.cache.CachedTeacher(cache),
        loader,
        task=dk.llm.CachedCausalLMTask(chunk_size=7),
        temperature=2.0,
        alpha=0.7,
        optimizer="sgd",
        learning_rate=0.3,
        max_steps=STEPS,
        grad_accum_steps=2,
        max_grad_norm=1.0,
        save_every=1,
        log_every=1,
        output_dir=out,
        progress=False,
    )
    distiller.fit(resume=resume)
    distiller.export_student(out / "student")
    return distiller


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("cache", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    train(args.cache, args.out, resume=args.resume, world_size=int(os.environ.get("WORLD_SIZE", 1)))
    dk.train.end_processes()
