"""The distillation loss at vocabulary scale, without the full ``(tokens, vocab)`` logits.

    logits = softcap · tanh(scale · (h Wᵀ + b) / softcap)          (softcap optional, Gemma-style)
    L_total = (1 - alpha) · CE(z_s, y) + alpha · T^2 · D(softmax(z_t/T), softmax(z_s/T))

exactly :func:`darkknowledge.kd_loss`'s objective, computed by the chunk engine
(``engine/``) over row chunks of the hidden states. The objective of a chunk is the closed form
of forward KL + cross-entropy (``engine/forward_kl.py``) for the default (forward KL at a float
temperature, no softcap), and ``kd_loss`` itself under autograd for everything else
(``kd_chunks.py``). The engine turns each chunk's logits gradient into the student's
hidden-state, weight and bias gradients right away; the backward pass only scales them. Memory
beyond the inputs, weights and gradients is O(chunk_size × vocab): 2048 tokens × 128,256 × 4
bytes is 1 GB per copy of the full logits, and a naive loss keeps several copies.
"""

from __future__ import annotations

import torch

from . import _checks
from . import _fused_common as common
from .engine.call import KDCall, SoftScale, resolve_soft_scale
from .engine.chunker import run_fused_linear
from .engine.forward_kl import Buffers, ForwardKL
from .engine.sides import HeadTeacher
from .kd import KDLoss
from .kd_chunks import AutogradKD
from .reduction import Normalizer, valid_positions

# Rows per chunk. Measured on CPU at a 128,256 vocabulary (benchmarks/results/fused_kd.md): the
# matrix products run faster on 256 rows than on 128, and the default objective's four float32
# buffers of 256 × 128,256 × 4 bytes (131 MB each) keep the loss's memory beyond its inputs and
# gradients at about 7% of the naive loss's; 512 rows would pass 10%.
DEFAULT_CHUNK_SIZE = 256


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
    common.check_tensor(student_hidden, "student_hidden")
    common.check_tensor(teacher_hidden, "teacher_hidden")
    student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias = (
        common.cast_for_autocast(
            student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
            teacher_bias,
        )
    )  # fmt: skip
    common.check_weight(student_weight, "student_weight", student_hidden, "student_hidden")
    common.check_weight(teacher_weight, "teacher_weight", teacher_hidden, "teacher_hidden")
    leading_shape = student_hidden.shape[:-1]
    if leading_shape != teacher_hidden.shape[:-1]:
        raise ValueError(
            "student_hidden and teacher_hidden must have the same leading (token) shape, got "
            f"{tuple(student_hidden.shape)} and {tuple(teacher_hidden.shape)}"
        )
    if not isinstance(compile, bool | str):
        raise TypeError(f"compile must be a bool or a torch.compile backend name, got {compile!r}")
    _checks.check_chunk_size(chunk_size)
    common.check_reduction(reduction)
    _checks.check_divergence_name(divergence)
    temperature = _checks.temperature_for(temperature, leading_shape)
    _checks.check_unit_interval(alpha, "alpha")
    resolve_soft_scale(soft_scale, 1.0)  # validates it before any work is done
    vocab = _shared_vocab(student_weight.shape[0], teacher_weight.shape[0], vocab_size)
    student = common.head(
        student_weight, student_bias, "student", vocab, student_logit_scale, student_softcap
    )
    teacher = common.head(
        teacher_weight, teacher_bias, "teacher", vocab, teacher_logit_scale, teacher_softcap
    )

    hidden = student_hidden.reshape(-1, student_hidden.shape[-1])  # (N, H_s)
    num_rows, dtype = hidden.shape[0], common.math_dtype(hidden)
    _checks.check_labels_for_alpha(labels, alpha)
    if labels is not None:
        _checks.check_labels(labels, leading_shape, vocab, ignore_index)
        labels = labels.reshape(num_rows)
    if isinstance(temperature, torch.Tensor) and temperature.dim() > 0:
        temperature = temperature.expand(leading_shape).reshape(num_rows)  # per row
    valid = valid_positions(labels, None, ignore_index)
    normalizer = common.normalizer_for(reduction, normalizer, valid, num_rows, dtype)
    if compile:
        # Tensors, not Python floats, so that a value that changes every step is not baked
        # into the compiled graph (which would recompile at each step).
        normalizer, temperature = (
            value
            if isinstance(value, torch.Tensor)
            else torch.tensor(float(value), device=hidden.device)
            for value in (normalizer, temperature)
        )
    call = KDCall(
        alpha=alpha, divergence=divergence, soft_scale=soft_scale, ignore_index=ignore_index,
        beta=beta, lam=lam,
    )  # fmt: skip
    closed_form = (
        divergence == "forward_kl"
        and not isinstance(temperature, torch.Tensor)
        and student.softcap is None
        and teacher.softcap is None
    )

    def objective_for(temperature, need_temperature: bool):
        if closed_form:  # forward KL + CE in closed form, buffers reused by every chunk
            temperature = float(temperature)
            return ForwardKL(
                temperature=temperature,
                buffers=Buffers(min(chunk_size, max(num_rows, 1)), vocab, dtype, hidden.device),
                alpha=alpha,
                soft_weight=call.soft_weight(temperature),
                student_scale=student.scale,
                teacher_scale=teacher.scale,
            )
        return AutogradKD(call, temperature, need_temperature, compile)

    teacher_rows = HeadTeacher(
        teacher_hidden.detach().reshape(num_rows, teacher_hidden.shape[-1]), teacher
    )
    total, soft, hard = run_fused_linear(
        objective_for, hidden, student_weight, student_bias, student, teacher_rows, labels=labels,
        valid=valid, normalizer=normalizer, chunk_size=chunk_size, temperature=temperature,
    )  # fmt: skip
    return KDLoss(total, soft, hard)


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
