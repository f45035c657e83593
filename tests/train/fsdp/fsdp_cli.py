"""``dk`` with FSDP2 on CPU processes, launched by test_train_fsdp.py as

    accelerate launch --use_fsdp --fsdp_version 2 --num_processes 2 ... fsdp_cli.py distill CONFIG ...

the command docs/training.md gives for GPUs. On CPU the library refuses FSDP (Accelerate would
run plain DDP); here, for the test only, every Distiller the command builds gets the
test-only FSDP2 Accelerator of ``fsdp_worker.fsdp_accelerator`` (see its docstring) in place
of the library's own ``make_accelerator``. Everything else is the real ``dk`` command.
"""

from __future__ import annotations

import sys

import fsdp_worker  # also puts tests/train on sys.path
import torch

import darkknowledge as dk
import darkknowledge.train._accelerate as accelerate_module
from darkknowledge.cli import main

TIMEOUT_S = 60.0


def _test_accelerator(mixed_precision: str):
    return fsdp_worker.fsdp_accelerator(TIMEOUT_S, mixed_precision)


if __name__ == "__main__":
    torch.set_num_threads(1)
    accelerate_module.make_accelerator = _test_accelerator  # the test-only seam, see above
    dk.train.end_processes(main(sys.argv[1:]))
