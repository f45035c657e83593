"""GPU check of CausalLMTask (needs CUDA; not collected by pytest).

    PYTHONPATH=src python tests/llm/gpu_check.py

1. The fused loss of CausalLMTask against ``dk.kd_loss`` on the full shifted logits, on CUDA,
   at GPT-2's vocabulary: loss, largest relative gradient difference, extra peak memory.
2. ``dk.Distiller`` with CausalLMTask for 30 steps, in float32 and in bf16 mixed precision.
"""

import time

import torch
import transformers

import darkknowledge as dk
from darkknowledge.llm import CausalLMTask, shift_labels

VOCAB = 50257
DEVICE = "cuda"


def gpt2(n_embd: int, n_layer: int, seed: int) -> transformers.GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=512, n_embd=n_embd, n_layer=n_layer, n_head=n_embd // 64,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config).to(DEVICE)


def peak_extra_memory(run) -> int:
    """Bytes allocated at the peak of ``run()`` beyond what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def main() -> None:
    transformers.logging.set_verbosity_error()
    print(
        "torch",
        torch.__version__,
        "transformers",
        transformers.__version__,
        torch.cuda.get_device_name(),
    )
    teacher, student = gpt2(768, 4, 0).eval().requires_grad_(False), gpt2(256, 2, 1)
    ids = torch.randint(
        VOCAB, (8, 512), device=DEVICE, generator=torch.Generator(device=DEVICE).manual_seed(0)
    )
    mask = torch.ones_like(ids)
    mask[:2, -100:] = 0  # right padding in two rows
    batch = {
        "input_ids": ids,
        "attention_mask": mask,
        "prompt_lengths": torch.full((8,), 64, device=DEVICE),
    }
    task, loss_fn = CausalLMTask(chunk_size=1024), dk.DistillationLoss(temperature=2.0, alpha=0.5)
    with torch.inference_mode():
        teacher_out = task.teacher_outputs(teacher, batch)
    teacher_out = type(teacher_out)(teacher_out.hidden.clone(), teacher_out.layer)

    fused = []

    def fused_loss() -> None:
        fused.append(task.compute_loss(student, batch, teacher_out, loss_fn=loss_fn).loss)
        fused[-1].total.backward()

    peak_fused = peak_extra_memory(fused_loss)
    fused_grads = {name: p.grad.clone() for name, p in student.named_parameters()}
    student.zero_grad(set_to_none=True)

    labels = shift_labels(ids, mask, prompt_lengths=batch["prompt_lengths"])
    with torch.no_grad():
        teacher_logits = teacher(input_ids=ids, attention_mask=mask).logits
    full = []

    def full_loss() -> None:
        logits = student(input_ids=ids, attention_mask=mask).logits
        full.append(dk.kd_loss(logits, teacher_logits, labels, temperature=2.0, alpha=0.5))
        full[-1].total.backward()

    peak_full = peak_extra_memory(full_loss)
    relative = max(
        float((fused_grads[name] - p.grad).norm() / p.grad.norm().clamp_min(1e-12))
        for name, p in student.named_parameters()
    )
    print(
        f"fused total {fused[0].total.item():.6f} full {full[0].total.item():.6f}; max rel grad diff {relative:.2e}"
    )
    print(
        f"peak extra memory, 8x512 tokens, V={VOCAB}: fused {peak_fused / 2**20:.0f} MiB, full logits {peak_full / 2**20:.0f} MiB"
    )

    data = [
        {"input_ids": torch.randint(1000, (8, 256), generator=torch.Generator().manual_seed(i))}
        for i in range(4)
    ]
    for precision in ("no", "bf16"):
        distiller = dk.Distiller(
            gpt2(256, 2, 1), teacher, data, task=CausalLMTask(), max_steps=30, learning_rate=1e-3,
            mixed_precision=precision, progress=False, log_every=1,
        )  # fmt: skip
        began = time.time()
        history = distiller.fit().history
        print(
            f"Distiller mixed_precision={precision}: total {history[0]['total']:.3f} -> "
            f"{history[-1]['total']:.3f} in 30 steps, {time.time() - began:.1f} s"
        )


if __name__ == "__main__":
    main()
