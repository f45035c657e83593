"""FSDP2 through Hugging Face Accelerate on CPU processes (gloo): the Distiller's calls in miniature.

Launched by test_train_fsdp.py as

    python -m torch.distributed.run --standalone --nproc_per_node 2 fsdp_worker.py SPEC_JSON OUT

``train`` makes the calls the Distiller makes, in its order: ``accelerator.prepare(student,
optimizer, loader)``, one global-count normaliser per step (each process divides its summed
loss by ``global_count / world_size``), the micro-batches' backward passes under
``accelerator.no_sync`` except the last, ``accelerator.clip_grad_norm_``, the optimizer step,
evaluation where process r takes batches r, r + W, ..., sharded checkpoints through
``torch.distributed.checkpoint`` and a full state dict for the export. The teacher is never
prepared: each process holds a whole frozen copy. ``reference_train`` is the same optimisation
in one plain PyTorch process over the whole global batch, the independent reference.

Accelerate (1.6 to 1.15 at least) switches to FSDP only for GPU-like devices: on CPU it keeps
``DistributedType.MULTI_CPU`` and silently ignores the FSDP plugin (plain DDP). ``make_accelerator``
therefore sets Accelerate's distributed type to FSDP after construction, so that Accelerate's own
FSDP2 code (``fully_shard`` in ``prepare``, ``no_sync``, ``clip_grad_norm_``, ``get_state_dict``)
runs on CPU exactly as it runs on GPUs.
"""

from __future__ import annotations

import contextlib
import json
import math
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
    """(student, teacher)."""
    if kind == "mlp":
        return mlp(0), teacher_mlp()
    if kind == "gpt2":
        from tiny_models import tiny_gpt2  # imports transformers: only when needed (seconds)

        return tiny_gpt2(0, vocab_size=VOCAB), tiny_gpt2(1, n_embd=24, vocab_size=VOCAB)
    raise ValueError(f"model must be 'mlp' or 'gpt2', got {kind!r}")


def dataset(kind: str, rows: int, seed: int = 0) -> TensorDataset:
    """Rows with some ignored labels, so micro-batches have uneven valid counts."""
    if kind == "mlp":
        return points(rows, seed=seed, ignore_every=3)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (rows, LENGTH), generator=generator)
    labels = ids.clone()
    labels[torch.rand(rows, LENGTH, generator=generator) < 0.3] = -100
    return TensorDataset(ids, labels)


def logits_and_labels(kind: str, model, inputs, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., C) logits and their (...) labels; GPT-2 predicts token t + 1 at position t."""
    if kind == "mlp":
        return model(inputs), labels
    return model(input_ids=inputs).logits[:, :-1], labels[:, 1:]  # (B, L-1, V), (B, L-1)


def micro_batch_loss(kind, student, teacher, batch, normalizer) -> torch.Tensor:
    inputs, labels = batch
    student_logits, targets = logits_and_labels(kind, student, inputs, labels)
    with torch.no_grad():  # the teacher: a whole frozen copy on every process, never prepared
        teacher_logits, _ = logits_and_labels(kind, teacher, inputs, labels)
    return dk.kd_loss(
        student_logits, teacher_logits, targets, temperature=TEMPERATURE, alpha=ALPHA,
        normalizer=normalizer,
    ).total  # fmt: skip


def valid_count(kind: str, labels: torch.Tensor) -> torch.Tensor:
    return (labels if kind == "mlp" else labels[:, 1:]).ne(-100).sum()


def eval_sums(kind: str, model, batch) -> torch.Tensor:
    """(2,): summed hard cross-entropy over valid positions, and their count."""
    inputs, labels = batch
    logits, targets = logits_and_labels(kind, model, inputs, labels)
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="sum"
    )
    return torch.stack([loss, valid_count(kind, labels).float()])


def train_rows(steps: int, grad_accum: int, world_size: int) -> int:
    return steps * grad_accum * world_size * MICRO_BATCH


def eval_batches(kind: str) -> list:
    return list(DataLoader(dataset(kind, EVAL_ROWS, seed=1), batch_size=EVAL_BATCH))


# ---- the Accelerator ---------------------------------------------------------------------


def make_accelerator(
    use_fsdp: bool,
    *,
    mixed_precision: str = "no",
    timeout_s: float = 60.0,
    auto_wrap_policy: str = "no_wrap",
    **options: Any,
):
    """An Accelerator on CPU processes (gloo); with ``use_fsdp``, FSDP2 (``fully_shard``).
    ``auto_wrap_policy="transformer_based_wrap"`` makes one FSDP unit per entry of a Hugging
    Face model's ``_no_split_modules`` (GPT2Block) besides the root; "no_wrap": the root only.
    ``options`` go to ``Accelerator`` (e.g. ``dataloader_config``)."""
    from accelerate import Accelerator, DistributedType, FullyShardedDataParallelPlugin
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import InitProcessGroupKwargs

    handlers = [InitProcessGroupKwargs(backend="gloo", timeout=timedelta(seconds=timeout_s))]
    if not use_fsdp:
        return Accelerator(
            cpu=True, mixed_precision=mixed_precision, kwargs_handlers=handlers, **options
        )
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy=auto_wrap_policy, reshard_after_forward=True
    )
    accelerator = Accelerator(
        cpu=True, mixed_precision=mixed_precision, fsdp_plugin=plugin, kwargs_handlers=handlers,
        **options,
    )  # fmt: skip
    if accelerator.distributed_type == DistributedType.MULTI_CPU:
        # Accelerate ignored the plugin (CPU): set the distributed type it would have chosen on a
        # GPU. Both shared states: AcceleratorState() re-reads PartialState's on construction.
        if mixed_precision != "no":
            plugin.set_mixed_precision(mixed_precision)
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        AcceleratorState._shared_state["distributed_type"] = DistributedType.FSDP
        AcceleratorState._shared_state["fsdp_plugin"] = plugin
    if not accelerator.is_fsdp2:
        raise RuntimeError(f"FSDP2 was not enabled: {accelerator.distributed_type}")
    return accelerator


def full_value(tensor: torch.Tensor) -> float:
    """A (possibly DTensor) scalar as a float: FSDP2's clip_grad_norm_ returns a DTensor."""
    return float(tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor)


# ---- evaluation --------------------------------------------------------------------------


@torch.no_grad()
def evaluate(accelerator, kind: str, student, batches, *, pad: bool) -> dict[str, float]:
    """Process r takes batches r, r + W, ... . Under FSDP every forward is a collective (it
    all-gathers the parameters), so with ``pad`` every process runs ceil(N / W) forwards: one
    that ran out of batches runs the first batch again and discards the result. Every process
    iterates all batches, so each knows N without a collective."""
    world, rank = accelerator.num_processes, accelerator.process_index
    sums, first, mine, total = torch.zeros(2), None, 0, 0
    student.eval()
    for index, batch in enumerate(batches):
        first = batch if first is None else first
        total += 1
        if index % world != rank:
            continue
        sums += eval_sums(kind, student, batch)
        mine += 1
    if pad and first is not None:
        for _ in range(math.ceil(total / world) - mine):
            logits_and_labels(kind, student, *first)  # result discarded
    student.train()
    sums = accelerator.reduce(sums, reduction="sum") if world > 1 else sums
    return {"loss": float(sums[0] / sums[1].clamp_min(1)), "count": float(sums[1])}


# ---- checkpoints -------------------------------------------------------------------------


def save_checkpoint(accelerator, student, optimizer, directory: Path, step: int) -> Path:
    """Sharded: each process writes its own shards of the model and the optimizer state
    (torch.distributed.checkpoint), into a temporary folder that the main process renames."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    final, tmp = directory / f"step-{step:08d}", directory / f".tmp-step-{step:08d}"
    model_state, optimizer_state = get_state_dict(student, optimizer)  # collective
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(tmp))
    if accelerator.is_main_process:
        (tmp / "state.json").write_text(json.dumps({"step": step}))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        tmp.rename(final)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, student, optimizer, directory: Path) -> int:
    """The latest complete checkpoint into ``student`` and ``optimizer``; its step (0: none)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    done = sorted(directory.glob("step-*")) if directory.exists() else []
    if not done:
        return 0
    model_state, optimizer_state = get_state_dict(student, optimizer)  # the target shards
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=str(done[-1]))  # in place
    set_state_dict(
        student, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"]
    )
    return json.loads((done[-1] / "state.json").read_text())["step"]


# ---- training ----------------------------------------------------------------------------


def train(
    world_size: int,
    use_fsdp: bool,
    steps: int,
    *,
    model: str = "mlp",
    grad_accum: int = 2,
    max_grad_norm: float | None = None,
    evaluation: str | None = "padded",
    checkpoint_dir: str | None = None,
    save_every: int = 0,
    resume: bool = False,
    die_after: int | None = None,
    mixed_precision: str = "no",
    timeout_s: float = 60.0,
) -> dict[str, Any]:
    """Train the student ``steps`` optimizer steps of ``grad_accum`` micro-batches; returns
    the full student state (main process), the clipped gradient norms, the per-step global
    losses, the final evaluation and timings. ``evaluation``: "padded", "unpadded" or None.
    ``die_after``: SIGKILL every process after that step (a crash, after any save)."""
    started = time.perf_counter()
    wrap = "transformer_based_wrap" if model == "gpt2" else "no_wrap"
    accelerator = make_accelerator(
        use_fsdp, mixed_precision=mixed_precision, timeout_s=timeout_s, auto_wrap_policy=wrap
    )
    if accelerator.num_processes != world_size:
        raise RuntimeError(f"expected {world_size} processes, got {accelerator.num_processes}")
    student, teacher = models(model)
    teacher.eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(student.parameters(), lr=LEARNING_RATE)
    loader = DataLoader(
        dataset(model, train_rows(steps, grad_accum, world_size)), batch_size=MICRO_BATCH
    )
    # Process r gets loader batches r, r + W, ...: one global micro-batch is W loader batches.
    student, optimizer, loader = accelerator.prepare(student, optimizer, loader)
    directory = Path(checkpoint_dir) if checkpoint_dir else None
    start = load_checkpoint(accelerator, student, optimizer, directory) if resume else 0
    batches = list(loader)
    prepared = time.perf_counter()
    norms, losses, deferred = [], [], None
    for step in range(start, steps):
        micro = batches[step * grad_accum : (step + 1) * grad_accum]
        local = torch.stack([valid_count(model, labels) for _, labels in micro]).sum()
        global_count = accelerator.reduce(local.float(), reduction="sum")
        normalizer = global_count.clamp_min(1) / world_size  # FSDP/DDP average over processes
        summed = torch.zeros(())
        for index, batch in enumerate(micro):
            last = index == grad_accum - 1
            with contextlib.nullcontext() if last else accelerator.no_sync(student):
                loss = micro_batch_loss(model, student, teacher, batch, normalizer)
                accelerator.backward(loss)
            if step == start and index == 0 and not last:
                # FSDP2 under no_sync keeps unsharded gradients and sets no sharded .grad yet
                deferred = all(p.grad is None for p in student.parameters())
            summed += loss.detach()
        losses.append(float(accelerator.reduce(summed, reduction="sum")) / world_size)
        if max_grad_norm is not None:
            norm = accelerator.clip_grad_norm_(student.parameters(), max_grad_norm)
            norms.append(full_value(norm))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if directory is not None and save_every and (step + 1) % save_every == 0:
            save_checkpoint(accelerator, student, optimizer, directory, step + 1)
        if die_after == step + 1:
            os.kill(os.getpid(), signal.SIGKILL)
    trained = time.perf_counter()
    metrics = None
    if evaluation is not None:
        metrics = evaluate(
            accelerator, model, student, eval_batches(model), pad=evaluation == "padded"
        )
    # Full (unsharded) tensors on the main process only; a collective, every process calls it.
    state = accelerator.get_state_dict(student)
    return {
        "state": {k: v.detach().clone().contiguous() for k, v in state.items()}
        if accelerator.is_main_process
        else {},
        "grad_norms": norms, "losses": losses, "eval": metrics, "start_step": start,
        "is_fsdp2": bool(accelerator.is_fsdp2), "no_sync_deferred_reduction": deferred,
        "sharded": type(next(student.parameters())).__name__,
        "seconds": {"setup": prepared - started, "train": trained - prepared,
                    "eval_and_export": time.perf_counter() - trained},
        "main": accelerator.is_main_process,
    }  # fmt: skip


def reference_train(
    steps: int, *, model: str = "mlp", grad_accum: int = 2, max_grad_norm: float | None = None,
    world_size: int = 2,
) -> dict[str, Any]:  # fmt: skip
    """One plain PyTorch process over the whole global batch (W loader batches per micro-batch):
    the gradient of Σ loss / global_count, clipped by ``torch.nn.utils.clip_grad_norm_``."""
    student, teacher = models(model)
    teacher.eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(student.parameters(), lr=LEARNING_RATE)
    loader = DataLoader(
        dataset(model, train_rows(steps, grad_accum, world_size)),
        batch_size=MICRO_BATCH * world_size,
    )
    batches = list(loader)
    norms, losses = [], []
    for step in range(steps):
        micro = batches[step * grad_accum : (step + 1) * grad_accum]
        count = torch.stack([valid_count(model, labels) for _, labels in micro]).sum()
        total = torch.zeros(())
        for batch in micro:
            loss = micro_batch_loss(model, student, teacher, batch, count.clamp_min(1).float())
            loss.backward()
            total += loss.detach()
        losses.append(float(total))
        if max_grad_norm is not None:
            norms.append(float(torch.nn.utils.clip_grad_norm_(student.parameters(), max_grad_norm)))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        student.eval()
        sums = sum(eval_sums(model, student, batch) for batch in eval_batches(model))
    return {
        "state": {k: v.detach().clone() for k, v in student.state_dict().items()},
        "grad_norms": norms, "losses": losses,
        "eval": {"loss": float(sums[0] / sums[1]), "count": float(sums[1])},
    }  # fmt: skip


def main(spec_json: str, out: str) -> None:
    """Run ``train(**spec)``; the main process writes OUT/result.json and OUT/student.safetensors."""
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    spec = json.loads(spec_json)
    result = train(**spec)
    if result.pop("main"):
        out_dir = Path(out)
        out_dir.mkdir(parents=True, exist_ok=True)
        save_file(result.pop("state"), str(out_dir / "student.safetensors"))
        (out_dir / "result.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
