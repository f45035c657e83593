"""NaN or Inf in a step's loss or gradients: stop the run (default) or skip the step.

Each step yields four flags, on the device: the soft, hard and total loss parts (summed over
the step's micro-batches) and the gradient norm are not finite. The gradient norm is the
clipping norm with ``max_grad_norm``; otherwise, with ``on_nonfinite="skip"`` only, the norm
of every trainable gradient. (Under an fp16 grad scaler the gradient is left to the scaler,
which skips such steps itself.)

- ``"stop"`` (default): no host sync. Each step keeps its loss parts (one stack, detached)
  and gradient norm; at log steps, before checkpoints and every 64 steps they are folded, on
  the device, into a small tensor (steps seen non-finite, the first one's step and flags),
  which is copied to the host behind the work of each log step and read one step later, as the
  log record is (:mod:`.logging`), and read at once before every checkpoint. A non-finite step
  thus stops the run with :class:`NonFiniteLoss` naming the first such step and its term, at
  the latest at the next log step or checkpoint, and no checkpoint is written after it: the
  last good one stays the newest. Without clipping a non-finite gradient under a finite loss
  is seen one step later, in the loss of the weights it made non-finite.
- ``"skip"``: the flags are read before the optimizer step (one host sync per step, as an
  fp16 grad scaler's check costs; with several processes, one more all-reduce of 4 numbers),
  and a non-finite step makes no update: its gradients are dropped. ``nonfinite_steps`` in
  the train record counts the steps skipped so far (kept in checkpoints).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .distributed import reduce_sum
from .failures import NonFiniteLoss

POLICIES = ("stop", "skip")
TERMS = ("soft loss", "hard loss", "total loss", "gradient")
# State of the stop policy: [steps seen non-finite, first such step, its four flags].
_COUNT, _FIRST, _FLAGS = 0, 1, slice(2, 6)
_FOLD_EVERY = 64  # "stop": steps kept before they are folded into the state


def check_policy(on_nonfinite: Any) -> str:
    if on_nonfinite not in POLICIES:
        raise ValueError(f"on_nonfinite must be one of {POLICIES}, got {on_nonfinite!r}")
    return on_nonfinite


def describe(flags: list[bool]) -> str:
    """The terms a step's flags name.

    >>> describe([True, False, True, False]), describe([False, False, False, True])
    ('soft loss', 'gradient (its loss was finite)')
    >>> describe([True, True, True, True])
    'soft loss and hard loss'
    """
    named = [TERMS[i] for i in (0, 1) if flags[i]]
    if named:
        return " and ".join(named)
    if flags[2]:
        return TERMS[2]
    return f"{TERMS[3]} (its loss was finite)"


class NonFiniteMonitor:
    """The Distiller's watch over non-finite steps (see the module docstring)."""

    def __init__(self, on_nonfinite: str) -> None:
        self.policy = check_policy(on_nonfinite)
        self.skipped = 0  # "skip": steps skipped so far in this run (restored on resume)
        self._state: torch.Tensor | None = None  # "stop": (6,) float32 on the device
        self._steps: list[tuple[int, torch.Tensor, torch.Tensor | None]] = []  # not yet folded
        self._pending: tuple[torch.Tensor, Any] | None = None

    # ---- every step ----------------------------------------------------------------------

    def check_step(
        self,
        accelerator: Any,
        step: int,
        outputs: list,
        grad_norm: torch.Tensor | None,
        parameters: Callable[[], list[torch.nn.Parameter]],
    ) -> bool:
        """Look at step ``step`` (1-based, as logged) after its backward pass and clipping;
        True: skip its optimizer update. Only ``"skip"`` reads the device (a host sync);
        ``"stop"`` keeps the step's numbers and looks at them in bulk (:meth:`_fold`)."""
        if len(outputs) == 1:  # (3,): total, soft, hard (KDLoss's order)
            parts = torch.stack(outputs[0].loss).detach()
        else:  # summed over the micro-batches
            parts = torch.stack([torch.stack(o.loss) for o in outputs]).detach().sum(0)
        if accelerator.scaler is not None:  # fp16: the grad scaler skips inf gradients itself
            grad_norm = None
        if self.policy == "stop":
            self._steps.append((step, parts, grad_norm))
            if len(self._steps) >= _FOLD_EVERY:
                self._fold()
            return False
        if grad_norm is None and accelerator.scaler is None:
            grad_norm = _gradient_norm(parameters())
        flags = _flags(parts[None], None if grad_norm is None else grad_norm.reshape(1))
        flags = reduce_sum(accelerator, flags[0].float())  # every process skips the same steps
        if not bool(flags.any()):
            return False
        self.skipped += 1
        return True

    def _fold(self) -> None:
        """The kept steps into the state (no host sync): the count, and the first one's step
        and flags unless an earlier step was non-finite already."""
        if not self._steps:
            return
        first_step, device = self._steps[0][0], self._steps[0][1].device
        parts = torch.stack([p for _, p, _ in self._steps])  # (n, 3)
        grads = None
        if self._steps[0][2] is not None:
            grads = torch.stack(
                [g.detach().float().reshape(()).to(device) for *_, g in self._steps]
            )
        flags = _flags(parts, grads)  # (n, 4)
        bad = flags.any(1)  # (n,)
        index = bad.float().argmax()  # the first non-finite step of these (0 if none)
        found = torch.cat([bad.sum().float().reshape(1), (index + first_step).float().reshape(1),
                           flags[index].float()])  # fmt: skip
        if self._state is None:
            self._state = torch.zeros(6, device=device)
        earlier = self._state[_COUNT] > 0
        count = self._state[_COUNT] + found[_COUNT]
        self._state = torch.where(earlier, self._state, found)
        self._state[_COUNT] = count
        self._steps = []

    # ---- log steps and checkpoints ("stop") ----------------------------------------------

    def record_fields(self) -> dict[str, int]:
        """What the train record shows: ``nonfinite_steps`` under ``"skip"``."""
        return {"nonfinite_steps": self.skipped} if self.policy == "skip" else {}

    def snapshot(self, accelerator: Any) -> None:
        """At a log step: copy the state to the host behind the step's work (read by
        :meth:`stop_if_seen` when the record is logged, one step later)."""
        self._fold()
        state = self._agreed(accelerator)
        if state is None:
            return
        if state.is_cuda:
            host = torch.empty(state.shape, pin_memory=True)
            host.copy_(state, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending = (host, event)
        else:
            self._pending = (state, None)

    def stop_if_seen(self, checkpoint: Path | None) -> None:
        """Raise :class:`NonFiniteLoss` if the snapshot of the last log step saw a non-finite
        step (waits for that snapshot only)."""
        if self._pending is None:
            return
        host, event = self._pending
        self._pending = None
        if event is not None:
            event.synchronize()
        self._raise_if_bad(host.tolist(), checkpoint)

    def stop_before_saving(self, accelerator: Any, checkpoint: Path | None) -> None:
        """Before a checkpoint: raise if any step so far was non-finite (reads the device now;
        a collective with several processes, which every process reaches)."""
        self._fold()
        state = self._agreed(accelerator)
        if state is not None:
            self._raise_if_bad(state.tolist(), checkpoint)

    def _agreed(self, accelerator: Any) -> torch.Tensor | None:
        """The state of the process that saw the earliest non-finite step (every process
        ends up with the same one, so all stop together)."""
        if self.policy != "stop" or self._state is None:
            return None
        if accelerator.num_processes == 1:
            return self._state
        states = accelerator.gather(self._state[None])  # (processes, 6)
        seen = states[:, _COUNT] > 0
        order = torch.where(seen, states[:, _FIRST], torch.full_like(states[:, _FIRST], 2**24))
        return states[order.argmin()]

    @staticmethod
    def _raise_if_bad(state: list[float], checkpoint: Path | None) -> None:
        if state[_COUNT] == 0:
            return
        kept = (
            f"the last good checkpoint is {checkpoint}"
            if checkpoint is not None
            else "no checkpoint was saved before it"
        )
        raise NonFiniteLoss(
            f"non-finite {describe([f > 0 for f in state[_FLAGS]])} (NaN or Inf) at step "
            f"{int(state[_FIRST])}; the run stopped and saved nothing after it: {kept}; "
            "on_nonfinite='skip' (train.on_nonfinite: skip) skips such steps instead"
        )


def _flags(parts: torch.Tensor, grads: torch.Tensor | None) -> torch.Tensor:
    """``(n, 4)`` bool: soft, hard, total, gradient not finite, from loss parts ``(n, 3)``
    (total, soft, hard) and gradient norms ``(n,)`` (None: not known, taken as finite)."""
    bad = ~torch.isfinite(parts)
    gradient = torch.zeros_like(bad[:, :1]) if grads is None else ~torch.isfinite(grads)[:, None]
    return torch.cat([bad[:, 1:], bad[:, :1], gradient.to(bad.device)], dim=1)


def _gradient_norm(parameters: list[torch.nn.Parameter]) -> torch.Tensor:
    """The 2-norm of every gradient (this process's shards under FSDP), on one device: NaN or
    Inf if any gradient holds one."""
    grads = [p.grad for p in parameters if p.grad is not None]
    grads = [g.to_local() if hasattr(g, "to_local") else g for g in grads]  # FSDP2's DTensors
    if not grads:
        return torch.zeros(())
    total_norm = getattr(torch.nn.utils, "get_total_norm", None)  # torch >= 2.6
    if total_norm is not None:
        return total_norm(grads)
    device = grads[0].device
    return torch.linalg.vector_norm(torch.stack([g.float().norm().to(device) for g in grads]))
