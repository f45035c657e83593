"""The two head forms on a tiny GPT-2: shapes, which positions each depth reads, the starting
point, sizes read from the model, safetensors round trips, and training with the student."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch
import transformers
from mtp_models import tiny_lm

from darkknowledge.llm import last_hidden_states, output_layer, shift_labels
from darkknowledge.mtp import (
    MTPStudent,
    ParallelMTPHeads,
    SequentialMTPModules,
    heads_for_model,
    load_heads,
    mtp_batch_loss,
    save_heads,
)


def perturbed(heads):
    """The heads with every parameter moved, so that no depth is the identity."""
    with torch.no_grad():
        for parameter in heads.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    return heads


@pytest.mark.parametrize("kind", ["parallel", "sequential"])
def test_heads_for_model_shapes_and_sizes_from_the_model(kind):
    model = tiny_lm(n_embd=16)
    student = MTPStudent.from_model(model, kind, num_depths=3, intermediate_size=24)
    ids = torch.randint(32, (2, 7))
    out = student(ids, torch.ones_like(ids))
    assert torch.equal(out.hidden, last_hidden_states(model, ids))
    assert [tuple(h.shape) for h in out.depth_hidden] == [(2, 7, 16)] * 3
    assert student.heads.hidden_size == 16 and student.heads.norm == "layer"
    assert student.heads.eps == model.config.layer_norm_epsilon


def test_heads_for_model_uses_rms_norm_for_a_llama_config():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=24, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, rms_norm_eps=1e-6,
    )  # fmt: skip
    heads = heads_for_model(transformers.LlamaForCausalLM(config), "sequential", 2)
    assert heads.norm == "rms" and heads.eps == 1e-6
    assert isinstance(heads.layers[0].hidden_norm, torch.nn.RMSNorm)


def test_parallel_heads_start_as_the_model_next_token_head():
    """W_down starts at zero: every fresh parallel head returns the trunk's state unchanged."""
    heads = ParallelMTPHeads(8, 3)
    trunk = torch.randn(2, 5, 8)
    assert all(torch.equal(state, trunk) for state in heads(trunk))


def test_parallel_heads_row_i_reads_trunk_row_i_only():
    heads = perturbed(ParallelMTPHeads(8, 2))
    trunk = torch.randn(1, 6, 8)
    changed = trunk.clone()
    changed[0, 3] += 1.0
    for before, after in zip(heads(trunk), heads(changed)):
        moved = (before - after).abs().sum(-1)[0] > 0  # (T,)
        assert moved.tolist() == [i == 3 for i in range(6)]


def test_sequential_modules_depth_k_row_i_reads_tokens_i_plus_1_to_i_plus_k():
    """DeepSeek-V3's chain: depth k at row i reads the embeddings of tokens i+1..i+k (the last
    directly, the others through the previous depths) and the trunk at i."""
    torch.manual_seed(0)
    modules = perturbed(SequentialMTPModules(8, 3))
    embedding = torch.nn.Embedding(20, 8)
    trunk, ids = torch.randn(1, 8, 8), torch.randint(20, (1, 8))
    changed = ids.clone()
    j = 5
    changed[0, j] = (ids[0, j] + 1) % 20
    for depth, (before, after) in enumerate(
        zip(modules(trunk, ids, embedding), modules(trunk, changed, embedding)), start=1
    ):
        moved = (before - after).abs().sum(-1)[0] > 0
        assert moved.tolist() == [i + 1 <= j <= i + depth for i in range(8)], depth


def test_sequential_modules_need_tokens_and_embeddings():
    modules = SequentialMTPModules(8, 2)
    with pytest.raises(ValueError, match="needs input_ids"):
        modules(torch.randn(1, 4, 8))
    with pytest.raises(ValueError, match="input_ids must have shape"):
        modules(torch.randn(1, 4, 8), torch.zeros(1, 5, dtype=torch.long), torch.nn.Embedding(4, 8))


@pytest.mark.parametrize(
    ("arguments", "match"),
    [
        ({"num_depths": 0}, "num_depths"),
        ({"norm": "batch"}, "norm"),
        ({"hidden_size": 2.5}, "hidden_size"),
    ],
)
def test_heads_refuse_bad_sizes(arguments, match):
    with pytest.raises(ValueError, match=match):
        ParallelMTPHeads(**{"hidden_size": 8, "num_depths": 2, **arguments})


def test_student_refuses_heads_of_another_width():
    with pytest.raises(ValueError, match="hidden size 8"):
        MTPStudent(tiny_lm(n_embd=16), ParallelMTPHeads(8, 2))
    with pytest.raises(TypeError, match="heads must be"):
        MTPStudent(tiny_lm(), torch.nn.Linear(2, 2))


@pytest.mark.parametrize("kind", ["parallel", "sequential"])
def test_save_heads_and_load_heads_round_trip_through_safetensors(kind, tmp_path):
    model = tiny_lm()
    heads = perturbed(heads_for_model(model, kind, 2, intermediate_size=12))
    save_heads(heads, tmp_path / "heads.safetensors")
    loaded = load_heads(tmp_path / "heads.safetensors")
    assert type(loaded) is type(heads) and loaded.spec() == heads.spec()
    trunk, ids = torch.randn(2, 5, 16), torch.randint(32, (2, 5))
    embeddings = model.get_input_embeddings()
    for a, b in zip(heads(trunk, ids, embeddings), loaded(trunk, ids, embeddings)):
        assert torch.equal(a, b)
    safetensors.torch.save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="holds no MTP heads"):
        load_heads(tmp_path / "other.safetensors")


def test_student_state_dict_holds_model_and_heads_once(tmp_path):
    """Keys model.* and heads.*; the heads own no copy of the (tied) embedding; the whole
    student goes through safetensors and back."""
    student = MTPStudent.from_model(tiny_lm(), "sequential", 2)
    perturbed(student.heads)
    keys = list(student.state_dict())
    assert all(k.startswith(("model.", "heads.")) for k in keys)
    assert not any("wte" in k for k in keys if k.startswith("heads."))
    head_parameters = sum(p.numel() for p in student.heads.parameters())
    assert sum(p.numel() for p in student.parameters()) == head_parameters + sum(
        p.numel() for p in student.model.parameters()
    )
    safetensors.torch.save_model(student, str(tmp_path / "student.safetensors"))
    fresh = MTPStudent.from_model(tiny_lm(seed=5), "sequential", 2)
    safetensors.torch.load_model(fresh, str(tmp_path / "student.safetensors"))
    ids = torch.randint(32, (1, 6))
    for a, b in zip(student(ids).depth_hidden, fresh(ids).depth_hidden):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["parallel", "sequential"])
def test_student_trains_heads_and_trunk_together(kind):
    """One optimizer over MTPStudent.parameters(): every depth's loss falls, and the heads, the
    trunk and the shared embedding all receive gradients."""
    student = MTPStudent.from_model(tiny_lm(), kind, 2, intermediate_size=32)
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-2)
    ids = torch.randint(32, (4, 12), generator=torch.Generator().manual_seed(1))
    labels = shift_labels(ids)
    first = None
    for _ in range(25):
        loss = mtp_batch_loss(student, ids, labels, depth_weights=[1.0, 0.5], chunk_size=16)
        optimizer.zero_grad()
        loss.total.backward()
        if first is None:
            first = loss
            assert all(p.grad is not None for p in student.heads.parameters())
            assert output_layer(student.model).weight.grad.abs().sum() > 0
            assert student.model.transformer.h[0].mlp.c_fc.weight.grad.abs().sum() > 0
        optimizer.step()
    assert sorted(loss.per_depth) == [0, 1, 2]
    for depth in (0, 1, 2):
        assert float(loss.per_depth[depth].hard) < 0.7 * float(first.per_depth[depth].hard)


@pytest.mark.parametrize("kind", ["parallel", "sequential"])
def test_mtp_batch_loss_under_bfloat16_autocast_is_close_to_float32(kind):
    """The Distiller runs the loss under autocast: the heads' products and the fused loss's
    run in bfloat16, the loss math in float32, the gradients reach the float32 parameters."""
    student = MTPStudent.from_model(tiny_lm(), kind, 2)
    perturbed(student.heads)
    teacher = tiny_lm(1, n_embd=24).eval()
    ids = torch.randint(32, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        teacher_hidden = last_hidden_states(teacher, ids)
    options = {
        "teacher_hidden": teacher_hidden, "teacher_layer": output_layer(teacher),
        "temperature": 2.0, "alpha": 0.5,
    }  # fmt: skip
    full = mtp_batch_loss(student, ids, shift_labels(ids), **options)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = mtp_batch_loss(student, ids, shift_labels(ids), **options)
    mixed.total.backward()
    assert mixed.total.dtype == torch.float32
    torch.testing.assert_close(mixed.total, full.total, rtol=2e-2, atol=0.0)
    grads = [p.grad for p in student.heads.parameters()]
    assert all(
        g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads
    )
