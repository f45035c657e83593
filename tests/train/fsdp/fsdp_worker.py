"""``dk.Distiller`` under FSDP2 on CPU processes (gloo), launched by test_train_fsdp.py as

    accelerate launch --use_fsdp --fsdp_version 2 --num_processes 2 ... fsdp_worker.py SPEC OUT

the command docs/training.md gives for GPUs. ``run`` builds a real Distiller on the injected
Accelerator of :func:`fsdp_accelerator` and writes what the tests compare (train records,
final evaluation, exported student) to OUT; ``reference`` (imported by the tests) is the
same optimisation in one plain PyTorch process over the whole global batch.

TEST-ONLY OVERRIDE. Accelerate (1.6 to 1.15 at least) turns FSDP on only for GPU-like devices:
on CPU it keeps ``DistributedType.MULTI_CPU`` and silently ignores the FSDP plugin (plain DDP),
which is why the library refuses FSDP on CPU. :func:`fsdp_accelerator` therefore sets
Accelerate's private state to the distributed type it would have chosen on a GPU, so that its
own FSDP2 code (``fully_shard`` in ``prepare``, ``no_sync``, ``clip_grad_norm_``,
``get_state_dict``) runs on CPU as on GPUs. This never goes into the library.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

HERE = Path(__file__).resolve().parent
for _extra in (HERE.parent, HERE.parents[1] / "llm"):  # trainkit, tiny_models
    if str(_extra) not in sys.path:
        sys.path.insert(0, str(_extra))

from trainkit import mlp, points, teacher_mlp  # noqa: E402

import darkknowledge as dk  # noqa: E402

MICRO_BATCH = 4  # rows per process per micro-batch
EVAL_ROWS, EVAL_BATCH = 18, 4  # 5 eval batches (4, 4, 4, 4, 2): uneven over 2 processes
TEMPERATURE, ALPHA, LEARNING_RATE = 2.0, 0.5, 1e-2
VOCAB, LENGTH = 40, 8


# ---- models and data (identical on every process) ----------------------------------------


def models(kind: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(student, teacher); GPT-2's student ties its output layer to its input embeddings."""
    if kind == "mlp":
        return mlp(0), teacher_mlp()
    from tiny_models import tiny_gpt2  # imports transformers: only when needed (seconds)

    return tiny_gpt2(0, vocab_size=VOCAB), tiny_gpt2(1, n_embd=24, vocab_size=VOCAB)


class _Tokens(torch.utils.data.Dataset):
    """Rows of ``{"input_ids", "labels"}`` (Hugging Face style, unshifted; -100: not predicted)."""

    def __init__(self, rows: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (rows, LENGTH), generator=generator)
        self.labels = self.ids.clone()
        self.labels[torch.rand(rows, LENGTH, generator=generator) < 0.3] = -100

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.labels[index]}


def dataset(kind: str, rows: int, seed: int = 0) -> TensorDataset | _Tokens:
    """Rows with some ignored labels, so micro-batches have uneven valid counts."""
    return points(rows, seed=seed, ignore_every=3) if kind == "mlp" else _Tokens(rows, seed)


def train_loader(kind: str, steps: int, grad_accum: int, world_size: int, batch: int):
    rows = steps * grad_accum * world_size * MICRO_BATCH
    return DataLoader(dataset(kind, rows), batch_size=batch)


def eval_loader(kind: str) -> DataLoader:
    return DataLoader(dataset(kind, EVAL_ROWS, seed=1), batch_size=EVAL_BATCH)


# ---- the Accelerator (test-only override, see the module docstring) ----------------------


def fsdp_accelerator(timeout_s: float, mixed_precision: str = "no"):
    """An Accelerator on CPU processes (gloo) running FSDP2 with the plugin that
    ``accelerate launch --use_fsdp --fsdp_version 2 ...`` described in the environment."""
    from accelerate import Accelerator, DistributedType, FullyShardedDataParallelPlugin
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DataLoaderConfiguration, InitProcessGroupKwargs

    if AcceleratorState._shared_state.get("_mixed_precision") not in (None, mixed_precision):
        AcceleratorState._reset_state()  # another precision in the same process
    plugin = FullyShardedDataParallelPlugin()  # from FSDP_* set by accelerate launch
    accelerator = Accelerator(
        cpu=True, mixed_precision=mixed_precision, fsdp_plugin=plugin,
        gradient_accumulation_steps=1,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=timeout_s))],
    )  # fmt: skip
    # The override (also when a previous one left PartialState at FSDP, with no plugin yet).
    # Both shared states: AcceleratorState() re-reads PartialState's on construction.
    if mixed_precision != "no":
        plugin.set_mixed_precision(mixed_precision)
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    AcceleratorState._shared_state["distributed_type"] = DistributedType.FSDP
    AcceleratorState._shared_state["fsdp_plugin"] = plugin
    if not accelerator.is_fsdp2:
        raise RuntimeError(f"FSDP2 was not enabled: {accelerator.distributed_type}")
    return accelerator


def refusals(timeout_s: float) -> dict[str, str]:
    """The messages of the set-ups the Distiller refuses under FSDP2 on CPU."""
    messages = {}
    student, teacher = models("mlp")
    data = train_loader("mlp", 1, 1, 2, MICRO_BATCH)
    for name, precision, temperature in (
        ("fp16", "fp16", TEMPERATURE),
        ("learnable_temperature", "no", dk.LearnableTemperature(2.0)),
    ):
        accelerator = fsdp_accelerator(timeout_s, precision)
        try:
            dk.Distiller(
                student, teacher, data, temperature=temperature, max_steps=1, progress=False,
                accelerator=accelerator,
            )  # fmt: skip
        except ValueError as error:
            messages[name] = str(error)
    return messages


# ---- the runs ----------------------------------------------------------------------------


def distiller(spec: dict[str, Any], accelerator, callbacks=()) -> dk.Distiller:
    kind, world = spec["model"], accelerator.num_processes
    student, teacher = models(kind)
    task = dk.ClassificationTask() if kind == "mlp" else dk.llm.CausalLMTask(chunk_size=16)
    return dk.Distiller(
        student, teacher,
        train_loader(kind, spec["steps"], spec["grad_accum"], world, MICRO_BATCH),
        task=task, temperature=TEMPERATURE, alpha=ALPHA, learning_rate=LEARNING_RATE,
        max_steps=spec["steps"], grad_accum_steps=spec["grad_accum"],
        max_grad_norm=spec["max_grad_norm"], eval_data=eval_loader(kind),
        output_dir=spec["output_dir"], save_every=spec.get("save_every", 0), log_every=1,
        progress=False, callbacks=callbacks, accelerator=accelerator,
    )  # fmt: skip


def run(spec: dict[str, Any], out: Path) -> None:
    """Train (or resume), evaluate, export; the main process writes OUT/result.json and
    OUT/student/model.safetensors. ``die_after``: SIGKILL every process after that step.
    ``evaluate_alone``: after building, only the main process evaluates (a user error)."""
    started = time.perf_counter()
    messages = refusals(spec.get("timeout_s", 60.0)) if spec.get("refusals") else {}
    accelerator = fsdp_accelerator(spec.get("timeout_s", 60.0))
    if accelerator.num_processes != 2:
        raise RuntimeError(f"expected 2 processes, got {accelerator.num_processes}")

    def die(distiller_: dk.Distiller, record: dict | None) -> None:
        if distiller_.step == spec.get("die_after"):
            os.kill(os.getpid(), signal.SIGKILL)  # a crash: no cleanup, no final save

    run_ = distiller(spec, accelerator, callbacks=[die])
    sharded = type(next(run_.student.parameters())).__name__
    if spec.get("evaluate_alone"):
        if accelerator.is_main_process:
            run_.evaluate()
        else:
            time.sleep(3 * spec["timeout_s"])  # alive, but never joining the collective
        return
    result = run_.fit(resume=spec.get("resume", False))
    run_.export_student(out / "student")
    if accelerator.is_main_process:
        train = [r for r in result.history if r["kind"] == "train"]
        summary = {
            "steps": [r["step"] for r in train],
            "losses": [r["total"] for r in train],
            "grad_norms": [r["grad_norm"] for r in train],
            "eval": {"loss": result.final["eval_loss"], "count": result.final["eval_count"]},
            "is_fsdp2": bool(accelerator.is_fsdp2),
            "sharded": sharded,
            "output_dir": spec["output_dir"],
            "refusals": messages,
            "seconds": time.perf_counter() - started,
        }
        (out / "result.json").write_text(json.dumps(summary, indent=1))


# ---- the one-process reference -----------------------------------------------------------


def _logits_and_labels(kind: str, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., C) logits and their (...) labels; GPT-2 predicts token t + 1 at position t."""
    if kind == "mlp":
        inputs, labels = batch
        return model(inputs), labels
    logits = model(input_ids=batch["input_ids"]).logits
    return logits[:, :-1], batch["labels"][:, 1:]  # (B, L-1, V), (B, L-1)


def reference(spec: dict[str, Any], world_size: int = 2) -> dict[str, Any]:
    """One plain PyTorch process over the whole global batch (``world_size`` loader batches
    per micro-batch): full logits and ``dk.kd_loss`` divided by the step's valid count,
    ``torch.nn.utils.clip_grad_norm_``, AdamW without weight decay (the Distiller's)."""
    kind, steps, k = spec["model"], spec["steps"], spec["grad_accum"]
    student, teacher = models(kind)
    teacher.eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(student.parameters(), lr=LEARNING_RATE, weight_decay=0.0)
    batches = list(train_loader(kind, steps, k, world_size, MICRO_BATCH * world_size))
    norms, losses = [], []
    for step in range(steps):
        micro = [_logits_and_labels(kind, student, b) for b in batches[step * k : (step + 1) * k]]
        count = sum(int(labels.ne(-100).sum()) for _, labels in micro)
        total = torch.zeros(())
        for (logits, labels), batch in zip(micro, batches[step * k : (step + 1) * k]):
            with torch.no_grad():
                teacher_logits, _ = _logits_and_labels(kind, teacher, batch)
            loss = dk.kd_loss(
                logits, teacher_logits, labels, temperature=TEMPERATURE, alpha=ALPHA,
                normalizer=float(count),
            ).total  # fmt: skip
            total += loss.detach()
            loss.backward()
        losses.append(float(total))
        norms.append(
            float(torch.nn.utils.clip_grad_norm_(student.parameters(), spec["max_grad_norm"]))
        )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    loss_sum, count = 0.0, 0
    with torch.no_grad():
        for batch in eval_loader(kind):
            logits, labels = _logits_and_labels(kind, student.eval(), batch)
            loss_sum += float(
                torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum"
                )
            )
            count += int(labels.ne(-100).sum())
    return {
        "state": {k: v.detach().clone() for k, v in student.state_dict().items()},
        "grad_norms": norms, "losses": losses, "eval": {"loss": loss_sum / count, "count": count},
    }  # fmt: skip


if __name__ == "__main__":
    torch.set_num_threads(1)
    run(json.loads(sys.argv[1]), Path(sys.argv[2]))
    dk.train.end_processes()
