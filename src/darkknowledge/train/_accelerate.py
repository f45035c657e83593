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
   step: it is refused with a clear error rather than run wrongly. FSDP is accepted as FSDP2
   only, with the checks and changes of :mod:`.fsdp`.
4. A collective that one process never joins (a call made on one process only) would wait
   forever: the process group gets an explicit timeout (:data:`PROCESS_GROUP_TIMEOUT`, or
   ``DK_COLLECTIVE_TIMEOUT_S`` seconds from the environment), after which gloo raises (turned
   into a clear error by :func:`.distributed.explain_failures`) and NCCL's watchdog ends the
   process.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
from accelerate import Accelerator, DistributedType
from accelerate.state import AcceleratorState
from accelerate.utils import DataLoaderConfiguration, InitProcessGroupKwargs

from . import fsdp

# How long a collective waits for the other processes (see 4. above): a checkpoint of a large
# student, or a slow teacher on one process, must fit in it.
PROCESS_GROUP_TIMEOUT = timedelta(minutes=30)
TIMEOUT_VARIABLE = "DK_COLLECTIVE_TIMEOUT_S"

# Distributed types on which the optimizer wrapper is a pass-through (see 2. above).
_PLAIN = (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)
_REFUSED = {
    "DEEPSPEED": "DeepSpeed steps its engine after every micro-batch while the Distiller "
    "accumulates grad_accum_steps micro-batches itself, which would take several optimizer "
    "steps per step",
    "MEGATRON_LM": "Megatron-LM is not supported by the Distiller",
}
_ENVIRONMENT = {
    "ACCELERATE_USE_DEEPSPEED": "DEEPSPEED",
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
        shown = {"DEEPSPEED": "DeepSpeed", "MEGATRON_LM": "Megatron-LM"}[name]
        raise ValueError(
            f"dk.Distiller does not run under {shown}: {_REFUSED[name]}; run it on one process, "
            "plain DDP (accelerate launch without a DeepSpeed config, or torchrun) or FSDP2"
        )


def make_accelerator(mixed_precision: str) -> Accelerator:
    """An Accelerator for one Distiller: CPU backend (gloo) for several processes without a
    GPU, seedable sampler (a resumed run sees the same batches), no accumulation of its own,
    a bounded wait in collectives. FSDP when ``accelerate launch`` asks for it (FSDP2 only)."""
    for variable, name in _ENVIRONMENT.items():  # set by `accelerate launch` from its config
        if os.environ.get(variable, "false").lower() == "true":
            check_distributed_type(name)  # before Accelerate tries to import the package
    cpu_only = not torch.cuda.is_available() and not (
        hasattr(torch, "xpu") and torch.xpu.is_available()
    )
    if fsdp.requested():
        fsdp.check_request(cpu_only)  # before Accelerate silently falls back to DDP on CPU
    state = AcceleratorState._shared_state  # private: see 1. in the module docstring
    if state and state.get("_mixed_precision") not in (None, mixed_precision):
        AcceleratorState._reset_state()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    accelerator = Accelerator(
        cpu=cpu_only and world_size > 1,
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=1,  # the Distiller accumulates, normalising by global counts
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=collective_timeout())],
    )
    check_accelerator(accelerator)
    return accelerator


def collective_timeout() -> timedelta:
    """:data:`PROCESS_GROUP_TIMEOUT`, or ``DK_COLLECTIVE_TIMEOUT_S`` seconds when it is set
    (a number > 0; it applies when the process group is created, i.e. by the first Distiller).

    >>> os.environ["DK_COLLECTIVE_TIMEOUT_S"] = "20"; collective_timeout().total_seconds()
    20.0
    >>> os.environ["DK_COLLECTIVE_TIMEOUT_S"] = "soon"; collective_timeout()
    Traceback (most recent call last):
    ...
    ValueError: DK_COLLECTIVE_TIMEOUT_S must be a number of seconds > 0, got 'soon'
    >>> del os.environ["DK_COLLECTIVE_TIMEOUT_S"]
    """
    text = os.environ.get(TIMEOUT_VARIABLE)
    if text is None:
        return PROCESS_GROUP_TIMEOUT
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0 or seconds == float("inf"):
        raise ValueError(f"{TIMEOUT_VARIABLE} must be a number of seconds > 0, got {text!r}")
    return timedelta(seconds=seconds)


def accelerator_for(given: Accelerator | None, mixed_precision: str) -> Accelerator:
    """``given``, checked (see :func:`check_accelerator`), or a new one (:func:`make_accelerator`)."""
    if given is None:
        return make_accelerator(mixed_precision)
    check_accelerator(given, mixed_precision)
    return given


def check_accelerator(accelerator: Accelerator, mixed_precision: str | None = None) -> None:
    """Refuse an Accelerator the Distiller cannot train with correctly. ``mixed_precision``:
    the Distiller's argument, checked against a given Accelerator's own setting."""
    if not isinstance(accelerator, Accelerator):
        raise TypeError(
            f"accelerator must be an accelerate.Accelerator, got {type(accelerator).__name__}"
        )
    check_distributed_type(accelerator.distributed_type)
    fsdp.check_accelerator(accelerator)
    if mixed_precision not in (None, "no", accelerator.mixed_precision):
        raise ValueError(
            f"mixed_precision={mixed_precision!r} differs from the given accelerator's "
            f"{accelerator.mixed_precision!r}; set it on the Accelerator"
        )
    if accelerator.gradient_accumulation_steps != 1:
        raise ValueError(
            "the given accelerator has gradient_accumulation_steps="
            f"{accelerator.gradient_accumulation_steps}; build it with 1 and pass "
            "grad_accum_steps to the Distiller, which normalises by the global count"
        )
    config = getattr(accelerator, "dataloader_config", None)
    if not getattr(config, "use_seedable_sampler", True):
        raise ValueError(
            "the given accelerator shuffles with an unseeded sampler, so a resumed run would "
            "see other batches; build it with dataloader_config=DataLoaderConfiguration("
            "use_seedable_sampler=True)"
        )


def plain_steps(accelerator: Accelerator) -> bool:
    """Whether ``backward`` and the optimizer may bypass Accelerate's wrappers (see 2.)."""
    return accelerator.scaler is None and accelerator.distributed_type in _PLAIN


def step_optimizer(optimizer: torch.optim.Optimizer, plain: bool, skip: bool = False) -> None:
    """``step()`` then ``zero_grad(set_to_none=True)``, on the inner optimizer when ``plain``;
    ``skip``: the gradients are dropped without a step (a non-finite step)."""
    inner = optimizer.optimizer if plain else optimizer
    if not skip:
        inner.step()
    inner.zero_grad(set_to_none=True)
