"""A capture run in its own process, for the kill/resume and the two-process tests.

Usage: ``python capture_worker.py OUT [--slow SECONDS]``, or under
``python -m torch.distributed.run --standalone --nproc_per_node 2 capture_worker.py OUT``
(``write_teacher_cache`` joins the torchrun processes itself). ``--slow`` sleeps in every
teacher call, so that a test can kill the process in the middle of a capture.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from cachekit import ragged_dataset, teacher

import darkknowledge as dk

# One capture, shared with the tests that compare against it.
SETTINGS = {"k": 5, "batch_size": 2, "shard_size": 3, "progress": False}
DATASET_SIZE = 24


def capture(out: Path, backend=None) -> dict:
    return dk.cache.write_teacher_cache(
        teacher(), ragged_dataset(DATASET_SIZE), out, backend=backend, **SETTINGS
    )


class SlowBackend(dk.cache.HuggingFaceBackend):
    """The Hugging Face backend, sleeping before every batch."""

    seconds = 0.0

    def topk(self, *args, **kwargs):
        time.sleep(self.seconds)
        return super().topk(*args, **kwargs)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--slow", type=float, default=0.0)
    args = parser.parse_args()
    SlowBackend.seconds = args.slow
    capture(args.out, backend=SlowBackend)
    dk.train.end_processes()
