"""fused_linear_kd_loss against kd_loss on the full logits: values, gradients, memory, errors."""

from __future__ import annotations

import os
import weakref

import pytest
import torch

import darkknowledge as dk
from darkknowledge.losses.fused import fused_linear_kd_loss

DIVERGENCES = ["forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd"]


def make_inputs(
    tokens=(2, 7), student_dim=8, teacher_dim=12, vocab=33, dtype=torch.float64, bias=True, seed=0
):
    """Student/teacher hidden states and output layers with a few ignored labels."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    inputs = {
        "student_hidden": randn(*tokens, student_dim).requires_grad_(),
        "student_weight": randn(vocab, student_dim, scale=0.5).requires_grad_(),
        "teacher_hidden": randn(*tokens, teacher_dim),
        "teacher_weight": randn(vocab, teacher_dim, scale=0.5),
        "labels": torch.randint(vocab, tokens, generator=gen),
    }
    inputs["labels"].view(-1)[::4] = -100
    if bias:
        inputs["student_bias"] = randn(vocab).requires_grad_()
        inputs["teacher_bias"] = randn(vocab)
    return inputs


def project(hidden, weight, bias=None, scale=1.0, softcap=None):
    """The unfused logits, in float64: scale·(h Wᵀ + b), then the optional softcap."""
    logits = hidden.double() @ weight.double().T
    if bias is not None:
        logits = logits + bias.double()
    logits = logits * scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


def reference(inputs, scales=(1.0, 1.0), softcaps=(None, None), **options):
    """kd_loss on the full float64 logits, and its gradients for the student tensors."""
    leaves = {
        k: v.detach().double().requires_grad_()
        for k, v in inputs.items()
        if k.startswith("student")
    }
    student = project(
        leaves["student_hidden"],
        leaves["student_weight"],
        leaves.get("student_bias"),
        scales[0],
        softcaps[0],
    )
    teacher = project(
        inputs["teacher_hidden"],
        inputs["teacher_weight"],
        inputs.get("teacher_bias"),
        scales[1],
        softcaps[1],
    )
    loss = dk.kd_loss(student, teacher, inputs["labels"], **options)
    grads = torch.autograd.grad(loss.total, list(leaves.values()))
    return loss, dict(zip(leaves, grads))


def fused(inputs, **options):
    loss = fused_linear_kd_loss(
        inputs["student_hidden"],
        inputs["student_weight"],
        inputs["teacher_hidden"],
        inputs["teacher_weight"],
        inputs["labels"],
        student_bias=inputs.get("student_bias"),
        teacher_bias=inputs.get("teacher_bias"),
        **options,
    )
    names = [k for k in inputs if k.startswith("student")]
    grads = torch.autograd.grad(loss.total, [inputs[k] for k in names])
    for name, grad in zip(names, grads):  # each gradient in its own input's dtype
        assert grad.dtype == inputs[name].dtype, (name, grad.dtype, inputs[name].dtype)
    return loss, dict(zip(names, grads))


def assert_close(fused_result, reference_result, rtol=1e-9, atol=1e-10):
    (loss, grads), (ref_loss, ref_grads) = fused_result, reference_result
    for name in ("total", "soft", "hard"):
        torch.testing.assert_close(
            getattr(loss, name).double(), getattr(ref_loss, name), rtol=rtol, atol=atol
        )
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad.double(), ref_grads[name], rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_fused_linear_kd_loss_matches_kd_loss_every_divergence(divergence):
    inputs = make_inputs()
    options = dict(temperature=2.0, alpha=0.7, divergence=divergence, beta=0.3, lam=0.2)
    # 14 rows in chunks of 4: the last chunk has 2 rows.
    assert_close(fused(inputs, chunk_size=4, **options), reference(inputs, **options))


@pytest.mark.parametrize("chunk_size", [1, 5, 14, 1000])
@pytest.mark.parametrize("bias", [True, False])
def test_fused_linear_kd_loss_independent_of_chunking(chunk_size, bias):
    inputs = make_inputs(bias=bias)
    options = dict(temperature=3.0, alpha=0.5)
    assert_close(fused(inputs, chunk_size=chunk_size, **options), reference(inputs, **options))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fused_linear_kd_loss_reductions_and_soft_scale(reduction):
    inputs = make_inputs()
    options = dict(temperature=1.5, alpha=0.9, reduction=reduction, soft_scale=0.5)
    assert_close(fused(inputs, chunk_size=3, **options), reference(inputs, **options))


def test_fused_linear_kd_loss_float32_close_to_float64_reference():
    inputs = make_inputs(dtype=torch.float32, vocab=300)
    options = dict(temperature=2.0, alpha=0.8, divergence="jsd")
    result = fused(inputs, chunk_size=4, **options)
    assert all(g.dtype == torch.float32 for g in result[1].values())
    assert_close(result, reference(inputs, **options), rtol=1e-4, atol=1e-6)


def test_fused_linear_kd_loss_bfloat16_within_tolerance():
    inputs = make_inputs(dtype=torch.bfloat16, vocab=300)
    options = dict(temperature=2.0, alpha=0.8)
    loss, grads = fused(inputs, chunk_size=4, **options)
    assert all(g.dtype == torch.bfloat16 for g in grads.values())
    ref_loss, ref_grads = reference(inputs, **options)
    torch.testing.assert_close(loss.total.double(), ref_loss.total, rtol=2e-2, atol=1e-3)
    for name, grad in grads.items():
        error = (grad.double() - ref_grads[name]).norm() / ref_grads[name].norm()
        assert error < 3e-2, name


def test_fused_linear_kd_loss_under_autocast_runs_products_in_autocast_dtype():
    """Under bfloat16 autocast the products see bfloat16 inputs (as nn.Linear would) and the
    gradients come back in the parameters' float32: compared with the float64 reference on the
    bfloat16-rounded inputs, and visibly off the plain float32 result."""
    inputs = make_inputs(dtype=torch.float32, vocab=300)
    options = dict(temperature=2.0, alpha=0.8, chunk_size=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads = fused(inputs, **options)
    rounded = {
        k: v.detach().to(torch.bfloat16).double().requires_grad_(v.requires_grad)
        if v.is_floating_point()
        else v
        for k, v in inputs.items()
    }
    ref_loss, ref_grads = reference(rounded, temperature=2.0, alpha=0.8)
    # The products themselves are rounded to bfloat16 (8 bits): relative errors of ~1e-2.
    torch.testing.assert_close(loss.total.double(), ref_loss.total, rtol=2e-2, atol=1e-3)
    for name, grad in grads.items():
        error = (grad.double() - ref_grads[name]).norm() / ref_grads[name].norm()
        assert error < 3e-2, name
    plain, _ = fused(inputs, **options)
    exact, _ = reference(inputs, temperature=2.0, alpha=0.8)
    assert abs(plain.total.double() - exact.total) < 1e-5 < abs(loss.total.double() - exact.total)


@pytest.mark.skipif(
    not os.environ.get("DK_SLOW_TESTS"), reason="torch.compile traces kd_loss for about a minute"
)
def test_fused_linear_kd_loss_compiled_matches_eager():
    inputs = make_inputs(dtype=torch.float32, vocab=300)
    for temperature in (2.0, 3.0):  # a new temperature must not change the compiled result
        options = dict(temperature=temperature, alpha=0.8, chunk_size=4)
        compiled_loss, compiled_grads = fused(inputs, compile="aot_eager", **options)
        loss, grads = fused(inputs, **options)
        torch.testing.assert_close(compiled_loss.total, loss.total)
        for name, grad in grads.items():
            torch.testing.assert_close(compiled_grads[name], grad, msg=name)


def test_fused_linear_kd_loss_logit_scale_and_softcap():
    inputs = make_inputs()
    options = dict(temperature=2.0, alpha=0.6, divergence="reverse_kl")
    result = fused(
        inputs,
        chunk_size=5,
        student_logit_scale=0.7,
        teacher_logit_scale=1.3,
        student_softcap=2.0,
        teacher_softcap=3.0,
        **options,
    )
    expected = reference(inputs, scales=(0.7, 1.3), softcaps=(2.0, 3.0), **options)
    assert_close(result, expected)
    # The softcap really changes the loss (it is not silently ignored).
    plain = fused(inputs, chunk_size=5, **options)
    assert not torch.allclose(plain[0].total, result[0].total)


def test_fused_linear_kd_loss_all_masked_is_zero_with_zero_grads():
    inputs = make_inputs()
    inputs["labels"].fill_(-100)
    loss, grads = fused(inputs, chunk_size=4, temperature=2.0, alpha=0.5)
    assert loss.total.item() == 0.0 and loss.soft.item() == 0.0 and loss.hard.item() == 0.0
    for grad in grads.values():
        assert torch.isfinite(grad).all() and not grad.any()


def test_fused_linear_kd_loss_per_position_temperature_gets_its_gradient():
    inputs = make_inputs()
    temperature = (1.0 + torch.rand(2, 7, dtype=torch.float64)).requires_grad_()
    loss = fused_linear_kd_loss(
        inputs["student_hidden"], inputs["student_weight"], inputs["teacher_hidden"],
        inputs["teacher_weight"], inputs["labels"], temperature=temperature, alpha=0.9, chunk_size=3,
    )  # fmt: skip
    grad = torch.autograd.grad(loss.total, temperature)[0]
    t_ref = temperature.detach().clone().requires_grad_()
    ref = dk.kd_loss(
        project(inputs["student_hidden"], inputs["student_weight"]),
        project(inputs["teacher_hidden"], inputs["teacher_weight"]),
        inputs["labels"], temperature=t_ref, alpha=0.9,
    )  # fmt: skip
    torch.testing.assert_close(loss.total, ref.total)
    torch.testing.assert_close(grad, torch.autograd.grad(ref.total, t_ref)[0])


@pytest.mark.parametrize(
    "options",
    [dict(divergence="jsd"), dict(divergence="forward_kl", student_logit_scale=0.9)],
    ids=["autograd", "closed_form"],
)
def test_fused_linear_kd_loss_gradcheck(options):
    inputs = make_inputs(tokens=(5,), student_dim=3, teacher_dim=4, vocab=6)

    def loss_of(hidden, weight, bias):
        return fused_linear_kd_loss(
            hidden, weight, inputs["teacher_hidden"], inputs["teacher_weight"], inputs["labels"],
            student_bias=bias, teacher_bias=inputs["teacher_bias"], temperature=2.0, alpha=0.6,
            chunk_size=2, **options,
        ).total  # fmt: skip

    student = (inputs["student_hidden"], inputs["student_weight"], inputs["student_bias"])
    assert torch.autograd.gradcheck(loss_of, student)


def test_fused_linear_kd_loss_scales_stored_gradients_by_grad_output():
    inputs = make_inputs()
    _, grads = fused(inputs, chunk_size=4, temperature=2.0, alpha=0.5)
    loss = fused_linear_kd_loss(
        inputs["student_hidden"], inputs["student_weight"], inputs["teacher_hidden"],
        inputs["teacher_weight"], inputs["labels"], temperature=2.0, alpha=0.5, chunk_size=4,
        student_bias=inputs["student_bias"], teacher_bias=inputs["teacher_bias"],
    )  # fmt: skip
    scaled = torch.autograd.grad(-3.0 * loss.total, inputs["student_weight"])[0]
    torch.testing.assert_close(scaled, -3.0 * grads["student_weight"])


def test_fused_linear_kd_loss_without_grad_gives_the_same_values():
    inputs = make_inputs()
    options = dict(temperature=2.0, alpha=0.5, chunk_size=4)
    with torch.no_grad():
        loss = fused_linear_kd_loss(
            inputs["student_hidden"], inputs["student_weight"], inputs["teacher_hidden"],
            inputs["teacher_weight"], inputs["labels"], **options,
        )  # fmt: skip
    assert not loss.total.requires_grad
    ref, _ = reference(
        {k: v for k, v in inputs.items() if "bias" not in k}, temperature=2.0, alpha=0.5
    )
    torch.testing.assert_close(loss.total, ref.total)


def test_fused_linear_kd_loss_gradient_accumulation_with_global_normalizer():
    inputs = make_inputs(tokens=(6, 5))
    options = dict(temperature=2.0, alpha=0.7, chunk_size=4)
    whole, whole_grads = fused(inputs, **options)
    global_count = dk.count_valid(inputs["labels"])
    total = 0.0
    grads = {k: 0.0 for k in whole_grads}
    for rows in (slice(0, 2), slice(2, 3), slice(3, 6)):  # micro-batches of 2, 1 and 3 sequences
        micro = {k: v[rows] if "hidden" in k or k == "labels" else v for k, v in inputs.items()}
        micro = {k: v.detach().requires_grad_(v.requires_grad) for k, v in micro.items()}
        loss, micro_grads = fused(micro, normalizer=global_count, **options)
        total = total + loss.total
        for name, grad in micro_grads.items():
            grads[name] = grads[name] + (grad if "hidden" not in name else 0.0)
        hidden_grad = micro_grads["student_hidden"]
        torch.testing.assert_close(hidden_grad, whole_grads["student_hidden"][rows])
    torch.testing.assert_close(total, whole.total)
    for name in ("student_weight", "student_bias"):
        torch.testing.assert_close(grads[name], whole_grads[name])


class SavedBytes:
    """Bytes saved for backward and still held once the forward pass is over.

    A pack hook wraps every saved tensor in a holder and keeps a weak reference to it; the
    holders still alive after the forward pass are what the graph keeps for backward (the fused
    loss's own per-chunk graphs are freed inside its forward). Storages are counted once.
    """

    class Holder:
        def __init__(self, tensor):
            self.tensor = tensor

    def __init__(self):
        self.holders = []

    def pack(self, tensor):
        holder = self.Holder(tensor)
        self.holders.append(weakref.ref(holder))
        return holder

    @staticmethod
    def unpack(holder):
        return holder.tensor

    def alive_bytes(self):
        storages = {}
        for ref in self.holders:
            holder = ref()
            if holder is not None:
                storage = holder.tensor.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
        return sum(storages.values())


def saved_bytes(tokens, vocab, *, naive, chunk_size=16, hidden=8):
    inputs = make_inputs(
        tokens=(tokens,), student_dim=hidden, teacher_dim=hidden, vocab=vocab, dtype=torch.float32
    )
    counter = SavedBytes()
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
        if naive:
            student = inputs["student_hidden"] @ inputs["student_weight"].T + inputs["student_bias"]
            teacher = inputs["teacher_hidden"] @ inputs["teacher_weight"].T + inputs["teacher_bias"]
            loss = dk.kd_loss(student, teacher, inputs["labels"], temperature=2.0, alpha=0.5)
        else:
            loss = fused_linear_kd_loss(
                inputs["student_hidden"], inputs["student_weight"], inputs["teacher_hidden"],
                inputs["teacher_weight"], inputs["labels"], student_bias=inputs["student_bias"],
                teacher_bias=inputs["teacher_bias"], temperature=2.0, alpha=0.5, chunk_size=chunk_size,
            )  # fmt: skip
        held = counter.alive_bytes()
    loss.total.backward()  # the saved tensors are usable
    return held


def test_fused_linear_kd_loss_saves_only_gradient_buffers():
    vocab, hidden, chunk_size = 2000, 8, 16
    chunk_logits = chunk_size * vocab * 4
    for tokens in (64, 256):
        gradients = (tokens * hidden + vocab * hidden + vocab) * 4
        fused_bytes = saved_bytes(tokens, vocab, naive=False, chunk_size=chunk_size)
        naive_bytes = saved_bytes(tokens, vocab, naive=True)
        assert fused_bytes <= gradients + 2 * chunk_logits
        # The naive graph keeps at least one (tokens, vocab) float32 tensor (kd_loss keeps two).
        assert naive_bytes >= tokens * vocab * 4
    growth = saved_bytes(256, vocab, naive=True) - saved_bytes(64, vocab, naive=True)
    assert growth >= (256 - 64) * vocab * 4


def test_fused_linear_kd_loss_padding_vocabulary_with_vocab_size():
    inputs = make_inputs(vocab=40)
    # The student has 40 rows, the teacher 33 real rows + 7 padding: cut both to 33.
    inputs["teacher_weight"] = inputs["teacher_weight"][:33]
    inputs["teacher_bias"] = inputs["teacher_bias"][:33]
    inputs["labels"] = inputs["labels"].clamp_max(32)
    loss, grads = fused(inputs, chunk_size=4, temperature=2.0, alpha=0.5, vocab_size=33)
    cut = dict(inputs)
    cut["student_weight"] = inputs["student_weight"][:33]
    cut["student_bias"] = inputs["student_bias"][:33]
    ref_loss, ref_grads = reference(cut, temperature=2.0, alpha=0.5)
    torch.testing.assert_close(loss.total, ref_loss.total)
    assert grads["student_weight"].shape == (40, 8)
    torch.testing.assert_close(grads["student_weight"][:33], ref_grads["student_weight"])
    assert not grads["student_weight"][33:].any() and not grads["student_bias"][33:].any()


def call(inputs, **options):
    options = {"temperature": 2.0, "alpha": 0.5, **options}
    return fused_linear_kd_loss(
        inputs["student_hidden"], inputs["student_weight"], inputs["teacher_hidden"],
        inputs["teacher_weight"], inputs["labels"], **options,
    )  # fmt: skip


def test_fused_linear_kd_loss_rejects_vocab_mismatch():
    inputs = make_inputs(vocab=40, bias=False)
    inputs["teacher_weight"] = inputs["teacher_weight"][:33]
    with pytest.raises(ValueError, match=r"40 rows.*33.*vocab_size="):
        call(inputs)
    with pytest.raises(ValueError, match=r"vocab_size must be in \[1, 33\].*vocab_size=39"):
        call(inputs, vocab_size=39)
    inputs["labels"] = inputs["labels"].clamp_min(0).fill_(35)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 30\).*35"):
        call(inputs, vocab_size=30)


def test_fused_linear_kd_loss_rejects_bad_shapes_and_options():
    inputs = make_inputs(bias=False)
    bad_hidden = dict(inputs, teacher_hidden=inputs["teacher_hidden"][:, :5])
    with pytest.raises(ValueError, match=r"same leading.*\(2, 7, 8\) and \(2, 5, 12\)"):
        call(bad_hidden)
    bad_weight = dict(inputs, student_weight=inputs["student_weight"][:, :5])
    with pytest.raises(
        ValueError, match=r"student_weight must have shape \(V, H\) with H = .* = 8, got \(33, 5\)"
    ):
        call(bad_weight)
    for chunk_size in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match=f"chunk_size={chunk_size!r}"):
            call(inputs, chunk_size=chunk_size)
    with pytest.raises(ValueError, match="reduction"):
        call(inputs, reduction="none")
    with pytest.raises(ValueError, match="needs labels"):
        call(dict(inputs, labels=None))
    with pytest.raises(ValueError, match="student_softcap"):
        call(inputs, student_softcap=0.0)
    with pytest.raises(TypeError, match="same dtype"):
        call(dict(inputs, student_weight=inputs["student_weight"].float()))
    with pytest.raises(ValueError, match="divergence"):
        call(inputs, divergence="kl")
    with pytest.raises(TypeError, match="compile"):
        call(inputs, compile=1)


# The default objective (forward KL at a float temperature) runs in closed form
# (engine.forward_kl.ForwardKL); these cover each of its branches against the float64 reference.
CLOSED_FORM_CASES = [
    dict(temperature=1.0, alpha=0.5),  # T = 1: softmax(s) is q, one exponential fewer
    dict(temperature=1.0, alpha=0.0),  # hard term only, at T = 1
    dict(temperature=2.0, alpha=0.0),  # hard term only: the gradient's base is softmax(s)
    dict(temperature=2.0, alpha=1.0),  # soft term only, the hard term still reported
    dict(temperature=3.0, alpha=0.7, soft_scale=0.0),  # soft weight 0 with alpha > 0
    dict(temperature=1.0, alpha=1.0, soft_scale=0.0),  # no gradient at all
    dict(temperature=0.5, alpha=0.3, soft_scale="none", reduction="sum"),
]


def count_closed_form_chunks(monkeypatch):
    from darkknowledge.losses.engine import forward_kl

    calls = []
    original = forward_kl.ForwardKL.__call__

    def counting(self, chunk):
        calls.append(chunk.rows)
        return original(self, chunk)

    monkeypatch.setattr(forward_kl.ForwardKL, "__call__", counting)
    return calls


@pytest.mark.parametrize("options", CLOSED_FORM_CASES, ids=str)
def test_fused_forward_kl_closed_form_matches_kd_loss(options, monkeypatch):
    calls = count_closed_form_chunks(monkeypatch)
    inputs = make_inputs()
    scales = dict(student_logit_scale=0.8, teacher_logit_scale=1.25)
    result = fused(inputs, chunk_size=4, **scales, **options)
    assert len(calls) == 4  # 14 rows in chunks of 4: it really ran
    assert_close(result, reference(inputs, scales=(0.8, 1.25), **options))


def test_fused_forward_kl_closed_form_without_labels(monkeypatch):
    calls = count_closed_form_chunks(monkeypatch)
    inputs = make_inputs()
    inputs["labels"] = None
    result = fused(inputs, chunk_size=5, temperature=2.0, alpha=1.0)
    assert calls and result[0].hard.item() == 0.0
    assert_close(result, reference(inputs, temperature=2.0, alpha=1.0))


def test_fused_forward_kl_masked_vocabulary_bias_in_closed_form(monkeypatch):
    """-inf bias entries (masked tokens) in both output layers: the closed form gives the loss
    and gradients of the vocabulary without them, and a zero gradient at them."""
    calls = count_closed_form_chunks(monkeypatch)
    inputs = make_inputs()
    masked, kept = [3, 20], [v for v in range(33) if v not in (3, 20)]
    for name in ("student_bias", "teacher_bias"):
        inputs[name] = inputs[name].detach().clone()
        inputs[name][masked] = float("-inf")
    inputs["student_bias"].requires_grad_(True)
    inputs["labels"][inputs["labels"] == 3] = 4
    inputs["labels"][inputs["labels"] == 20] = 4
    options = dict(temperature=2.0, alpha=0.5)
    loss, grads = fused(inputs, chunk_size=4, **options)
    assert calls  # the closed form ran
    sliced = dict(inputs)
    for name in ("student_weight", "teacher_weight", "student_bias", "teacher_bias"):
        sliced[name] = inputs[name].detach()[kept].requires_grad_(name.startswith("student"))
    relabel = torch.full((33,), -100, dtype=torch.long)
    relabel[kept] = torch.arange(len(kept))
    sliced["labels"] = torch.where(
        inputs["labels"] >= 0, relabel[inputs["labels"].clamp_min(0)], -100
    )
    ref_loss, ref_grads = reference(sliced, **options)
    for name in ("total", "soft", "hard"):
        torch.testing.assert_close(getattr(loss, name), getattr(ref_loss, name))
    torch.testing.assert_close(grads["student_hidden"], ref_grads["student_hidden"])
    torch.testing.assert_close(grads["student_weight"][kept], ref_grads["student_weight"])
    torch.testing.assert_close(grads["student_bias"][kept], ref_grads["student_bias"])
    assert not grads["student_weight"][masked].any() and not grads["student_bias"][masked].any()


def test_fused_forward_kl_masked_entries_on_one_side_stay_finite():
    """A teacher -inf is probability 0 there (the KL of the rest, no NaN); a student -inf where
    the teacher has mass gives a huge but finite KL, and finite gradients."""
    inputs = make_inputs()
    teacher_only = dict(inputs, teacher_bias=inputs["teacher_bias"].clone())
    teacher_only["teacher_bias"][7] = float("-inf")
    loss, grads = fused(teacher_only, chunk_size=4, temperature=2.0, alpha=0.5)
    # jsd with beta = 0 is forward KL computed by soften + kl, not by the closed form.
    expected = dk.kd_loss(
        project(inputs["student_hidden"], inputs["student_weight"], inputs["student_bias"]),
        project(inputs["teacher_hidden"], inputs["teacher_weight"], teacher_only["teacher_bias"]),
        inputs["labels"], temperature=2.0, alpha=0.5, divergence="jsd", beta=0.0,
    )  # fmt: skip
    torch.testing.assert_close(loss.total, expected.total)
    assert all(torch.isfinite(grad).all() for grad in grads.values())
    student_only = dict(inputs, student_bias=inputs["student_bias"].detach().clone())
    student_only["student_bias"][7] = float("-inf")
    student_only["student_bias"].requires_grad_(True)
    loss, grads = fused(student_only, chunk_size=4, temperature=2.0, alpha=0.5)
    assert torch.isfinite(loss.total) and loss.soft > 1e15
    assert all(torch.isfinite(grad).all() for grad in grads.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])  # closed form, autograd
def test_fused_linear_kd_loss_on_cuda(dtype, divergence):
    inputs = make_inputs(dtype=dtype, vocab=300, tokens=(3, 40))
    inputs = {
        k: v.detach().cuda().requires_grad_(v.requires_grad) if v.is_floating_point() else v.cuda()
        for k, v in inputs.items()
    }
    options = dict(temperature=2.0, alpha=0.8, divergence=divergence)
    loss, grads = fused(inputs, chunk_size=16, **options)
    ref_loss, ref_grads = reference(inputs, **options)
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(loss.total.double(), ref_loss.total, rtol=tolerance, atol=1e-4)
    for name, grad in grads.items():
        assert grad.device.type == "cuda" and grad.dtype == dtype
        error = (grad.double() - ref_grads[name]).norm() / ref_grads[name].norm()
        assert error < (1e-5 if dtype == torch.float32 else 3e-2), name
