"""The sparse-teacher losses against float64 references: every token kept is kd_loss exactly;
a truncated top-k matches the naive reference of its definition; sampled counts give an
unbiased gradient (Monte Carlo)."""

from __future__ import annotations

import runpy

import pytest
import torch
from loss_helpers import doc_example, logits, reference

import darkknowledge as dk


def topk(teacher_logits, k, *, pad=0, dtype=torch.float64, id_dtype=torch.int64):
    """The teacher's top-k T = 1 log-probabilities, with ``pad`` trailing slots of id -1."""
    values, ids = teacher_logits.double().log_softmax(-1).topk(k, dim=-1)
    if pad:
        ids = torch.cat([ids, torch.full((*ids.shape[:-1], pad), -1)], -1)
        values = torch.cat([values, torch.full((*values.shape[:-1], pad), 7.0)], -1)
    return ids.to(id_dtype), values.to(dtype)


def shuffled(ids, values, seed=0):
    """The same targets in a random slot order (ids need not be sorted)."""
    order = torch.rand(ids.shape, generator=torch.Generator().manual_seed(seed)).argsort(-1)
    return ids.gather(-1, order), values.gather(-1, order)


def check(got, expected, student, ref_student, rtol=1e-10):
    for name, a, b in zip(("total", "soft", "hard"), got, expected):
        torch.testing.assert_close(a.double(), b.detach(), rtol=rtol, atol=rtol * 1e-2, msg=name)
    (grad,) = torch.autograd.grad(got.total, student)
    (ref_grad,) = torch.autograd.grad(expected[0], ref_student)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=rtol * 10, atol=rtol * 1e-2)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("tail", ["bucket", "none"])
def test_sparse_kd_loss_with_every_token_kept_is_kd_loss(temperature, tail):
    student = logits(3, 5, 17, dtype=torch.float64, seed=1).requires_grad_(True)
    teacher = logits(3, 5, 17, dtype=torch.float64, seed=2)
    labels = torch.randint(17, (3, 5), generator=torch.Generator().manual_seed(3))
    labels[0, 2] = -100
    ids, values = shuffled(*topk(teacher, 17))
    got = dk.sparse_kd_loss(
        student, ids, values, labels, temperature=temperature, alpha=0.6, tail=tail
    )
    ref_student = student.detach().clone().requires_grad_(True)
    expected = reference.kd_loss(ref_student, teacher, labels, temperature=temperature, alpha=0.6)
    check(got, expected, student, ref_student)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0])
@pytest.mark.parametrize("tail", ["bucket", "none"])
def test_sparse_kd_loss_truncated_topk_matches_reference(temperature, tail):
    student = logits(4, 6, 23, dtype=torch.float64, seed=1).requires_grad_(True)
    teacher = logits(4, 6, 23, dtype=torch.float64, seed=2)
    labels = torch.randint(23, (4, 6), generator=torch.Generator().manual_seed(3))
    mask = torch.rand(4, 6, generator=torch.Generator().manual_seed(4)) < 0.8
    ids, values = topk(teacher, 5, pad=2)
    ids[0, 0, 3:] = -1  # ragged: 3 ids kept here
    ids[1, 2, :] = -1  # nothing kept at this position
    ids, values = shuffled(ids, values)
    got = dk.sparse_kd_loss(
        student, ids, values, labels, temperature=temperature, alpha=0.7, tail=tail, mask=mask
    )
    ref_student = student.detach().clone().requires_grad_(True)
    expected = reference.sparse_kd(
        ref_student, ids, values, labels, temperature=temperature, alpha=0.7, tail=tail, mask=mask
    )
    check(got, expected, student, ref_student)


def test_sparse_kd_loss_per_sample_temperature_and_soft_scales():
    student = logits(3, 4, 12, dtype=torch.float64, seed=1).requires_grad_(True)
    ids, values = topk(logits(3, 4, 12, dtype=torch.float64, seed=2), 4)
    temperature = torch.tensor([[1.0], [2.5], [6.0]], dtype=torch.float64)
    for soft_scale in ("T2", "none", 0.3):
        got = dk.sparse_kd_loss(
            student, ids, values, temperature=temperature, alpha=1.0, soft_scale=soft_scale,
            reduction="sum",
        )  # fmt: skip
        ref_student = student.detach().clone().requires_grad_(True)
        expected = reference.sparse_kd(
            ref_student, ids, values, temperature=temperature.expand(3, 4), alpha=1.0,
            soft_scale=soft_scale, reduction="sum",
        )  # fmt: skip
        check(got, expected, student, ref_student)


@pytest.mark.parametrize("options", [{}, {"student_logit_scale": 0.8}, {"student_softcap": 3.0}])
@pytest.mark.parametrize("tail", ["bucket", "none"])
def test_fused_linear_sparse_kd_loss_matches_reference(options, tail):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 7, 8, dtype=torch.float64, generator=generator).requires_grad_(True)
    weight = torch.randn(35, 8, dtype=torch.float64, generator=generator).requires_grad_(True)
    bias = torch.randn(35, dtype=torch.float64, generator=generator).requires_grad_(True)
    labels = torch.randint(30, (2, 7), generator=generator)
    labels[1, 3] = -100
    ids, values = topk(torch.randn(2, 7, 30, dtype=torch.float64, generator=generator), 6, pad=1)
    loss = dk.fused_linear_sparse_kd_loss(
        hidden, weight, ids, values, labels, temperature=2.0, alpha=0.4, tail=tail,
        student_bias=bias, chunk_size=4, vocab_size=30, **options,
    )  # fmt: skip
    grads = torch.autograd.grad(loss.total, (hidden, weight, bias))
    leaves = [t.detach().clone().requires_grad_(True) for t in (hidden, weight, bias)]
    z = (leaves[0] @ leaves[1][:30].T + leaves[2][:30]) * options.get("student_logit_scale", 1.0)
    if "student_softcap" in options:
        z = 3.0 * torch.tanh(z / 3.0)
    expected = reference.sparse_kd(z, ids, values, labels, temperature=2.0, alpha=0.4, tail=tail)
    for a, b in zip(loss, expected):
        torch.testing.assert_close(a, b.detach(), rtol=1e-10, atol=1e-12)
    for got, want in zip(grads, torch.autograd.grad(expected[0], leaves)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    assert not grads[1][30:].any() and not grads[2][30:].any()


def test_sparse_losses_pass_gradcheck():
    student = logits(5, 9, dtype=torch.float64, seed=1).requires_grad_(True)
    ids, values = topk(logits(5, 9, dtype=torch.float64, seed=2), 3, pad=1)
    labels = torch.tensor([0, 1, -100, 3, 4])
    for tail in ("bucket", "none"):
        assert torch.autograd.gradcheck(
            lambda s, tail=tail: (
                dk.sparse_kd_loss(
                    s, ids, values, labels, temperature=1.7, alpha=0.5, tail=tail
                ).total
            ),
            (student,),
        )
    counts = torch.tensor([[3.0, 1.0, 0.0, 0.0]] * 5, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda s: dk.sparse_kd_loss(s, ids, counts, labels, representation="sampled", alpha=0.5)[0],
        (student,),
    )
    hidden = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(9, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda h, w: dk.fused_linear_sparse_kd_loss(
            h, w, ids, values, labels, temperature=2.0, alpha=0.5, chunk_size=2,
            student_softcap=2.0,
        ).total,
        (hidden, weight),
    )  # fmt: skip


def sampled_counts(probabilities, num_samples, generator):
    """``num_samples`` ids per row drawn with replacement, as unique ids and counts, padded
    with id -1 / count 0 to ``min(num_samples, V)`` slots."""
    rows, vocab = probabilities.shape
    draws = torch.multinomial(probabilities, num_samples, replacement=True, generator=generator)
    dense = torch.zeros(rows, vocab, dtype=torch.float64).scatter_add_(
        -1, draws, torch.ones(draws.shape, dtype=torch.float64)
    )
    counts, ids = dense.topk(min(num_samples, vocab), dim=-1)
    return torch.where(counts > 0, ids, -1), counts.to(torch.float16)


def test_sparse_kd_loss_sampled_gradient_is_unbiased_monte_carlo():
    """The mean over R independent draws of S samples per position of the sampled loss's
    gradient equals forward KL's gradient at T = 1: each entry within 5 standard errors,
    sqrt(p (1 − p) / (S R)) / N. A top-8 cache (biased) misses the same bound."""
    positions, vocab, samples, draws = 4, 20, 12, 4000
    student = logits(positions, vocab, dtype=torch.float64, seed=1, scale=1.0)
    teacher = logits(positions, vocab, dtype=torch.float64, seed=2, scale=1.5)
    p = reference.softmax(teacher)
    repeated = p.repeat(draws, 1)  # (R · N, V): R independent draws for each position
    ids, counts = sampled_counts(repeated, samples, torch.Generator().manual_seed(0))
    base = student.clone().requires_grad_(True)
    loss = dk.sparse_kd_loss(
        base.repeat(draws, 1), ids, counts, representation="sampled", alpha=1.0, reduction="sum"
    )
    (estimate,) = torch.autograd.grad(loss.total / draws, base)  # mean over draws, per position
    exact_student = student.clone().requires_grad_(True)
    exact = dk.kd_loss(exact_student, teacher, temperature=1.0, alpha=1.0, reduction="sum")
    (expected,) = torch.autograd.grad(exact.total, exact_student)
    bound = 5.0 * (p * (1 - p) / (samples * draws)).sqrt() + 1e-12
    assert ((estimate - expected).abs() <= bound).all()
    top_ids, top_values = topk(teacher, 8)
    truncated = dk.sparse_kd_loss(
        base, top_ids, top_values, alpha=1.0, tail="none", reduction="sum"
    )
    (biased,) = torch.autograd.grad(truncated.total, base)
    assert ((biased - expected).abs() > bound).any()


def test_sparse_kd_loss_sampled_value_matches_reference():
    student = logits(6, 11, dtype=torch.float64, seed=1).requires_grad_(True)
    generator = torch.Generator().manual_seed(5)
    ids, counts = sampled_counts(reference.softmax(logits(6, 11, seed=2)), 12, generator)
    labels = torch.arange(6)
    got = dk.sparse_kd_loss(student, ids, counts, labels, representation="sampled", alpha=0.8)
    ref_student = student.detach().clone().requires_grad_(True)
    expected = reference.sparse_kd(
        ref_student, ids, counts, labels, representation="sampled", alpha=0.8
    )
    check(got, expected, student, ref_student)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("id_dtype", [torch.int16, torch.int32])
def test_sparse_kd_loss_compact_dtypes_within_tolerance(dtype, id_dtype):
    student = logits(8, 40, dtype=dtype, seed=1).requires_grad_(True)
    ids, values = topk(logits(8, 40, dtype=torch.float64, seed=2), 6, id_dtype=id_dtype)
    values = values.to(torch.bfloat16 if dtype == torch.bfloat16 else torch.float16)
    got = dk.sparse_kd_loss(student, ids, values, temperature=2.0, alpha=1.0)
    (grad,) = torch.autograd.grad(got.total, student)
    assert grad.dtype == dtype
    ref_student = student.detach().double().requires_grad_(True)
    expected = reference.sparse_kd(ref_student, ids, values, temperature=2.0, alpha=1.0)
    torch.testing.assert_close(got.total.double(), expected[0].detach(), rtol=1e-5, atol=1e-6)
    (ref_grad,) = torch.autograd.grad(expected[0], ref_student)
    error = (grad.double() - ref_grad).abs().max() / ref_grad.abs().max()
    assert error < (1e-5 if dtype == torch.float32 else 1e-2)


def test_sparse_kd_loss_errors_name_the_argument():
    student, labels = torch.randn(3, 10), torch.tensor([1, 2, 3])
    ids, values = topk(torch.randn(3, 10), 4)

    def call(**overrides):
        arguments = dict(teacher_ids=ids, teacher_values=values, labels=labels, alpha=0.5)
        arguments.update(overrides)
        return dk.sparse_kd_loss(
            student, arguments.pop("teacher_ids"), arguments.pop("teacher_values"),
            arguments.pop("labels"), **arguments,
        )  # fmt: skip

    cases = [
        (dict(representation="dense"), ValueError, "representation must be one of"),
        (dict(tail="drop"), ValueError, "tail must be one of"),
        (dict(representation="sampled", tail="none"), ValueError, "tail='none' applies to"),
        (
            dict(representation="sampled", teacher_values=values.abs(), temperature=2.0),
            ValueError,
            "representation='sampled' needs temperature=1.0",
        ),
        (
            dict(teacher_ids=ids.clamp_max(3) * 4),
            ValueError,
            r"teacher_ids must be token ids in \[0, 10\)",
        ),
        (dict(teacher_ids=ids.clone().fill_(2)), ValueError, "unique per position.*repeats id 2"),
        (dict(teacher_values=values.abs() + 1), ValueError, "log-probabilities"),
        (
            dict(representation="sampled", teacher_values=-values.abs() - 1),
            ValueError,
            "sample counts",
        ),
        (dict(teacher_ids=ids.float()), TypeError, "teacher_ids must have dtype int16"),
        (dict(teacher_values=values.long()), TypeError, "teacher_values must have dtype"),
        (dict(teacher_ids=ids[:, :3]), ValueError, "same shape"),
        (dict(teacher_ids=ids[:2]), ValueError, r"teacher_ids must have shape \(\.\.\., k\)"),
        (dict(labels=None), ValueError, "needs labels"),
        (dict(reduction="none"), ValueError, "reduction must be"),
        (
            dict(temperature=torch.tensor(2.0, requires_grad=True)),
            ValueError,
            "must not require grad",
        ),
        (dict(temperature=torch.full((3, 2), 2.0)), ValueError, "temperature of shape"),
    ]
    for overrides, error, match in cases:
        with pytest.raises(error, match=match):
            call(**overrides)


def test_sparse_kd_loss_check_ids_catches_bad_ids_by_default_and_only_when_asked():
    student, labels = torch.randn(3, 10), torch.tensor([1, 2, 3])
    ids, values = topk(torch.randn(3, 10), 4)
    out_of_range, repeated = ids.clamp_max(3) * 4, ids.clone().fill_(2)
    for bad, match in ((out_of_range, r"token ids in \[0, 10\)"), (repeated, "unique per")):
        for function in (dk.sparse_kd_loss, _fused_on_identity):
            with pytest.raises(ValueError, match=match):  # the default checks
                function(student, bad, values, labels, alpha=0.5)
    # check_ids=False skips the id checks (a repeated id is then counted twice, no error) ...
    dk.sparse_kd_loss(student, repeated, values, labels, alpha=0.5, check_ids=False)
    # ... but not the value checks, nor its own type check.
    with pytest.raises(ValueError, match="log-probabilities"):
        dk.sparse_kd_loss(student, ids, values.abs() + 1, labels, alpha=0.5, check_ids=False)
    with pytest.raises(TypeError, match="check_ids must be a bool"):
        dk.sparse_kd_loss(student, ids, values, labels, alpha=0.5, check_ids="no")


def _fused_on_identity(student, ids, values, labels, **options):
    """fused_linear_sparse_kd_loss with hidden = the logits and W = I: z = h Wᵀ = logits."""
    weight = torch.eye(student.shape[-1], dtype=student.dtype)
    return dk.fused_linear_sparse_kd_loss(student, weight, ids, values, labels, **options)


@pytest.mark.parametrize("function", [dk.sparse_kd_loss, _fused_on_identity])
@pytest.mark.parametrize("representation", ["topk", "sampled"])
def test_sparse_kd_loss_check_ids_false_gives_the_same_loss_on_good_ids(function, representation):
    """Good ids: the opt-out changes no value or gradient; both match the float64 reference."""
    student = logits(4, 6, 23, dtype=torch.float64, seed=1).requires_grad_(True)
    teacher = logits(4, 6, 23, dtype=torch.float64, seed=2)
    labels = torch.randint(23, (4, 6), generator=torch.Generator().manual_seed(3))
    ids, values = shuffled(*topk(teacher, 5, pad=2))
    if representation == "sampled":
        values = torch.randint(1, 4, values.shape, generator=torch.Generator().manual_seed(5))
        values = values.double().masked_fill(ids < 0, 0.0)
    results = []
    for check_ids in (True, False):
        loss = function(
            student, ids, values, labels, alpha=0.7, representation=representation,
            check_ids=check_ids,
        )  # fmt: skip
        (grad,) = torch.autograd.grad(loss.total, student)
        results.append((loss, grad))
    (checked, checked_grad), (unchecked, unchecked_grad) = results
    for a, b in zip(checked, unchecked, strict=True):
        assert torch.equal(a.detach(), b.detach())
    assert torch.equal(checked_grad, unchecked_grad)
    ref_student = student.detach().clone().requires_grad_(True)
    expected = reference.sparse_kd(
        ref_student, ids, values, labels, temperature=1.0, alpha=0.7, tail="bucket",
        representation=representation,
    )  # fmt: skip
    for got, want in zip(unchecked, expected, strict=True):
        torch.testing.assert_close(got.double().detach(), want.detach(), rtol=1e-10, atol=1e-12)
    (ref_grad,) = torch.autograd.grad(expected[0], ref_student)
    torch.testing.assert_close(unchecked_grad, ref_grad, rtol=1e-9, atol=1e-12)


def test_docs_sparse_example_runs_as_written(tmp_path):
    script = doc_example("losses.md", "## Sparse teacher targets", tmp_path)
    namespace = runpy.run_path(str(script))
    assert namespace["student_logits"].grad is not None
    assert namespace["ids"].dtype == torch.int16 and torch.isfinite(namespace["loss"].total)
