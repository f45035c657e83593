import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from two_processes import torchrun

WORKER = Path(__file__).with_name("lm_ddp_worker.py")


def test_two_process_gloo_distillation_matches_one_process(tmp_path, make_gpt2):
    """torchrun with 2 CPU processes (gloo) gives the parameters of one process on the whole batch."""
    out = tmp_path / "two.safetensors"
    torchrun(WORKER, out, logs=tmp_path / "logs", timeout=240)

    sys.path.insert(0, str(WORKER.parent))
    try:
        from lm_ddp_worker import train
    finally:
        sys.path.remove(str(WORKER.parent))
    one = train(rank=0, world_size=1)
    two = load_file(out)
    assert one.keys() == two.keys()
    initial = dict(make_gpt2(0).named_parameters())
    moved = sum(float((one[name] - initial[name].detach()).abs().sum()) for name in one)
    assert moved > 0
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-6, msg=name)
