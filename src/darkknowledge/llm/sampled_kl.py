"""The sampled reverse KL of on-policy distillation, on hidden states and output layers.

:func:`sampled_reverse_kl_loss` is the student's loss: per sampled token ``x``, the estimate
``a = log q_T(x) − log p_T(x)`` of KL(q_T ‖ p_T), averaged over the tokens that count and
times ``soft_weight``, with the score-function gradient ``a · ∇log q_T(x)`` (unbiased for
∇KL(q_T ‖ p_T) when ``x ~ q_T``; see ``darkknowledge.losses.engine.sampled_kl``). The teacher
enters only through ``log p_T(x)``, one number per token: :func:`token_logprobs` computes it
from the teacher's hidden states, and a served teacher (vLLM's prompt log-probabilities, at
T = 1) can give it instead. Both run on the chunk engine: no ``(tokens, vocab)`` logits.
"""

from __future__ import annotations

import torch

from ..losses import _checks
from ..losses import _fused_common as common
from ..losses.engine import Buffers, HeadStudent, run_chunks, run_fused_linear
from ..losses.engine.sampled_kl import SampledReverseKL, TokenLogProb, TokenLogProbs
from ..losses.kd import KDLoss
from ..losses.reduction import Normalizer, valid_positions


def sampled_reverse_kl_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    tokens: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    soft_weight: float = 1.0,
    normalizer: Normalizer = None,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    vocab_size: int | None = None,
    ignore_index: int = -100,
    chunk_size: int = 256,
) -> KDLoss:
    """``soft_weight · mean_x [log q_T(x) − log p_T(x)]`` over the sampled tokens, with the
    score-function gradient (module docstring). ``total`` carries the gradient (to ``hidden``,
    ``weight`` and ``bias``), ``soft`` is the mean estimate, ``hard`` 0.

    Args:
        hidden: ``(..., H)`` the student's final hidden states at the positions predicting the
            tokens.
        weight, bias: the student's output layer ``(V, H)``, ``(V,)``; logits are
            ``softcap(logit_scale · (h Wᵀ + b))``.
        tokens: ``(...)`` the sampled tokens (``ignore_index`` where nothing counts).
        teacher_logprobs: ``(...)`` ``log p_T(x)`` of each token; no gradient flows to it.
        temperature: T of both distributions (the teacher's values must be at the same T).
        normalizer: divide by this instead of the number of tokens that count.

    >>> import torch
    >>> hidden, weight = torch.randn(5, 4, requires_grad=True), torch.randn(7, 4)
    >>> tokens = torch.tensor([1, 2, -100, 3, 6])
    >>> teacher = token_logprobs(torch.randn(5, 8), torch.randn(7, 8), tokens)
    >>> loss = sampled_reverse_kl_loss(hidden, weight, tokens, teacher)
    >>> loss.total.backward(); hidden.grad.shape
    torch.Size([5, 4])
    """
    student = common.student_inputs(
        hidden, weight, bias, chunk_size=chunk_size, vocab_size=vocab_size,
        logit_scale=logit_scale, softcap=softcap,
    )  # fmt: skip
    num_rows, vocab = student.hidden.shape[0], student.head.weight.shape[0]
    temperature = _float_temperature(temperature)
    _checks.check_labels(tokens, student.leading_shape, vocab, ignore_index)
    if not isinstance(teacher_logprobs, torch.Tensor) or teacher_logprobs.shape != tokens.shape:
        raise ValueError(
            f"teacher_logprobs must be a tensor shaped like tokens {tuple(tokens.shape)}, got "
            f"{getattr(teacher_logprobs, 'shape', type(teacher_logprobs).__name__)}"
        )
    dtype = common.math_dtype(student.hidden)
    flat_tokens = tokens.reshape(num_rows)
    valid = valid_positions(flat_tokens, None, ignore_index)
    normalizer = common.normalizer_for("mean", normalizer, valid, num_rows, dtype)
    teacher = TokenLogProbs(teacher_logprobs.detach().reshape(num_rows).to(dtype))
    buffers = Buffers(min(chunk_size, max(num_rows, 1)), vocab, dtype, student.hidden.device)

    def objective_for(_temperature, _need_temperature_grad):
        return SampledReverseKL(
            temperature=temperature, soft_weight=soft_weight, buffers=buffers,
            scale=student.head.scale, softcap=student.head.softcap,
        )  # fmt: skip

    total, soft, hard = run_fused_linear(
        objective_for, student.hidden, student.weight, student.bias, student.head, teacher,
        labels=flat_tokens, valid=valid, normalizer=normalizer, chunk_size=chunk_size,
    )  # fmt: skip
    return KDLoss(total, soft, hard)


@torch.no_grad()
def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    tokens: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    vocab_size: int | None = None,
    ignore_index: int = -100,
    chunk_size: int = 256,
) -> torch.Tensor:
    """``log softmax(z / T)[x]`` ``(...)`` of each token, from hidden states ``(..., H)`` and an
    output layer (``z = softcap(logit_scale · (h Wᵀ + b))``), chunk by chunk, in float32 (float64
    for float64 input). Positions holding ``ignore_index`` get an arbitrary value."""
    model = common.student_inputs(
        hidden, weight, bias, chunk_size=chunk_size, vocab_size=vocab_size,
        logit_scale=logit_scale, softcap=softcap,
    )  # fmt: skip
    num_rows, vocab = model.hidden.shape[0], model.head.weight.shape[0]
    _checks.check_labels(tokens, model.leading_shape, vocab, ignore_index)
    flat = tokens.reshape(num_rows)
    dtype = common.math_dtype(model.hidden)
    objective = TokenLogProb(
        temperature=_float_temperature(temperature),
        buffers=Buffers(min(chunk_size, max(num_rows, 1)), vocab, dtype, model.hidden.device),
        scale=model.head.scale, softcap=model.head.softcap,
    )  # fmt: skip
    out = run_chunks(
        objective, HeadStudent(model.hidden, model.head), labels=flat,
        valid=valid_positions(flat, None, ignore_index), chunk_size=chunk_size,
    )  # fmt: skip
    values = out.per_row[0] if out.per_row is not None else model.hidden.new_zeros(0, dtype=dtype)
    return values.reshape(tokens.shape)


def _float_temperature(temperature: float) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, int | float):
        raise TypeError(f"temperature must be a float > 0, got {type(temperature).__name__}")
    _checks.check_temperature(float(temperature))
    return float(temperature)
