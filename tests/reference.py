"""Naive float64 references, written straight from the formulas and sharing no code with
darkknowledge: softmax by exp / sum, KL as Σ a (log a − log b), DKD position by position.

Teacher distribution ``p``, student distribution ``q``, both ``softmax(z / T)`` over the last
dimension. Everything is differentiable, so gradients come from autograd in float64.
"""

from __future__ import annotations

import torch

NEG_INF = float("-inf")


def softmax(logits: torch.Tensor, temperature=1.0) -> torch.Tensor:
    """softmax(z / T) in float64; ``temperature`` a float or a ``(...)`` tensor."""
    z = logits.double()
    if isinstance(temperature, torch.Tensor):
        z = z / temperature.double().unsqueeze(-1)
    else:
        z = z / temperature
    shifted = z - z.max(dim=-1, keepdim=True).values  # exp of -inf is 0
    e = shifted.exp()
    return e / e.sum(dim=-1, keepdim=True)


def kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """KL(a ‖ b) = Σ_c a_c (log a_c − log b_c), per position (all entries > 0)."""
    return (a * (a.log() - b.log())).sum(-1)


def forward_kl(p, q, **_):
    return kl(p, q)


def reverse_kl(p, q, **_):
    return kl(q, p)


def jsd(p, q, beta=0.5, **_):
    """beta·KL(p ‖ m) + (1 − beta)·KL(q ‖ m), m = beta·p + (1 − beta)·q; TRL's endpoints:
    beta = 0 is KL(p ‖ q) and beta = 1 is KL(q ‖ p)."""
    if beta == 0:
        return kl(p, q)
    if beta == 1:
        return kl(q, p)
    m = beta * p + (1 - beta) * q
    return beta * kl(p, m) + (1 - beta) * kl(q, m)


def skew_kl(p, q, lam=0.1, **_):
    """KL(p ‖ lam·p + (1 − lam)·q) (DistiLLM)."""
    return kl(p, lam * p + (1 - lam) * q)


def skew_reverse_kl(p, q, lam=0.1, **_):
    """KL(q ‖ lam·q + (1 − lam)·p) (DistiLLM)."""
    return kl(q, lam * q + (1 - lam) * p)


def tvd(p, q, **_):
    """½ Σ |p − q|."""
    return 0.5 * (p - q).abs().sum(-1)


DIVERGENCES = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd": jsd,
    "skew_kl": skew_kl,
    "skew_reverse_kl": skew_reverse_kl,
    "tvd": tvd,
}


def standardize(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """(z − mean z) / (std z + eps) per vector, population std (Sun et al., CVPR 2024)."""
    z = logits.double()
    mean = z.mean(-1, keepdim=True)
    std = ((z - mean) ** 2).mean(-1, keepdim=True).sqrt()
    return (z - mean) / (std + eps)


def dkd(
    p: torch.Tensor, q: torch.Tensor, target: torch.Tensor, tckd_weight: float, nckd_weight: float
):
    """Decoupled KD (Zhao et al., CVPR 2022), position by position in a Python loop.

    TCKD = KL((p_t, 1 − p_t) ‖ (q_t, 1 − q_t)); NCKD = KL(p̂ ‖ q̂), p̂ the teacher's
    distribution over the non-target classes renormalised to sum 1 (same for q̂).
    """
    flat_p, flat_q = p.reshape(-1, p.shape[-1]), q.reshape(-1, q.shape[-1])
    values = []
    for i, t in enumerate(target.reshape(-1).tolist()):
        t = max(t, 0)
        keep = [c for c in range(p.shape[-1]) if c != t]
        p_t, q_t = flat_p[i, t], flat_q[i, t]
        p_rest, q_rest = flat_p[i, keep], flat_q[i, keep]
        tckd = kl(torch.stack([p_t, p_rest.sum()]), torch.stack([q_t, q_rest.sum()]))
        nckd = kl(p_rest / p_rest.sum(), q_rest / q_rest.sum())
        values.append(tckd_weight * tckd + nckd_weight * nckd)
    return torch.stack(values).reshape(target.shape)


def reduce(per_position: torch.Tensor, valid: torch.Tensor, reduction: str, normalizer=None):
    """Sum / mean over valid positions; never over classes. No positions: 0."""
    kept = torch.where(valid, per_position, torch.zeros_like(per_position))
    if reduction == "none":
        return kept
    if reduction == "sum":
        return kept.sum()
    count = normalizer if normalizer is not None else int(valid.sum())
    return kept.sum() / count if count else kept.sum() * 0.0


def kd_loss(
    student_logits,
    teacher_logits,
    labels=None,
    *,
    temperature,
    alpha,
    divergence="forward_kl",
    soft_scale="T2",
    ignore_index=-100,
    mask=None,
    reduction="mean",
    normalizer=None,
    beta=0.5,
    lam=0.1,
    standardize_logits=False,
    dkd_weights=None,
):
    """(total, soft, hard) of ``(1 − alpha)·CE + alpha·scale·D``, scale = T² per position."""
    s, t = student_logits.double(), teacher_logits.double()
    zs, zt = (standardize(s), standardize(t)) if standardize_logits else (s, t)
    p, q = softmax(zt, temperature), softmax(zs, temperature)
    if dkd_weights is not None:
        soft_pos = dkd(p, q, labels, *dkd_weights)
    else:
        soft_pos = DIVERGENCES[divergence](p, q, beta=beta, lam=lam)
    valid = torch.ones(s.shape[:-1], dtype=torch.bool)
    if labels is not None:
        valid = valid & (labels != ignore_index)
        probs = softmax(s)  # T = 1, unstandardised
        safe = torch.where(labels == ignore_index, torch.zeros_like(labels), labels)
        hard_pos = -probs.gather(-1, safe.unsqueeze(-1)).squeeze(-1).log()
    else:
        hard_pos = torch.zeros_like(soft_pos)
    if mask is not None:
        valid = valid & mask
    if soft_scale == "T2":
        temp = temperature.double() if isinstance(temperature, torch.Tensor) else temperature
        scale = temp**2 * torch.ones_like(soft_pos)
    elif soft_scale == "none":
        scale = torch.ones_like(soft_pos)
    else:
        scale = soft_scale * torch.ones_like(soft_pos)
    total_pos = (1 - alpha) * hard_pos + alpha * scale * soft_pos
    return (
        reduce(total_pos, valid, reduction, normalizer),
        reduce(soft_pos, valid, reduction, normalizer),
        reduce(hard_pos, valid, reduction, normalizer),
    )


def sparse_kd(
    student_logits,
    ids,
    values,
    labels=None,
    *,
    representation="topk",
    temperature=1.0,
    alpha,
    tail="bucket",
    ignore_index=-100,
    mask=None,
    reduction="mean",
    normalizer=None,
    soft_scale="T2",
):
    """(total, soft, hard) on sparse teacher targets, position by position in float64.

    topk: categories are the kept ids (id >= 0), plus with tail="bucket" the rest of the
    vocabulary when some is left out (teacher 1 − Σ p_K, student 1 − Σ q_K); each side's T = 1
    probabilities of its categories are re-tempered, p' ∝ p^(1/T), q' ∝ q^(1/T), and
    KL(p' ‖ q') is summed over categories with p' > 0. sampled: KL(p̂ ‖ q), p̂ = counts / Σ counts.
    """
    z = student_logits.double().reshape(-1, student_logits.shape[-1])
    flat_ids, flat_values = ids.reshape(-1, ids.shape[-1]), values.double().reshape(z.shape[0], -1)
    vocab = z.shape[-1]
    temperatures = torch.as_tensor(temperature, dtype=torch.float64).expand(
        student_logits.shape[:-1]
    )
    soft_values = []
    for row in range(z.shape[0]):
        q = softmax(z[row])  # T = 1
        kept = [j for j in range(flat_ids.shape[-1]) if int(flat_ids[row, j]) >= 0]
        kept_ids = flat_ids[row, kept].long()
        if representation == "sampled":
            counts = flat_values[row, kept]
            p_hat = counts / counts.sum() if float(counts.sum()) > 0 else counts * 0.0
            terms = [p_hat[i] * (p_hat[i].log() - q[kept_ids[i]].log()) for i in range(len(kept))]
            soft_values.append(sum(t for t, p in zip(terms, p_hat) if p > 0) + 0.0 * q.sum())
            continue
        p_cat, q_cat = flat_values[row, kept].exp(), q[kept_ids]
        if tail == "bucket" and len(kept) < vocab:
            p_cat = torch.cat([p_cat, (1.0 - p_cat.sum()).clamp_min(0.0).reshape(1)])
            q_cat = torch.cat([q_cat, (1.0 - q_cat.sum()).reshape(1)])
        if len(p_cat) == 0:
            soft_values.append(0.0 * q.sum())
            continue
        inverse = 1.0 / temperatures.reshape(-1)[row]
        p_tempered = p_cat**inverse / (p_cat**inverse).sum()
        q_tempered = q_cat**inverse / (q_cat**inverse).sum()
        positive = p_tempered > 0
        soft_values.append(
            (p_tempered[positive] * (p_tempered[positive].log() - q_tempered[positive].log())).sum()
        )
    soft_pos = torch.stack(soft_values).reshape(student_logits.shape[:-1])
    valid = torch.ones(soft_pos.shape, dtype=torch.bool)
    if labels is not None:
        valid = valid & (labels != ignore_index)
        safe = torch.where(labels == ignore_index, torch.zeros_like(labels), labels)
        hard_pos = -softmax(student_logits).gather(-1, safe.unsqueeze(-1)).squeeze(-1).log()
    else:
        hard_pos = torch.zeros_like(soft_pos)
    if mask is not None:
        valid = valid & mask
    scale = temperatures**2 if soft_scale == "T2" else torch.ones_like(temperatures)
    if not isinstance(soft_scale, str):
        scale = soft_scale * torch.ones_like(temperatures)
    total_pos = (1 - alpha) * hard_pos + alpha * scale * soft_pos
    return tuple(reduce(x, valid, reduction, normalizer) for x in (total_pos, soft_pos, hard_pos))
