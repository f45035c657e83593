"""Two CPU processes (gloo) of on-policy distillation give one process's weights."""

from __future__ import annotations

from pathlib import Path

import torch
from onpolicy_ddp_worker import SEED, STEPS, train
from onpolicy_kit import parameters, tiny_gpt2
from safetensors.torch import load_file

from darkknowledge.llm import OnPolicyTask
from two_processes import torchrun

WORKER = Path(__file__).with_name("onpolicy_ddp_worker.py")


def test_on_policy_two_processes_match_one_process(tmp_path):
    coins = [OnPolicyTask(fraction=0.5, seed=SEED).on_policy(step) for step in range(STEPS)]
    assert True in coins and False in coins, coins  # sampled steps and data steps
    out = tmp_path / "two.safetensors"
    torchrun(WORKER, out, logs=tmp_path / "logs")
    one, two = train(rank=0, world_size=1), load_file(out)
    assert one.keys() == two.keys()
    initial = parameters(tiny_gpt2(0))
    assert sum(float((one[name] - initial[name]).abs().sum()) for name in one) > 0
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-6, msg=name)
