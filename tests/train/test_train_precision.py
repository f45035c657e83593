"""Mixed precision reaches the loss, not only the model: the fused loss's vocabulary products
run in bfloat16 under mixed_precision="bf16"."""

from __future__ import annotations

import pytest
import torch

import darkknowledge as dk

# Tiny models on a shared 2-core machine: intra-op threads only spin and wait.
pytestmark = pytest.mark.usefixtures("one_thread")

transformers = pytest.importorskip("transformers")


def _gpt2(seed: int, width: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=64, n_positions=16, n_embd=width, n_layer=1, n_head=2, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


def test_distiller_bf16_runs_the_fused_loss_under_autocast():
    from darkknowledge.llm import CausalLMTask

    ids = torch.randint(64, (2, 12), generator=torch.Generator().manual_seed(0))
    task = CausalLMTask(chunk_size=8)
    loss_fn = dk.DistillationLoss(temperature=2.0, alpha=0.5)

    def reference(autocast: bool) -> float:
        student, teacher = _gpt2(0, 32), _gpt2(1, 48).eval()
        with torch.inference_mode():
            teacher_outputs = task.teacher_outputs(teacher, ids)
        teacher_outputs = type(teacher_outputs)(
            teacher_outputs.hidden.clone(), teacher_outputs.layer
        )
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = task.compute_loss(
                student, ids, teacher_outputs, loss_fn=loss_fn, step=0,
                normalizer=float(task.count_valid(ids)), grad_meter=False,
            )  # fmt: skip
        return float(out.loss.total.detach())

    distiller = dk.Distiller(
        _gpt2(0, 32), _gpt2(1, 48), [ids], task=task, temperature=2.0, alpha=0.5,
        mixed_precision="bf16", max_steps=1, progress=False,
    )  # fmt: skip
    logged = distiller.fit().history[0]["total"]
    in_bf16, in_fp32 = reference(True), reference(False)
    # The products' precision shows in the loss (about 1e-5 here, 100 times float32's rounding).
    assert abs(in_bf16 - in_fp32) > 1e-5
    assert abs(logged - in_bf16) < 1e-6
