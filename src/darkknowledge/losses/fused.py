"""The distillation loss at vocabulary scale, without the full ``(tokens, vocab)`` logits.

    logits = softcap · tanh(scale · (h Wᵀ + b) / softcap)          (softcap optional, Gemma-style)
    L_total = (1 - alpha) · CE(z_s, y) + alpha · T^2 · D(softmax(z_t/T), softmax(z_s/T))

exactly :func:`darkknowledge.kd_loss`'s objective, computed over row chunks of the hidden states.
For each chunk an objective (``_fused_chunks.py``) gives the chunk's loss and its gradient with
respect to the pre-activation logits: the default forward KL at a float temperature in closed
form, everything else by autograd through :func:`kd_loss` itself (so every divergence, the T^2
factor, the hard term and the masking are the one implementation). The loop below turns that
gradient into the student's hidden-state, weight and bias gradients right away; the backward
pass only scales the stored gradients. Memory beyond the inputs, weights and gradients is
O(chunk_size × vocab): 2048 tokens × 128,256 × 4 bytes is 1 GB per copy of the full logits,
and a naive loss keeps several copies for its backward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real

import torch

from . import _checks
from ._fused_chunks import AutogradChunks, ForwardKLChunks, Head
from .kd import KDLoss, SoftScale, resolve_soft_scale
from .reduction import Normalizer, valid_positions
from .transforms import compute_dtype

# Rows per chunk. Measured on CPU at a 128,256 vocabulary (benchmarks/results/fused_kd.md): the
# matrix products run faster on 256 rows than on 128, and the default objective's four float32
# buffers of 256 × 128,256 × 4 bytes (131 MB each) keep the loss's memory beyond its inputs and
# gradients at about 7% of the naive loss's; 512 rows would pass 10%.
DEFAULT_CHUNK_SIZE = 256


@dataclass(frozen=True)
class _ChunkedKD:
    """Everything about one call except the tensors that receive gradients."""

    student: Head
    teacher: Head
    teacher_hidden: torch.Tensor  # (N, H_t)
    labels: torch.Tensor | None  # (N,)
    kd_options: dict
    chunk_size: int
    compile: bool | str = False

    def objective(self, hidden, temperature, need_logits_grad: bool, need_temperature_grad: bool):
        """The per-chunk objective: the closed form for the default, autograd otherwise."""
        if not need_temperature_grad and ForwardKLChunks.applies(self, temperature):
            return ForwardKLChunks(
                self,
                float(temperature),
                rows_per_chunk=min(self.chunk_size, max(hidden.shape[0], 1)),
                math_dtype=compute_dtype(hidden.dtype),
                need_logits_grad=need_logits_grad,
            )
        return AutogradChunks(self, temperature, need_logits_grad, need_temperature_grad)

    def run(
        self,
        hidden: torch.Tensor,
        temperature: float | torch.Tensor,
        needs: tuple[bool, bool, bool, bool],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor | None]]:
        """Loss parts and the gradients of ``total`` for (hidden, weight, bias, temperature).

        ``needs`` says which gradients to compute; the others come back as None.
        """
        weight = self.student.weight
        need_hidden, need_weight, need_bias, need_temperature = needs
        need_logits = need_hidden or need_weight or need_bias
        # float32 math (float64 stays float64), whatever the input dtype.
        math_dtype = compute_dtype(hidden.dtype)
        parts = torch.zeros(3, dtype=math_dtype, device=hidden.device)  # total, soft, hard
        # The weight gradient is a sum of one product per chunk: accumulate it in math_dtype.
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = weight.new_zeros(weight.shape, dtype=math_dtype) if need_weight else None
        grad_bias = weight.new_zeros(weight.shape[0], dtype=math_dtype) if need_bias else None
        if isinstance(temperature, torch.Tensor):
            temperature = temperature.detach().requires_grad_(need_temperature)
        grad_temperature = torch.zeros_like(temperature) if need_temperature else None
        objective = self.objective(hidden, temperature, need_logits, need_temperature)

        for start in range(0, hidden.shape[0], self.chunk_size):
            rows = slice(start, start + self.chunk_size)
            chunk = hidden[rows]  # (n, H_s)
            result = objective(rows, chunk)
            parts += result.parts
            if need_temperature:
                grad_temperature += result.temperature_grad
            if not need_logits:
                continue
            # ∂total/∂z = grad · row_scale: the (n, 1) factor goes on the (n, H) side.
            grad, row_scale = result.logits_grad, result.row_scale
            if need_bias:
                grad_bias += grad.sum(0) if row_scale is None else grad.T @ row_scale.squeeze(-1)
            if row_scale is not None:
                row_scale = row_scale.to(hidden.dtype)
            grad = grad.to(hidden.dtype)
            if need_hidden:
                torch.mm(grad, weight, out=grad_hidden[rows])  # (n, V) @ (V, H_s)
                if row_scale is not None:
                    grad_hidden[rows] *= row_scale
            if need_weight:
                scaled_chunk = chunk if row_scale is None else chunk * row_scale
                if hidden.dtype == math_dtype:
                    grad_weight.addmm_(grad.T, scaled_chunk)  # (V, n) @ (n, H_s)
                else:
                    grad_weight += grad.T @ scaled_chunk
            del result, grad

        total, soft, hard = parts.unbind()
        return total, soft, hard, [grad_hidden, grad_weight, grad_bias, grad_temperature]


class _FusedLinearKD(torch.autograd.Function):
    """Forward computes the loss and its gradients chunk by chunk; backward scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, temperature, spec: _ChunkedKD, full_vocab: int):
        needs = tuple(ctx.needs_input_grad[:4])
        total, soft, hard, grads = spec.run(hidden, temperature, needs)
        grad_hidden, grad_weight, grad_bias, grad_temperature = grads
        if grad_weight is not None:
            grad_weight = _pad_rows(grad_weight, full_vocab).to(weight.dtype)
        if grad_bias is not None:
            grad_bias = _pad_rows(grad_bias, full_vocab).to(bias.dtype)
        ctx.mark_non_differentiable(soft, hard)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias, grad_temperature)
        return total, soft, hard

    @staticmethod
    def backward(ctx, grad_total, _grad_soft, _grad_hard):
        grads = ctx.saved_tensors
        # The usual caller backpropagates the loss itself (grad_total = 1): hand the stored
        # gradients over as they are instead of allocating a scaled copy of the weight gradient.
        if not bool(grad_total == 1):
            grads = tuple(None if g is None else g * grad_total.to(g.dtype) for g in grads)
        return (*grads, None, None)


def _pad_rows(grad: torch.Tensor, rows: int) -> torch.Tensor:
    """Zero gradient for the padding rows cut off by ``vocab_size``."""
    if grad.shape[0] == rows:
        return grad
    full = grad.new_zeros((rows, *grad.shape[1:]))
    full[: grad.shape[0]] = grad
    return full


def fused_linear_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    temperature: float | torch.Tensor,
    alpha: float,
    divergence: str = "forward_kl",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    ignore_index: int = -100,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    normalizer: Normalizer = None,
    reduction: str = "mean",
    beta: float = 0.5,
    lam: float = 0.1,
    soft_scale: SoftScale = "T2",
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
    vocab_size: int | None = None,
    compile: bool | str = False,
) -> KDLoss:
    """:func:`darkknowledge.kd_loss` on ``h Wᵀ + b``, never holding the ``(N, V)`` logits.

    ``logits = scale · (h Wᵀ + b)``, then ``softcap · tanh(logits / softcap)`` if a softcap is
    given, for student and teacher; then exactly ``kd_loss(student_logits, teacher_logits,
    labels, ...)`` with the same options. Gradients flow to ``student_hidden``,
    ``student_weight``, ``student_bias`` and a tensor ``temperature``; none to the teacher.

    Args:
        student_hidden: ``(..., H_s)`` final hidden states of the student, float32 or bfloat16.
        student_weight: ``(V_s, H_s)`` the student's output layer (``lm_head.weight``).
        teacher_hidden: ``(..., H_t)`` with the same leading shape; H_t may differ from H_s.
        teacher_weight: ``(V_t, H_t)``.
        labels: ``(...)`` integer targets, ``ignore_index`` where a position does not count;
            None for pure distillation (alpha = 1).
        temperature, alpha, divergence, ignore_index, normalizer, beta, lam, soft_scale:
            as in :func:`darkknowledge.kd_loss`.
        chunk_size: rows per chunk; memory grows with ``chunk_size × V``.
        reduction: ``"mean"`` (over valid positions, or ``/ normalizer``) or ``"sum"``.
        student_bias, teacher_bias: ``(V_s,)``, ``(V_t,)`` or None.
        student_logit_scale, teacher_logit_scale: multiply the logits (e.g. a tied-embedding
            model's ``1 / sqrt(d)`` or a logit scale from the config).
        student_softcap, teacher_softcap: Gemma's final logit soft-capping, or None.
        vocab_size: the real vocabulary when the two output layers differ only by padding
            rows; both weights (and biases) are cut to their first ``vocab_size`` rows. Needed
            when ``V_s != V_t``; the padding rows of the student get a zero gradient.
        compile: run each chunk's ``kd_loss`` through ``torch.compile``, which fuses its
            softmax and divergence passes; meant for the objectives that go through autograd
            (the default forward KL at a float temperature has a closed form that is as fast
            eager, and ``compile=True`` takes it off that path). The first call compiles (a
            minute); so does a new shape or a new ``alpha``. A float temperature or normalizer
            is turned into a tensor so that schedules do not recompile. Needs a C++ compiler on
            CPU. A string names another ``torch.compile`` backend (``"aot_eager"`` to debug).

    Returns:
        ``KDLoss(total, soft, hard)``, each ``()``. Only ``total`` carries a gradient.

    >>> import torch, darkknowledge as dk
    >>> h_s, w_s = torch.randn(6, 8, requires_grad=True), torch.randn(50, 8, requires_grad=True)
    >>> h_t, w_t = torch.randn(6, 16), torch.randn(50, 16)
    >>> labels = torch.tensor([1, 2, 3, -100, 4, 5])
    >>> fused = dk.fused_linear_kd_loss(h_s, w_s, h_t, w_t, labels, temperature=2.0, alpha=0.9, chunk_size=4)
    >>> full = dk.kd_loss(h_s @ w_s.T, h_t @ w_t.T, labels, temperature=2.0, alpha=0.9)
    >>> bool(torch.allclose(fused.total, full.total))
    True
    >>> fused.total.backward()
    """
    _check_tensor(student_hidden, "student_hidden")
    _check_tensor(teacher_hidden, "teacher_hidden")
    device_type = student_hidden.device.type
    amp_dtype = _autocast_dtype(device_type)
    if amp_dtype is not None:
        # As nn.Linear under autocast: the products run in the autocast dtype (the loss math in
        # float32 as always) and autograd casts the gradients back to the parameters' dtype.
        student_hidden, student_weight, teacher_hidden, teacher_weight = (
            t.to(amp_dtype) if isinstance(t, torch.Tensor) else t
            for t in (student_hidden, student_weight, teacher_hidden, teacher_weight)
        )
        student_bias, teacher_bias = (
            t.to(amp_dtype) if isinstance(t, torch.Tensor) else t
            for t in (student_bias, teacher_bias)
        )
    _check_weight(student_weight, "student_weight", student_hidden, "student_hidden")
    _check_weight(teacher_weight, "teacher_weight", teacher_hidden, "teacher_hidden")
    if student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
        raise ValueError(
            "student_hidden and teacher_hidden must have the same leading (token) shape, got "
            f"{tuple(student_hidden.shape)} and {tuple(teacher_hidden.shape)}"
        )
    if not isinstance(compile, bool | str):
        raise TypeError(f"compile must be a bool or a torch.compile backend name, got {compile!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1, got chunk_size={chunk_size!r}")
    if reduction not in ("mean", "sum"):
        raise ValueError(
            f'reduction must be "mean" or "sum" for the fused loss, got {reduction!r}; per-position '
            'losses ("none") would need the per-position gradients, use dk.kd_loss for those'
        )
    _checks.check_divergence_name(divergence)
    _checks.check_temperature(temperature)
    _checks.check_unit_interval(alpha, "alpha")
    resolve_soft_scale(soft_scale, 1.0)  # validates it before any work is done
    vocab = _shared_vocab(student_weight.shape[0], teacher_weight.shape[0], vocab_size)
    student = _head(
        student_weight, student_bias, "student", vocab, student_logit_scale, student_softcap
    )
    teacher = _head(
        teacher_weight, teacher_bias, "teacher", vocab, teacher_logit_scale, teacher_softcap
    )

    leading_shape = student_hidden.shape[:-1]
    hidden = student_hidden.reshape(-1, student_hidden.shape[-1])  # (N, H_s)
    num_rows = hidden.shape[0]
    if labels is not None:
        _checks.check_labels(labels, leading_shape, vocab, ignore_index)
        labels = labels.reshape(num_rows)
    elif alpha != 1.0:
        raise ValueError(
            f"alpha={alpha!r} < 1 weights a hard cross-entropy term, which needs labels; "
            "pass labels, or alpha=1.0 for pure distillation"
        )
    if isinstance(temperature, torch.Tensor) and temperature.dim() > 0:
        if temperature.shape != leading_shape:
            raise ValueError(
                f"a per-position temperature must have the hidden states' leading shape "
                f"{tuple(leading_shape)}, got {tuple(temperature.shape)}"
            )
        temperature = temperature.reshape(num_rows)

    if reduction == "mean" and normalizer is None:
        # Each chunk is divided by the count over *all* chunks, so the chunk sums add up to the
        # mean; the clamp keeps an all-masked batch at 0 (as reduce_positions does).
        valid = valid_positions(labels, None, ignore_index)
        normalizer = max(num_rows, 1) if valid is None else valid.sum().clamp_min(1)
    if compile:
        # Tensors, not Python floats, so that a value that changes every step is not baked
        # into the compiled graph (which would recompile at each step).
        if normalizer is not None and not isinstance(normalizer, torch.Tensor):
            if normalizer <= 0:
                raise ValueError(
                    f"normalizer must be > 0 (a global count of valid positions), got {normalizer!r}"
                )
            normalizer = torch.tensor(float(normalizer), device=hidden.device)
        if not isinstance(temperature, torch.Tensor):
            temperature = torch.tensor(float(temperature), device=hidden.device)
    kd_options = {
        "alpha": alpha,
        "divergence": divergence,
        "soft_scale": soft_scale,
        "ignore_index": ignore_index,
        "reduction": reduction,
        "normalizer": normalizer if reduction == "mean" else None,
        "beta": beta,
        "lam": lam,
    }
    spec = _ChunkedKD(
        student=student,
        teacher=teacher,
        teacher_hidden=teacher_hidden.detach().reshape(num_rows, teacher_hidden.shape[-1]),
        labels=labels,
        kd_options=kd_options,
        chunk_size=chunk_size,
        compile=compile,
    )
    t_tensor = temperature if isinstance(temperature, torch.Tensor) else None
    differentiable = [hidden, student_weight, student_bias, t_tensor]
    with torch.autocast(device_type, enabled=False):  # the dtypes are settled above
        if torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in differentiable
        ):
            total, soft, hard = _FusedLinearKD.apply(
                hidden, student_weight, student_bias, temperature, spec, student_weight.shape[0]
            )
        else:
            total, soft, hard, _ = spec.run(hidden.detach(), temperature, (False,) * 4)
    return KDLoss(total, soft, hard)


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype in force on ``device_type``, or None when autocast is off."""
    try:
        enabled = torch.is_autocast_enabled(device_type)  # torch >= 2.4
        return torch.get_autocast_dtype(device_type) if enabled else None
    except (TypeError, AttributeError):
        if device_type == "cuda" and torch.is_autocast_enabled():
            return torch.get_autocast_gpu_dtype()
        if device_type == "cpu" and torch.is_autocast_cpu_enabled():
            return torch.get_autocast_cpu_dtype()
        return None


def _check_tensor(value: object, name: str) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    if value.dim() < 1:
        raise ValueError(f"{name} must have shape (..., H), got a scalar")


def _check_weight(weight: object, name: str, hidden: torch.Tensor, hidden_name: str) -> None:
    _check_tensor(weight, name)
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{name} must have shape (V, H) with H = {hidden_name}.shape[-1] = {hidden.shape[-1]}, "
            f"got {tuple(weight.shape)}"
        )
    if weight.dtype != hidden.dtype:
        raise TypeError(
            f"{name} and {hidden_name} must have the same dtype, got {weight.dtype} and {hidden.dtype}"
        )


def _shared_vocab(student_vocab: int, teacher_vocab: int, vocab_size: int | None) -> int:
    """The vocabulary both sides are cut to: ``vocab_size``, which is required when they differ."""
    if vocab_size is None:
        if student_vocab != teacher_vocab:
            raise ValueError(
                f"student_weight has {student_vocab} rows and teacher_weight {teacher_vocab}: the "
                "vocabularies differ. If both models share one tokenizer and the extra rows are "
                "padding, pass vocab_size=<the tokenizer's vocabulary size> to cut both to it; "
                "different tokenizers cannot be distilled token by token"
            )
        return student_vocab
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise TypeError(f"vocab_size must be an int or None, got {type(vocab_size).__name__}")
    if not 1 <= vocab_size <= min(student_vocab, teacher_vocab):
        raise ValueError(
            f"vocab_size must be in [1, {min(student_vocab, teacher_vocab)}] (the smaller of "
            f"student_weight's {student_vocab} and teacher_weight's {teacher_vocab} rows), "
            f"got vocab_size={vocab_size}"
        )
    return vocab_size


def _head(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    side: str,
    vocab: int,
    scale: float,
    softcap: float | None,
) -> Head:
    if bias is not None:
        _check_tensor(bias, f"{side}_bias")
        if bias.shape != weight.shape[:1] or bias.dtype != weight.dtype:
            raise ValueError(
                f"{side}_bias must have shape ({weight.shape[0]},) and dtype {weight.dtype} like "
                f"{side}_weight, got {tuple(bias.shape)} and {bias.dtype}"
            )
    for name, value in ((f"{side}_logit_scale", scale), (f"{side}_softcap", softcap)):
        if value is None and name.endswith("softcap"):
            continue
        if isinstance(value, bool) or not isinstance(value, Real):
            raise TypeError(f"{name} must be a float, got {type(value).__name__} {value!r}")
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must be finite and > 0, got {name}={value!r}")
    return Head(
        weight=weight[:vocab].detach(),
        bias=None if bias is None else bias[:vocab].detach(),
        scale=float(scale),
        softcap=None if softcap is None else float(softcap),
    )
