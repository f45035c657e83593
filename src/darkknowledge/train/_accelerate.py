"""What the Distiller needs from Accelerate beyond its public API, isolated here with the reason.

1. ``AcceleratorState`` is a process-wide singleton that refuses a second ``Accelerator`` with
   another ``mixed_precision`` ("restart your runtime"). Notebooks and test suites build
   several Distillers in one process, so a different setting resets the singleton through its
   private ``_reset_state()``: Accelerate has no public way to do it.
2. Accelerate's optimizer wrapper probes for an optional package on every ``step()`` and
   inspects a signature on every ``zero_grad()`` (together about 0.5 ms of Python per step in
   accelerate 1.15). Without a grad scaler and on plain DDP (or one process) it does nothing
   else, so the inner optimizer (its public ``.optimizer`` attribute) is stepped directly.
3. DeepSpeed steps its engine after every micro-batch, while the Distiller accumulates itself
   (normalising by the global count of the whole step), so it would take k optimizer steps per
   step; FSDP's evaluation with uneven shards, resume and clipping are untested here. Both are
   refused with a clear error rather than run wrongly.
"""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator, DistributedType
from accelerate.state import AcceleratorState
from accelerate.utils import DataLoaderConfiguration

# Distributed types on which the optimizer wrapper is a pass-through (see 2. above).
_PLAIN = (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)
_REFUSED = {
    "DEEPSPEED": "DeepSpeed steps its engine after every micro-batch while the Distiller "
    "accumulates grad_accum_steps micro-batches itself, which would take several optimizer "
    "steps per step",
    "FSDP": "FSDP (sharded students: evaluation, resume and gradient clipping) is not "
    "supported by the Distiller yet",
    "MEGATRON_LM": "Megatron-LM is not supported by the Distiller",
}
_ENVIRONMENT = {
    "ACCELERATE_USE_DEEPSPEED": "DEEPSPEED",
    "ACCELERATE_USE_FSDP": "FSDP",
    "ACCELERATE_USE_MEGATRON_LM": "MEGATRON_LM",
}


def check_distributed_type(distributed_type: DistributedType | str) -> None:
    """Raise ``ValueError`` for the set-ups the Distiller refuses (see the module docstring).

    >>> check_distributed_type(DistributedType.MULTI_GPU)
    >>> check_distributed_type("DEEPSPEED")
    Traceback (most recent call last):
    ...
    ValueError: dk.Distiller does not run under DeepSpeed: ...
    """
    name = getattr(distributed_type, "value", distributed_type)
    if name in _REFUSED:
        shown = {"DEEPSPEED": "DeepSpeed", "FSDP": "FSDP", "MEGATRON_LM": "Megatron-LM"}[name]
        raise ValueError(
            f"dk.Distiller does not run under {shown}: {_REFUSED[name]}; run it on one process "
            "or plain DDP (accelerate launch without a DeepSpeed/FSDP config, or torchrun)"
        )


def make_accelerator(mixed_precision: str) -> Accelerator:
    """An Accelerator for one Distiller: CPU backend (gloo) for several processes without a
    GPU, seedable sampler (a resumed run sees the same batches), no accumulation of its own."""
    for variable, name in _ENVIRONMENT.items():  # set by `accelerate launch` from its config
        if os.environ.get(variable, "false").lower() == "true":
            check_distributed_type(name)  # before Accelerate tries to import the package
    state = AcceleratorState._shared_state  # private: see 1. in the module docstring
    if state and state.get("_mixed_precision") not in (None, mixed_precision):
        AcceleratorState._reset_state()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    cpu_only = not torch.cuda.is_available() and not (
        hasattr(torch, "xpu") and torch.xpu.is_available()
    )
    accelerator = Accelerator(
        cpu=cpu_only and world_size > 1,
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=1,  # the Distiller accumulates, normalising by global counts
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    check_distributed_type(accelerator.distributed_type)
    return accelerator


def plain_steps(accelerator: Accelerator) -> bool:
    """Whether ``backward`` and the optimizer may bypass Accelerate's wrappers (see 2.)."""
    return accelerator.scaler is None and accelerator.distributed_type in _PLAIN


def step_optimizer(optimizer: torch.optim.Optimizer, plain: bool) -> None:
    """``step()`` then ``zero_grad(set_to_none=True)``, on the inner optimizer when ``plain``."""
    inner = optimizer.optimizer if plain else optimizer
    inner.step()
    inner.zero_grad(set_to_none=True)
