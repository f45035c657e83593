"""A capture run in its own process, for the kill/resume and the two-process tests.

Usage: ``python capture_worker.py OUT [--slow SECONDS]``, or under
``python -m torch.distributed.run --standalone --nproc_per_node 2 capture_worker.py OUT
[--late-look SAW]`` (``write_teacher_cache`` joins the torchrun processes itself). ``--slow``
sleeps in every teacher call, so that a test can kill the process in the middle of a capture.
``--late-look SAW``: process 1 looks at OUT a second after process 0 could have, and writes
what it saw to the JSON file SAW.
"""

from __future__ import annotations

import argparse
import json
import os
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


def look_late(saw: Path) -> None:
    """Process 1 looks at the output folder a second late and records what it found there."""
    module = sys.modules["darkknowledge.cache.capture"]
    look = module._existing_capture

    def late(folder: Path, settings: dict):
        if os.environ.get("RANK") == "1":
            time.sleep(1.0)
            names = sorted(p.name for p in folder.iterdir()) if folder.exists() else []
            saw.write_text(json.dumps(names))
        return look(folder, settings)

    module._existing_capture = late


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--slow", type=float, default=0.0)
    parser.add_argument("--late-look", type=Path)
    args = parser.parse_args()
    SlowBackend.seconds = args.slow
    if args.late_look is not None:
        look_late(args.late_look)
    capture(args.out, backend=SlowBackend)
    dk.train.end_processes()
