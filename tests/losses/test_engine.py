"""The chunk engine with an objective written outside the library: the worked example of
docs/fused-loss.md ("Adding an objective"), checked against autograd on full float64 logits."""

from __future__ import annotations

import runpy

import pytest
import torch
from loss_helpers import doc_example

from darkknowledge.losses.engine import (
    Chunk,
    ChunkResult,
    Head,
    HeadStudent,
    LogitsStudent,
    run_chunks,
    run_fused_linear,
)
from darkknowledge.losses.reduction import reduce_positions


# --- the worked example, as docs/fused-loss.md shows it --------------------------------------
class ZLoss:
    """``weight · lse(z)²`` per row (PaLM's z-loss: keeps the softmax normaliser near 1)."""

    def __init__(self, weight: float) -> None:
        self.weight = weight

    def __call__(self, chunk: Chunk) -> ChunkResult:
        z = chunk.student.logits()  # (n, V) math dtype: this chunk's logits only
        lse = torch.logsumexp(z, dim=-1)  # (n,)
        loss = reduce_positions(self.weight * lse.square(), chunk.valid, "mean", chunk.normalizer)
        parts = torch.stack([loss, torch.zeros_like(loss), loss])  # total, soft, hard
        if not chunk.need_logits_grad:
            return ChunkResult(parts)
        # ∂/∂z of weight · lse² / N is 2 · weight · lse · softmax(z) / N, on valid rows.
        row_scale = (2.0 * self.weight / chunk.normalizer) * lse.unsqueeze(-1)  # (n, 1)
        if chunk.valid is not None:
            row_scale = row_scale * chunk.valid.unsqueeze(-1)
        return ChunkResult(parts, torch.softmax(z, dim=-1), row_scale)


# ---------------------------------------------------------------------------------------------


def z_loss_reference(logits, valid, weight, normalizer):
    lse = torch.logsumexp(logits.double(), dim=-1)
    return torch.where(valid, weight * lse.square(), 0.0).sum() / normalizer


@pytest.mark.parametrize("chunk_size", [1, 4, 100])
def test_engine_runs_an_outside_objective_on_hidden_states(chunk_size):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(11, 6, dtype=torch.float64, generator=generator).requires_grad_(True)
    weight = torch.randn(40, 6, dtype=torch.float64, generator=generator).requires_grad_(True)
    bias = torch.randn(40, dtype=torch.float64, generator=generator).requires_grad_(True)
    valid = torch.rand(11, generator=generator) < 0.7
    normalizer = valid.sum().double()
    total, soft, hard = run_fused_linear(
        lambda *_: ZLoss(1e-2), hidden, weight, bias,
        valid=valid, normalizer=normalizer, chunk_size=chunk_size,
    )  # fmt: skip
    grads = torch.autograd.grad(total, (hidden, weight, bias))
    expected = z_loss_reference(hidden @ weight.T + bias, valid, 1e-2, normalizer)
    torch.testing.assert_close(total, expected, rtol=1e-12, atol=0)
    assert soft.item() == 0.0 and torch.equal(hard, total.detach())
    for got, want in zip(grads, torch.autograd.grad(expected, (hidden, weight, bias))):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)


def test_engine_runs_an_outside_objective_on_logits_and_a_cut_head():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(7, 13, dtype=torch.float64, generator=generator)
    student = LogitsStudent(logits, need_grad=True)
    out = run_chunks(ZLoss(0.5), student, normalizer=7.0, chunk_size=3)
    leaf = logits.clone().requires_grad_(True)
    expected = z_loss_reference(leaf, torch.ones(7, dtype=torch.bool), 0.5, 7.0)
    torch.testing.assert_close(out.parts[0], expected)
    torch.testing.assert_close(student.gradients()[0], torch.autograd.grad(expected, leaf)[0])
    # A head cut to its first 10 rows: the other rows' weight gradient is zero.
    hidden = torch.randn(5, 3, dtype=torch.float64, generator=generator)
    weight = torch.randn(12, 3, dtype=torch.float64, generator=generator)
    side = HeadStudent(hidden, Head(weight[:10]), (True, True, False), full_vocab=12)
    run_chunks(ZLoss(0.5), side, normalizer=5.0, chunk_size=2)
    grad_hidden, grad_weight, _ = side.gradients()
    leaves = (hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True))
    reference = z_loss_reference(leaves[0] @ leaves[1][:10].T, torch.ones(5, dtype=bool), 0.5, 5.0)
    want_hidden, want_weight = torch.autograd.grad(reference, leaves)
    torch.testing.assert_close(grad_hidden, want_hidden)
    torch.testing.assert_close(grad_weight, want_weight)
    assert grad_weight.shape == (12, 3) and not grad_weight[10:].any()


def test_docs_adding_an_objective_example_runs_as_written(tmp_path):
    """The code block of docs/fused-loss.md's "Adding an objective", run as a script."""
    script = doc_example("fused-loss.md", "## Adding an objective", tmp_path)
    namespace = runpy.run_path(str(script))
    hidden, weight, total = namespace["hidden"], namespace["weight"], namespace["total"]
    expected = 1e-2 * torch.logsumexp((hidden @ weight.T).double(), -1).square().mean()
    torch.testing.assert_close(total.double(), expected, rtol=1e-5, atol=0)
    assert hidden.grad is not None and weight.grad is not None
