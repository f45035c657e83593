"""dk.mtp.mtp_kd_loss against a naive per-depth float64 reference with explicit shifting:
values, per-depth parts, and gradients with respect to the heads, the trunk and the output layer."""

from __future__ import annotations

import copy

import pytest
import torch
from mtp_models import IGNORE, padded_batch, reference_mtp_loss

from darkknowledge.llm import OutputLayer, shift_labels
from darkknowledge.mtp import (
    ParallelMTPHeads,
    SequentialMTPModules,
    count_valid_per_depth,
    mtp_kd_loss,
)

VOCAB, HIDDEN, TEACHER_HIDDEN = 23, 8, 12
DEPTHS, WEIGHTS = [0, 1, 2, 3], [1.0, 0.7, 0.3, 0.15]


def make_heads(kind: str, dtype=torch.float32):
    torch.manual_seed(3)
    cls = ParallelMTPHeads if kind == "parallel" else SequentialMTPModules
    heads = cls(HIDDEN, num_depths=3, intermediate_size=10)
    with torch.no_grad():  # move the zero-initialised output layers off zero: gradients everywhere
        for parameter in heads.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    return heads.to(dtype)


def make_case(kind: str):
    torch.manual_seed(0)
    input_ids, attention_mask, targets = padded_batch(VOCAB)
    trunk = torch.randn(3, 9, HIDDEN, requires_grad=True)
    embedding = torch.nn.Embedding(VOCAB, HIDDEN)  # tied: also the output layer's weight
    teacher_hidden = torch.randn(3, 9, TEACHER_HIDDEN)
    teacher_weight = torch.randn(VOCAB, TEACHER_HIDDEN)
    return {
        "heads": make_heads(kind), "trunk": trunk, "embedding": embedding,
        "input_ids": input_ids, "attention_mask": attention_mask, "targets": targets,
        "teacher_hidden": teacher_hidden, "teacher_weight": teacher_weight,
    }  # fmt: skip


def run_implementation(case, **options):
    states = case["heads"](case["trunk"], case["input_ids"], case["embedding"])
    labels = shift_labels(case["targets"], case["attention_mask"])
    teacher = {}
    if options.pop("teacher", True):
        teacher = {
            "teacher_hidden": case["teacher_hidden"],
            "teacher_layer": OutputLayer(case["teacher_weight"], None),
        }
    loss = mtp_kd_loss(
        [case["trunk"], *states], OutputLayer(case["embedding"].weight, None), labels,
        attention_mask=case["attention_mask"], depths=DEPTHS, depth_weights=WEIGHTS,
        chunk_size=4, **teacher, **options,
    )  # fmt: skip
    loss.total.backward()
    return loss


def run_reference(case, **options):
    heads = copy.deepcopy(case["heads"]).double()
    embedding = copy.deepcopy(case["embedding"]).double()
    trunk = case["trunk"].detach().double().requires_grad_(True)
    states = heads(trunk, case["input_ids"], embedding)
    teacher = {}
    if options.pop("teacher", True):
        teacher = {
            "teacher_hidden": case["teacher_hidden"],
            "teacher_weight": case["teacher_weight"],
        }
    total, parts = reference_mtp_loss(
        [trunk, *states], embedding.weight, case["input_ids"], case["attention_mask"],
        case["targets"], DEPTHS, WEIGHTS, **teacher, **options,
    )  # fmt: skip
    total.backward()
    return total, parts, heads, embedding, trunk


def assert_matches(case, loss, reference_out):
    total, parts, heads, embedding, trunk = reference_out
    torch.testing.assert_close(loss.total.double(), total, rtol=1e-5, atol=1e-6)
    for depth in DEPTHS:
        got = torch.stack(list(loss.per_depth[depth])).double()
        torch.testing.assert_close(got, torch.stack(list(parts[depth])), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(case["trunk"].grad.double(), trunk.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(
        case["embedding"].weight.grad.double(), embedding.weight.grad, rtol=1e-4, atol=1e-6
    )
    for (name, got), expected in zip(case["heads"].named_parameters(), heads.parameters()):
        assert got.grad is not None, name
        torch.testing.assert_close(got.grad.double(), expected.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("kind", ["parallel", "sequential"])
@pytest.mark.parametrize(
    "options",
    [
        {"temperature": 2.0, "alpha": 0.6},  # closed form of forward KL
        {"temperature": 1.5, "alpha": 0.8, "divergence": "reverse_kl"},  # through autograd
        {"temperature": 2.0, "alpha": 1.0, "divergence": "tvd"},  # pure distillation
    ],
)
def test_mtp_kd_loss_matches_float64_reference(kind, options):
    case = make_case(kind)
    loss = run_implementation(case, **options)
    assert_matches(case, loss, run_reference(case, **options))
    # The combined parts are the weighted sums of the depths'.
    soft = sum(w * loss.per_depth[d].soft for d, w in zip(DEPTHS, WEIGHTS))
    torch.testing.assert_close(loss.soft, soft)


@pytest.mark.parametrize("kind", ["parallel", "sequential"])
def test_mtp_kd_loss_labels_only_is_cross_entropy_per_depth(kind):
    case = make_case(kind)
    loss = run_implementation(case, teacher=False)
    assert_matches(case, loss, run_reference(case, teacher=False))
    assert float(loss.soft) == 0.0


def test_mtp_kd_loss_alpha_zero_with_teacher_equals_labels_only():
    case = make_case("parallel")
    with_teacher = run_implementation(case, temperature=2.0, alpha=0.0)
    without = run_implementation(make_case("parallel"), teacher=False)
    torch.testing.assert_close(with_teacher.total, without.total)


def test_mtp_kd_loss_global_normalizer_accumulates_like_one_batch():
    """Two micro-batches with per-depth global counts sum to the one-batch loss and gradients;
    a scalar normalizer divides every depth by it."""
    case = make_case("sequential")
    options = {"temperature": 2.0, "alpha": 0.5, "teacher": True}
    whole = run_implementation(case, **options)
    whole_grad = case["trunk"].grad.clone()
    labels = shift_labels(case["targets"], case["attention_mask"])
    counts = count_valid_per_depth(labels, DEPTHS, case["attention_mask"])
    case["trunk"].grad = None
    total = 0.0
    for rows in (slice(0, 1), slice(1, 3)):
        part = {
            **case, "input_ids": case["input_ids"][rows], "targets": case["targets"][rows],
            "attention_mask": case["attention_mask"][rows], "teacher_hidden": case["teacher_hidden"][rows],
        }  # fmt: skip
        trunk = case["trunk"]
        part["trunk"] = trunk[rows]
        total = total + run_implementation(part, normalizer=counts, **options).total
    torch.testing.assert_close(total, whole.total)
    torch.testing.assert_close(case["trunk"].grad, whole_grad)
    # A scalar: every depth over the same count (as the Distiller passes its next-token count).
    scalar = run_implementation(make_case("sequential"), normalizer=20.0, **options)
    total_ref, _, *_ = run_reference(make_case("sequential"), normalizer=20.0, **options)
    torch.testing.assert_close(scalar.total.double(), total_ref, rtol=1e-5, atol=1e-6)


def test_mtp_kd_loss_depths_beyond_the_sequence_are_zero_not_nan():
    hidden = [torch.randn(2, 3, HIDDEN, requires_grad=True) for _ in range(3)]
    labels = torch.tensor([[1, 2, IGNORE], [3, 4, IGNORE]])
    loss = mtp_kd_loss(hidden, torch.randn(VOCAB, HIDDEN), labels)  # depths 1, 2, 3
    assert float(loss.per_depth[2].total) == 0.0 and float(loss.per_depth[3].total) == 0.0
    loss.total.backward()
    assert torch.isfinite(loss.total) and torch.isfinite(hidden[1].grad).all()
    assert hidden[1].grad.abs().sum() == 0 and hidden[2].grad is None  # no rows at depth 3
    assert hidden[0].grad.abs().sum() > 0


def test_mtp_kd_loss_zero_weight_depth_is_logged_without_gradient():
    hidden = [torch.randn(2, 6, HIDDEN, requires_grad=True) for _ in range(2)]
    labels = torch.randint(VOCAB, (2, 6))
    loss = mtp_kd_loss(hidden, torch.randn(VOCAB, HIDDEN), labels, depth_weights=[1.0, 0.0])
    loss.total.backward()
    assert float(loss.per_depth[2].total) > 0
    assert hidden[1].grad is None and hidden[0].grad.abs().sum() > 0


def test_mtp_kd_loss_never_holds_the_logits():
    """What autograd keeps is the chunk engine's gradient buffers, no (tokens, vocab) tensor;
    the naive loss on full logits keeps at least one (the check can fail)."""
    vocab, tokens = 3000, 2 * 40
    hidden = [torch.randn(2, 40, HIDDEN, requires_grad=True) for _ in range(3)]
    weight = torch.randn(vocab, HIDDEN, requires_grad=True)
    labels = torch.randint(vocab, (2, 40))

    def largest_saved(run):
        sizes = [0]

        def pack(tensor):
            sizes.append(tensor.numel())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            run()
        return max(sizes)

    fused = largest_saved(lambda: mtp_kd_loss(hidden, weight, labels, chunk_size=16))
    naive = largest_saved(
        lambda: torch.nn.functional.cross_entropy(
            hidden[0].reshape(tokens, -1) @ weight.T, labels.reshape(-1)
        )
    )
    assert naive >= tokens * vocab
    assert fused <= vocab * HIDDEN  # the output layer's gradient is the largest thing kept


@pytest.mark.parametrize(
    ("arguments", "error", "match"),
    [
        ({"depth_hidden": torch.randn(2, 5, 8)}, TypeError, "list of"),
        ({"depth_hidden": [torch.randn(2, 5, 8), torch.randn(2, 4, 8)]}, ValueError, "one shape"),
        ({"labels": torch.zeros(2, 4, dtype=torch.long)}, ValueError, "labels must be"),
        ({"depths": [1, 1]}, ValueError, "distinct"),
        ({"depth_weights": [1.0]}, ValueError, "depth_weights"),
        ({"depth_weights": [1.0, -1.0]}, ValueError, "depth_weights"),
        ({"alpha": 0.5}, ValueError, "needs a teacher"),
        ({"teacher_hidden": torch.randn(2, 5, 4)}, ValueError, "together"),
        (
            {"teacher_hidden": torch.randn(2, 5, 4), "teacher_layer": torch.randn(23, 4)},
            ValueError,
            "pass alpha",
        ),
        ({"normalizer": [1.0, 2.0, 3.0]}, ValueError, "one number per depth"),
        ({"student_layer": "lm_head"}, TypeError, "OutputLayer"),
    ],
)
def test_mtp_kd_loss_refuses_bad_arguments(arguments, error, match):
    call = {
        "depth_hidden": [torch.randn(2, 5, 8), torch.randn(2, 5, 8)],
        "student_layer": torch.randn(23, 8),
        "labels": torch.zeros(2, 5, dtype=torch.long),
        **arguments,
    }
    with pytest.raises(error, match=match):
        mtp_kd_loss(call.pop("depth_hidden"), call.pop("student_layer"), call.pop("labels"), **call)
