"""How the losses behave under autograd: repeated and double backward, and no host syncs."""

from __future__ import annotations

import pytest
import torch
from test_fused import fused, make_inputs

import darkknowledge as dk
from darkknowledge.losses import fused_linear_cross_entropy, hard_only_loss
from darkknowledge.losses.fused import fused_linear_kd_loss


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])  # closed form, autograd objective
def test_fused_linear_kd_loss_backward_with_retain_graph_three_times(divergence):
    """Each backward adds the same gradient: the stored gradients are never handed to autograd
    as the tensors it accumulates into."""
    inputs = make_inputs()
    options = dict(temperature=2.0, alpha=0.5, divergence=divergence, chunk_size=4)
    _, once = fused(inputs, **options)
    leaves = {k: v for k, v in inputs.items() if k.startswith("student")}
    loss = fused_linear_kd_loss(
        inputs["student_hidden"], inputs["student_weight"], inputs["teacher_hidden"],
        inputs["teacher_weight"], inputs["labels"], student_bias=inputs["student_bias"],
        teacher_bias=inputs["teacher_bias"], **options,
    )  # fmt: skip
    for _ in range(3):
        loss.total.backward(retain_graph=True)
    for name, leaf in leaves.items():
        torch.testing.assert_close(leaf.grad, 3 * once[name], msg=name)


def double_backward(loss: torch.Tensor, wrt: torch.Tensor) -> None:
    """Differentiate the gradient of ``scale · loss`` again. ``scale`` requires grad, so the
    incoming gradient does too and a graph through the loss's backward is asked for."""
    scale = torch.tensor(2.0, dtype=loss.dtype, requires_grad=True)
    (grad,) = torch.autograd.grad(scale * loss, wrt, create_graph=True)
    grad.sum().backward()


def test_fused_losses_refuse_double_backward_clearly():
    """The gradients are computed in closed form, not as a graph: a second derivative would be
    silently wrong (the stored gradients taken as constants), so it is refused."""
    inputs = make_inputs(bias=False)
    hidden, weight = inputs["student_hidden"], inputs["student_weight"]
    for divergence in ("forward_kl", "jsd"):
        loss = fused_linear_kd_loss(
            hidden, weight, inputs["teacher_hidden"], inputs["teacher_weight"], inputs["labels"],
            temperature=2.0, alpha=0.5, chunk_size=4, divergence=divergence,
        )  # fmt: skip
        with pytest.raises(RuntimeError, match="once_differentiable"):
            double_backward(loss.total, hidden)
    ce = fused_linear_cross_entropy(hidden, weight, inputs["labels"], chunk_size=4)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        double_backward(ce.total, weight)


def test_kd_loss_fast_path_refuses_double_backward_clearly():
    student = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    loss = dk.kd_loss(student, torch.randn(4, 9, dtype=torch.float64), temperature=2.0, alpha=1.0)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        double_backward(loss.total, student)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_losses_make_no_host_sync_on_cuda():
    """torch.cuda.set_sync_debug_mode("error") raises on any synchronising call."""
    inputs = {
        k: v.detach().cuda().requires_grad_(v.requires_grad) if v.is_floating_point() else v.cuda()
        for k, v in make_inputs(dtype=torch.float32, vocab=300, tokens=(3, 40)).items()
    }
    logits = torch.randn(6, 300, device="cuda", requires_grad=True)
    labels = torch.randint(300, (6,), device="cuda")
    temperature = torch.full((6,), 2.0, device="cuda")
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fused(inputs, temperature=2.0, alpha=0.5, chunk_size=16)
        fused(inputs, temperature=2.0, alpha=0.5, chunk_size=16, divergence="jsd")
        dk.kd_loss(logits, logits.detach() + 1, labels, temperature=temperature, alpha=0.5)[
            0
        ].backward()
        hard_only_loss(logits, labels).total.backward()
        fused_linear_cross_entropy(
            inputs["student_hidden"], inputs["student_weight"], inputs["labels"], chunk_size=16
        ).total.backward()
        values, ids = logits.detach().log_softmax(-1).topk(8, dim=-1)
        for tail in ("bucket", "none"):
            dk.sparse_kd_loss(logits, ids, values, labels, alpha=0.5, tail=tail)[0].backward()
        dk.fused_linear_sparse_kd_loss(
            inputs["student_hidden"], inputs["student_weight"], ids[0].expand(3, 40, 8),
            values[0].expand(3, 40, 8), inputs["labels"], alpha=0.5, chunk_size=16,
            temperature=2.0,
        ).total.backward()  # fmt: skip
    finally:
        torch.cuda.set_sync_debug_mode(previous)
