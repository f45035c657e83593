"""Bad tensors for the losses, the policy KL and speculative decoding.

NaN and Inf: the losses never check values on the accelerator path (that would be a host sync
per call), so a NaN or +Inf logit at a position that counts makes the loss NaN, never a finite
number; positions left out by ``mask`` or ``ignore_index`` are left out entirely, NaN included.
A -inf logit means "this token is impossible" (masked vocabulary entries). The cases marked
"result" check these rules and show the outcome; the others are errors.
"""

from __future__ import annotations

import math

import torch
from catalogue import Case, Result

import darkknowledge as dk
from darkknowledge import speculative

NAN, INF = float("nan"), float("inf")


def logits(*shape: int, offset: float = 0.0) -> torch.Tensor:
    """Deterministic, non-constant logits (no random numbers: the messages must not change)."""
    count = math.prod(shape)
    return (torch.linspace(-2.0, 2.0, count) + offset).reshape(shape).sin() * 3


S, T = logits(2, 4), logits(2, 4, offset=1.0)
SPARSE_STUDENT = logits(3, 6)
FUSED_LABELS = torch.tensor([0, 2, 5])
LABELS = torch.tensor([1, 3])
HIDDEN, WEIGHT = logits(3, 5), logits(6, 5, offset=0.5)
T_HIDDEN, T_WEIGHT = logits(3, 7, offset=0.2), logits(6, 7, offset=0.7)
IDS = torch.tensor([[0, 1], [2, 3], [4, 5]])
VALUES = torch.log(torch.tensor([[0.5, 0.3], [0.4, 0.4], [0.6, 0.2]]))
P, Q = torch.softmax(T, -1), torch.softmax(S, -1)


def _with(tensor: torch.Tensor, index: tuple, value: float) -> torch.Tensor:
    changed = tensor.clone()
    changed[index] = value
    return changed


def kd(student=S, teacher=T, labels=LABELS, **options):
    options = {"temperature": 2.0, "alpha": 0.5, **options}
    return lambda folder: dk.kd_loss(student, teacher, labels, **options)


def fused(hidden=HIDDEN, weight=WEIGHT, teacher_hidden=T_HIDDEN, teacher_weight=T_WEIGHT,
          labels=FUSED_LABELS, **options):  # fmt: skip
    options = {"temperature": 2.0, "alpha": 0.5, **options}
    return lambda folder: dk.fused_linear_kd_loss(
        hidden, weight, teacher_hidden, teacher_weight, labels, **options
    )


def sparse(student=SPARSE_STUDENT, ids=IDS, values=VALUES, **options):
    options = {"temperature": 2.0, "alpha": 1.0, **options}
    return lambda folder: dk.sparse_kd_loss(student, ids, values, **options)


def parts(loss) -> str:
    return ", ".join(
        f"{name} {'NaN' if math.isnan(v) else 'finite' if math.isfinite(v) else v}"
        for name, v in zip(("total", "soft", "hard"), map(float, loss))
    )


def propagates(make, *, nan_total: bool = True):
    """The loss of ``make``: its total is NaN (a NaN that counts is never hidden), or finite
    (``nan_total=False``: the NaN sits where nothing counts), as documented."""

    def run(folder):
        loss = make(folder)
        total = float(loss[0] if isinstance(loss, tuple) else loss)
        assert math.isnan(total) == nan_total, f"total {total}, expected NaN: {nan_total}"
        text = parts(loss) if isinstance(loss, tuple) else f"{total:.4g}"
        return Result(text if nan_total else f"finite ({text}): the position is left out")

    return run


def neg_inf_student(folder):
    """-inf where the teacher has mass: KL(p || q) is +inf; the loss is finite but huge."""
    loss = dk.kd_loss(_with(S, (0, 1), -INF), T, LABELS, temperature=2.0, alpha=0.5)
    assert float(loss.soft) > 1e15
    return Result(f"soft {float(loss.soft):.1e}: huge, finite (the true KL is +inf)")


TENSOR_CASES: list[Case] = [
    Case("tensors", "logits that are a list", "kd_loss", kd(student=[[0.0, 1.0]]), "student_logits"),
    Case("tensors", "integer logits", "kd_loss", kd(student=S.long()), "student_logits"),
    Case("tensors", "0-dim logits", "kd_loss", kd(student=torch.tensor(1.0)), "student_logits"),
    Case("tensors", "vocabulary mismatch (4 vs 5 classes)", "kd_loss", kd(teacher=logits(2, 5)), "teacher_logits"),
    Case("tensors", "shape mismatch (2 vs 3 rows)", "kd_loss", kd(teacher=logits(3, 4)), "teacher_logits"),
    Case("tensors", "labels out of range (4 with 4 classes)", "kd_loss", kd(labels=torch.tensor([1, 4])), "labels"),
    Case("tensors", "negative label other than ignore_index", "kd_loss", kd(labels=torch.tensor([-1, 0])), "labels"),
    Case("tensors", "float labels", "kd_loss", kd(labels=LABELS.float()), "labels"),
    Case("tensors", "labels of the wrong shape", "kd_loss", kd(labels=torch.tensor([[1, 3]])), "labels"),
    Case("tensors", "alpha < 1 without labels", "kd_loss", kd(labels=None), "alpha"),
    Case("tensors", "alpha = 1.5", "kd_loss", kd(alpha=1.5), "alpha"),
    Case("tensors", "temperature 0", "kd_loss", kd(temperature=0.0), "temperature"),
    Case("tensors", "temperature NaN", "kd_loss", kd(temperature=NAN), "temperature"),
    Case("tensors", "temperature as a string", "kd_loss", kd(temperature="2"), "temperature"),
    Case("tensors", "temperature tensor with a negative entry", "kd_loss", kd(temperature=torch.tensor([[1.0], [-1.0]])), "temperature"),
    Case("tensors", "temperature tensor of shape (3,) for 2 rows", "kd_loss", kd(temperature=torch.ones(3)), "temperature"),
    Case("tensors", "temperature tensor (2,) on (2, 2, C) logits (ambiguous)", "kd_loss",
         kd(student=logits(2, 2, 4), teacher=logits(2, 2, 4), labels=None, alpha=1.0, temperature=torch.ones(2)), "temperature"),
    Case("tensors", "integer temperature tensor", "kd_loss", kd(temperature=torch.tensor(2)), "temperature"),
    Case("tensors", "mask of dtype float", "kd_loss", kd(mask=torch.ones(2)), "mask"),
    Case("tensors", "mask of the wrong shape", "kd_loss", kd(mask=torch.ones(3, dtype=torch.bool)), "mask"),
    Case("tensors", "unknown divergence", "kd_loss", kd(divergence="kl"), "divergence"),
    Case("tensors", "unknown reduction", "kd_loss", kd(reduction="avg"), "reduction"),
    Case("tensors", "NaN in the student's logits", "kd_loss", propagates(kd(student=_with(S, (0, 1), NAN)))),
    Case("tensors", "NaN in the teacher's logits", "kd_loss", propagates(kd(teacher=_with(T, (1, 2), NAN)))),
    Case("tensors", "+Inf in the teacher's logits", "kd_loss", propagates(kd(teacher=_with(T, (0, 0), INF)))),
    Case("tensors", "NaN at a position masked out by ignore_index", "kd_loss",
         propagates(kd(student=_with(S, (0, 1), NAN), labels=torch.tensor([-100, 3])), nan_total=False)),
    Case("tensors", "-Inf in the student's logits where the teacher has mass", "kd_loss", neg_inf_student),
    Case("tensors", "unknown kind", "divergence", lambda f: dk.divergence(S, T, kind="kl"), "kind"),
    Case("tensors", "NaN in the teacher's logits", "divergence",
         propagates(lambda f: dk.divergence(S, _with(T, (0, 0), NAN), kind="jsd"))),
    Case("tensors", "hidden size of hidden states and weight differ (5 vs 4)", "fused_linear_kd_loss",
         fused(weight=logits(6, 4)), "student_weight"),
    Case("tensors", "output layers of 6 and 7 rows, no vocab_size", "fused_linear_kd_loss",
         fused(teacher_weight=logits(7, 7)), "vocab_size"),
    Case("tensors", "vocab_size larger than an output layer", "fused_linear_kd_loss", fused(vocab_size=9), "vocab_size"),
    Case("tensors", "labels out of range (6 with 6 rows)", "fused_linear_kd_loss", fused(labels=torch.tensor([0, 6, 1])), "labels"),
    Case("tensors", "chunk_size 0", "fused_linear_kd_loss", fused(chunk_size=0), "chunk_size"),
    Case("tensors", "bias of the wrong length", "fused_linear_kd_loss", fused(student_bias=torch.zeros(5)), "bias"),
    Case("tensors", "negative softcap", "fused_linear_kd_loss", fused(student_softcap=-1.0), "softcap"),
    Case("tensors", "NaN in the student's hidden states", "fused_linear_kd_loss",
         propagates(fused(hidden=_with(HIDDEN, (1, 1), NAN)))),
    Case("tensors", "teacher values that are logits, not log-probabilities", "sparse_kd_loss",
         sparse(values=VALUES + 3.0), "teacher_values"),
    Case("tensors", "NaN in the teacher values", "sparse_kd_loss", sparse(values=_with(VALUES, (0, 0), NAN)), "teacher_values"),
    Case("tensors", "teacher ids out of the vocabulary (6 with 6 classes)", "sparse_kd_loss",
         sparse(ids=_with(IDS, (1, 1), 6)), "teacher_ids"),
    Case("tensors", "float teacher ids", "sparse_kd_loss", sparse(ids=IDS.float()), "teacher_ids"),
    Case("tensors", "ids and values of different shapes", "sparse_kd_loss", sparse(values=VALUES[:, :1]), "teacher_values"),
    Case("tensors", "unknown representation", "sparse_kd_loss", sparse(representation="dense"), "representation"),
    Case("tensors", "NaN in the student's logits", "sparse_kd_loss", propagates(sparse(student=_with(SPARSE_STUDENT, (2, 2), NAN)))),
    Case("tensors", "student hidden states of the wrong width", "fused_linear_sparse_kd_loss",
         lambda f: dk.fused_linear_sparse_kd_loss(logits(3, 4), WEIGHT, IDS, VALUES, alpha=1.0), "student_weight"),
    Case("tensors", "unknown estimator", "rl.kl_penalty", lambda f: dk.rl.kl_penalty(S[0], T[0], estimator="k4"), "estimator"),
    Case("tensors", "log-probabilities of different shapes", "rl.kl_penalty",
         lambda f: dk.rl.kl_penalty(S[0], T[0, :3]), "ref_logprobs"),
    Case("tensors", "logits given to a sampled estimator", "rl.kl_penalty",
         lambda f: dk.rl.kl_penalty(S[0], T[0], policy_logits=S, ref_logits=T), "policy_logits"),
    Case("tensors", "NaN in the policy's log-probabilities", "rl.kl_penalty",
         propagates(lambda f: dk.rl.kl_penalty(_with(S[0], (1,), NAN), T[0]))),
    Case("tensors", "probabilities that do not sum to 1", "speculative.acceptance_rate",
         lambda f: speculative.acceptance_rate(P * 3, Q), "target_probs"),
    Case("tensors", "NaN in the probabilities", "speculative.acceptance_rate",
         lambda f: speculative.acceptance_rate(P, _with(Q, (0, 0), NAN)), "draft_probs"),
    Case("tensors", "shape mismatch (4 vs 5 tokens)", "speculative.acceptance_rate",
         lambda f: speculative.acceptance_rate(P, torch.softmax(logits(2, 5), -1)), "draft_probs"),
    Case("tensors", "a draft token out of the vocabulary", "speculative.verify",
         lambda f: speculative.verify(torch.tensor([7]), Q[:1], P), "draft_tokens"),
    Case("tensors", "target_probs without the extra row", "speculative.verify",
         lambda f: speculative.verify(torch.tensor([1]), Q[:1], P[:1]), "target_probs"),
    Case("tensors", "logits given as probabilities", "speculative.verify",
         lambda f: speculative.verify(torch.tensor([1]), S[:1], P), "draft_probs"),
]  # fmt: skip
