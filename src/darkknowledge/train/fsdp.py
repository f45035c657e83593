"""FSDP2 for the Distiller: what is accepted, what is refused, and what changes under it.

A user asks for FSDP the way Accelerate does, never through a Distiller argument:
``accelerate launch --use_fsdp --fsdp_version 2 ...`` (or an Accelerate config with
``distributed_type: FSDP`` and ``fsdp_version: 2``), or a ready ``Accelerator`` handed to
``Distiller(accelerator=...)``. Accelerate then prepares the student with
``torch.distributed.fsdp.fully_shard``: its parameters, gradients and optimizer state are
sharded over the processes. The teacher is not prepared (each process holds a whole frozen
copy), as under DDP.

What changes under FSDP2 (and only there):

- the gradient norm of ``clip_grad_norm_`` is a replicated ``DTensor``: :func:`full_tensor`
  reads it without communication;
- checkpoints hold the student and optimizer as shards, written and read by every process
  through ``torch.distributed.checkpoint`` (:func:`save_sharded`, :func:`load_sharded`);
- every forward all-gathers parameters, so evaluation runs the same number of forwards on
  every process (the Distiller pads every run that way, see ``Distiller.evaluate``).

Refused, each with its reason: FSDP1 (only FSDP2 is tested), torch < 2.6 and accelerate < 1.6
(no public ``fully_shard`` / no ``fsdp_version``), FSDP asked for on CPU (Accelerate shards only
on GPU-like devices and silently runs plain DDP instead), a ``LearnableTemperature`` (Accelerate
prepares one model under FSDP2, and the temperature's parameters cannot join the student's
sharded optimizer), and fp16 without Accelerate's grad scaler.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from accelerate import DistributedType

from .dcp_metadata import check_metadata

MIN_TORCH, MIN_ACCELERATE = "2.6", "1.6"
SHARDED = "sharded"  # the checkpoint sub-folder of torch.distributed.checkpoint's files
_LAUNCH = "accelerate launch --use_fsdp --fsdp_version 2"


def requested() -> bool:
    """Whether ``accelerate launch`` (its flags or config) or an FSDP plugin asked for FSDP."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def is_sharded(accelerator: Any) -> bool:
    """Whether ``accelerator`` shards the student with FSDP (checked to be FSDP2)."""
    return accelerator.distributed_type == DistributedType.FSDP


def check_versions(torch_version: str, accelerate_version: str) -> None:
    """Refuse versions without FSDP2: ``fully_shard`` is public from torch 2.6, and
    ``FullyShardedDataParallelPlugin(fsdp_version=2)`` exists from accelerate 1.6.

    >>> check_versions("2.6.0+cpu", "1.6.0")
    >>> check_versions("2.5.1", "1.15.0")
    Traceback (most recent call last):
    ...
    ValueError: FSDP under dk.Distiller needs torch >= 2.6 (FSDP2, fully_shard), got torch 2.5.1; ...
    """
    from packaging.version import Version

    found = {"torch": torch_version, "accelerate": accelerate_version}
    needed = {
        "torch": (MIN_TORCH, "FSDP2, fully_shard"),
        "accelerate": (MIN_ACCELERATE, "fsdp_version=2"),
    }
    for name, (minimum, what) in needed.items():
        if Version(found[name].split("+")[0]) < Version(minimum):
            raise ValueError(
                f"FSDP under dk.Distiller needs {name} >= {minimum} ({what}), got {name} "
                f"{found[name]}; upgrade it, or run without FSDP (plain DDP)"
            )


def check_request(cpu_only: bool) -> None:
    """Before building an Accelerator for an FSDP launch: versions, FSDP version, device."""
    import accelerate

    check_versions(torch.__version__, accelerate.__version__)
    version = os.environ.get("FSDP_VERSION", "1")
    if version != "2":
        raise ValueError(
            f"dk.Distiller runs FSDP2 only, got fsdp_version={version} (FSDP1); launch with "
            f"`{_LAUNCH}` or set fsdp_version: 2 in the Accelerate config"
        )
    if cpu_only:
        raise ValueError(_CPU_REFUSAL)


_CPU_REFUSAL = (
    "FSDP was requested (accelerate launch --use_fsdp, or an FSDP config) but there is no GPU: "
    "Accelerate shards only on GPUs and similar devices, and on CPU it silently runs plain DDP "
    "instead (each process holding the whole student), so dk.Distiller refuses; on CPU, launch "
    "without FSDP: `accelerate launch --cpu --num_processes 2 ...` or `torchrun ...`"
)


def check_accelerator(accelerator: Any) -> None:
    """Refuse an Accelerator that was asked for FSDP and does not run FSDP2 correctly."""
    if not is_sharded(accelerator):
        if requested():
            raise ValueError(
                f"{_CPU_REFUSAL if accelerator.device.type == 'cpu' else _NOT_SHARDED} "
                f"(Accelerate's distributed type: {accelerator.distributed_type.value})"
            )
        return
    import accelerate

    check_versions(torch.__version__, accelerate.__version__)
    if not getattr(accelerator, "is_fsdp2", False):
        raise ValueError(
            "dk.Distiller runs FSDP2 only, got FSDP1; launch with "
            f"`{_LAUNCH}`, or build FullyShardedDataParallelPlugin(fsdp_version=2)"
        )
    if accelerator.mixed_precision == "fp16" and accelerator.scaler is None:
        raise ValueError(
            "mixed_precision='fp16' under FSDP needs Accelerate's gradient scaler, and this "
            "Accelerator has none (Accelerate creates it only on GPUs); use bf16 or 'no'"
        )


_NOT_SHARDED = (
    "FSDP was requested (accelerate launch --use_fsdp, or an FSDP config) but Accelerate did "
    "not turn it on (one process?), so the student would not be sharded; launch several "
    "processes, or drop the FSDP option"
)


def check_temperature(accelerator: Any, learnable: bool) -> None:
    """A LearnableTemperature is a second trained module, which FSDP2 cannot take."""
    if learnable and is_sharded(accelerator):
        raise ValueError(
            "a LearnableTemperature is not supported under FSDP: Accelerate prepares a single "
            "model under FSDP2 and the temperature's parameters cannot join the student's "
            "sharded optimizer; use a float or a schedule for temperature, or run without FSDP"
        )


def full_tensor(value: Any) -> Any:
    """A DTensor as the plain tensor it stands for (FSDP2's gradient norm is a replicated
    DTensor: no communication); anything else unchanged."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value


def save_sharded(student: torch.nn.Module, optimizer: Any, folder: Path) -> bool:
    """Write this process's shards of the student and of its optimizer state into ``folder``
    (``.metadata`` from the first process, ``__<rank>_0.distcp`` from each, all fsynced).
    A collective: every process calls it, with ``folder`` on a file system they all see.

    Returns whether the optimizer state was saved: an optimizer that has not stepped yet has
    none, and ``torch.distributed.checkpoint`` would create it by a step with lr 0 (an Adam
    "step 1" that would change every later update), so its state is left out."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    inner = _inner(optimizer)
    state = {"model": get_model_state_dict(student)}
    if inner.state:
        state["optimizer"] = get_optimizer_state_dict(student, inner)
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(folder), sync_files=True))
    return "optimizer" in state


def load_sharded(
    student: torch.nn.Module, optimizer: Any, folder: Path, *, with_optimizer: bool
) -> None:
    """Read the shards that :func:`save_sharded` wrote into the live student and optimizer
    (same number of processes); ``with_optimizer=False``: the checkpoint has no optimizer
    state, and the optimizer starts afresh. A collective: every process calls it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    check_metadata(folder)  # DCP unpickles .metadata: vet it first (it could run code)
    inner = _inner(optimizer)
    state = {"model": get_model_state_dict(student)}  # the shards to fill, in place
    if with_optimizer:
        state["optimizer"] = get_optimizer_state_dict(student, inner)
    dcp.load(state, storage_reader=dcp.FileSystemReader(str(folder)))
    set_model_state_dict(student, state["model"])
    if with_optimizer:
        set_optimizer_state_dict(student, inner, state["optimizer"])
    else:
        inner.state.clear()


def _inner(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside Accelerate's wrapper (``get_state_dict`` wants its
    ``param_groups`` and ``state``, which the wrapper forwards anyway)."""
    return getattr(optimizer, "optimizer", optimizer)
