"""The Distiller on tiny CPU models: learning, frozen teacher, logs, accumulation, errors."""

from __future__ import annotations

import json

import pytest
import torch
import trainkit
from trainkit import loader, mlp, points, state, teacher_mlp

import darkknowledge as dk
from darkknowledge.losses import KDLoss, kd_loss

# Tiny models on a shared 2-core machine: intra-op threads only spin and wait.
pytestmark = pytest.mark.usefixtures("one_thread")


def test_distiller_loss_falls_and_teacher_stays_frozen(tmp_path):
    teacher, student = teacher_mlp(), mlp(0)
    teacher_before = state(teacher)
    distiller = dk.Distiller(
        student, teacher, loader(points(), 32, shuffle=True), max_steps=60, learning_rate=1e-2,
        eval_data=loader(points(128, seed=1), 64), eval_every=30, output_dir=tmp_path,
        log_every=5, progress=False,
    )  # fmt: skip
    result = distiller.fit()

    train = [r for r in result.history if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(5, 61, 5))
    assert train[-1]["total"] < 0.5 * train[0]["total"]
    assert result.final["eval_accuracy"] > 0.6  # the teacher labels the data: it is learnable
    assert [r["step"] for r in result.history if r["kind"] == "eval"] == [30, 60]
    assert not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    for name, value in teacher.state_dict().items():
        assert torch.equal(value, teacher_before[name]), name

    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == result.history
    named = {
        "total",
        "soft",
        "hard",
        "temperature",
        "alpha",
        "lr",
        "soft_grad_norm",
        "hard_grad_norm",
    }
    assert named <= set(train[0])
    assert train[0]["temperature"] == 4.0 and train[0]["alpha"] == 0.9
    assert train[0]["soft_grad_norm"] > 0 and train[0]["hard_grad_norm"] > 0
    assert abs(train[0]["total"] - (0.1 * train[0]["hard"] + 0.9 * 16 * train[0]["soft"])) < 1e-5
    assert any((tmp_path / "tensorboard").iterdir())


def test_distiller_gradient_balance_matches_autograd():
    """The logged soft/hard gradient norms (the gradient balance) are those of the two terms at
    the student logits."""
    teacher, student = teacher_mlp(), mlp(0)
    inputs, labels = points(32)[:]
    expected_student = mlp(0)
    logits = expected_student(inputs)
    loss = kd_loss(logits, teacher(inputs).detach(), labels, temperature=2.0, alpha=0.7)
    (hard_grad,) = torch.autograd.grad(0.3 * loss.hard, logits, retain_graph=True)
    (soft_grad,) = torch.autograd.grad(0.7 * 4.0 * loss.soft, logits)
    distiller = dk.Distiller(
        student,
        teacher,
        [(inputs, labels)],
        temperature=2.0,
        alpha=0.7,
        max_steps=1,
        progress=False,
    )
    record = distiller.fit().history[0]
    assert record["hard_grad_norm"] == pytest.approx(float(hard_grad.norm()), rel=1e-5)
    assert record["soft_grad_norm"] == pytest.approx(float(soft_grad.norm()), rel=1e-5)


class _DoubledHard(dk.ClassificationTask):
    """A task whose own distillation_loss doubles the hard term: the meter must not assume the
    plain cross-entropy's closed form for it."""

    def distillation_loss(self, logits, teacher_logits, labels, **options):
        loss = super().distillation_loss(logits, teacher_logits, labels, **options)
        alpha = options["alpha"]
        return KDLoss(loss.total + (1.0 - alpha) * loss.hard, loss.soft, 2.0 * loss.hard)


@pytest.mark.parametrize(
    "case", ["ignored labels", "unlabelled distilled", "no teacher", "own loss"]
)
def test_gradient_balance_hard_part_matches_autograd(case):
    """The hard part's gradient norm at the student logits, against autograd through the
    cross-entropy: the task's closed form where the hard term is the plain cross-entropy
    (some labels ignored; the transfer-set task; labels only), autograd for a task's own."""
    teacher, student = teacher_mlp(), mlp(0)
    inputs, labels = points(32)[:]
    labels = labels.clone()
    labels[::3] = -100  # ignored rows: no hard term there
    task = {"unlabelled distilled": dk.ClassificationTask(distill_unlabelled=True),
            "own loss": _DoubledHard()}.get(case, dk.ClassificationTask())  # fmt: skip
    alpha = 0.0 if case == "no teacher" else 0.6
    logits = mlp(0)(inputs)
    normalizer = 32 if case == "unlabelled distilled" else int((labels != -100).sum())
    ce = torch.nn.functional.cross_entropy(logits, labels, reduction="sum") / normalizer
    factor = 2.0 if case == "own loss" else 1.0
    (expected,) = torch.autograd.grad(factor * (1.0 - alpha) * ce, logits)
    distiller = dk.Distiller(
        student, None if case == "no teacher" else teacher, [(inputs, labels)], task=task,
        temperature=2.0, alpha=alpha, max_steps=1, progress=False,
    )  # fmt: skip
    record = distiller.fit().history[0]
    assert record["hard_grad_norm"] == pytest.approx(float(expected.norm()), rel=1e-5)
    assert record["hard"] == pytest.approx(factor * float(ce.detach()), rel=1e-5)


def test_distiller_without_teacher_trains_on_labels_alone():
    data = loader(points(), 64)
    result = dk.Distiller(
        mlp(0), None, data, max_steps=12, learning_rate=1e-2, log_every=1, progress=False
    ).fit()
    first, last = result.history[0], result.history[-1]
    assert first["alpha"] == 0.0 and first["soft"] == 0.0 and first["soft_grad_norm"] == 0.0
    assert first["total"] == pytest.approx(first["hard"])
    assert last["total"] < first["total"]


def test_distiller_schedules_reach_the_loss():
    """Scheduled temperature, alpha and learning rate are the ones in force at each step."""
    result = dk.Distiller(
        mlp(0), teacher_mlp(), loader(points(64), 16), max_steps=4, log_every=1, progress=False,
        temperature=dk.schedules.linear(8.0, 2.0, 3), alpha=dk.schedules.linear(1.0, 0.5, 3),
        learning_rate=dk.schedules.linear(1e-2, 1e-3, 3),
    ).fit()  # fmt: skip
    assert [r["temperature"] for r in result.history] == pytest.approx([8.0, 6.0, 4.0, 2.0])
    assert [r["alpha"] for r in result.history] == pytest.approx([1.0, 5 / 6, 2 / 3, 0.5])
    assert [r["lr"] for r in result.history] == pytest.approx([1e-2, 7e-3, 4e-3, 1e-3])
    assert result.history[0]["hard_grad_norm"] == 0.0  # alpha = 1: the hard term has no weight


def _train(batches, grad_accum_steps):
    student = mlp(0)
    dk.Distiller(
        student, teacher_mlp(), batches, grad_accum_steps=grad_accum_steps, alpha=0.5, optimizer="sgd",
        learning_rate=0.5, max_steps=3, progress=False,
    ).fit()  # fmt: skip
    return state(student)


def test_distiller_grad_accumulation_equals_one_big_batch():
    """k micro-batches with uneven valid counts give the update of one batch of k times the size."""
    inputs, labels = points(96, ignore_every=3)[:]
    labels[:20] = -100  # the first micro-batch has far fewer valid samples than the second
    big = [(inputs[i : i + 32], labels[i : i + 32]) for i in range(0, 96, 32)]
    small = [(inputs[i : i + 16], labels[i : i + 16]) for i in range(0, 96, 16)]
    accumulated, single = _train(small, 2), _train(big, 1)
    for name in single:
        torch.testing.assert_close(accumulated[name], single[name], rtol=1e-5, atol=1e-6)

    # The trap this guards against: averaging per-micro-batch means is a different gradient.
    student, teacher = mlp(0), teacher_mlp()
    per_micro_mean = (
        sum(
            kd_loss(student(x), teacher(x).detach(), y, temperature=4.0, alpha=0.5).total
            for x, y in small[:2]
        )
        / 2
    )
    global_mean = kd_loss(
        student(big[0][0]), teacher(big[0][0]).detach(), big[0][1], temperature=4.0, alpha=0.5
    ).total
    assert abs(float(per_micro_mean.detach() - global_mean.detach())) > 1e-3


def test_distiller_learnable_temperature_trains_with_the_student(tmp_path):
    temperature = dk.LearnableTemperature(initial=4.0, curriculum_steps=2)
    before = float(temperature(step=0).detach())
    distiller = dk.Distiller(
        mlp(0), teacher_mlp(), loader(points(64), 16), temperature=temperature, max_steps=6,
        learning_rate=0.05, output_dir=tmp_path, log_every=1, progress=False,
    )  # fmt: skip
    result = distiller.fit()
    after = float(temperature(step=0).detach())
    assert after != before
    logged = [r["temperature"] for r in result.history]  # the temperature in force at each step
    assert logged[0] == pytest.approx(4.0, rel=1e-6)
    assert len(set(logged)) > 3
    in_optimizer = {id(p) for g in distiller.optimizer.param_groups for p in g["params"]}
    assert id(temperature.theta) in in_optimizer
    assert (tmp_path / "checkpoints" / "step-00000006" / "temperature.safetensors").exists()


def _fit_history(**options):
    distiller = dk.Distiller(
        mlp(0), teacher_mlp(), loader(points(64), 32), max_steps=3, log_every=1,
        learning_rate=1e-2, progress=False, **options,
    )  # fmt: skip
    return distiller.fit().history, state(distiller.student)


@pytest.mark.parametrize(
    "options", [{"teacher_dtype": "bf16"}, {"mixed_precision": "bf16"}], ids=["teacher", "mixed"]
)
def test_distiller_bfloat16_is_close_to_float32(options):
    reference, reference_weights = _fit_history()
    history, weights = _fit_history(**options)
    for ours, theirs in zip(history, reference):
        for key in ("total", "soft", "hard"):
            # bfloat16 keeps 8 bits of mantissa: logits agree to ~1e-2 relative.
            assert ours[key] == pytest.approx(theirs[key], rel=5e-2, abs=1e-3), key
    for name, value in reference_weights.items():
        torch.testing.assert_close(weights[name], value, rtol=0, atol=2e-3)
    assert any(ours["total"] != theirs["total"] for ours, theirs in zip(history, reference))


def test_distiller_teacher_dtype_casts_the_teacher():
    teacher = teacher_mlp()
    dk.Distiller(
        mlp(0), teacher, loader(points(64), 32), teacher_dtype="bf16", max_steps=1, progress=False
    ).fit()
    assert next(teacher.parameters()).dtype == torch.bfloat16


def test_distiller_evaluate_reports_means():
    distiller = dk.Distiller(
        mlp(0), teacher_mlp(), loader(points(64), 32), max_steps=1, progress=False
    )
    data = points(50, ignore_every=5)  # 10 ignored labels: count is 40
    metrics = distiller.evaluate(loader(data, 16))
    inputs, labels = data[:]
    with torch.no_grad():
        logits = distiller.student(inputs)
    valid = labels != -100
    expected = (logits.argmax(-1) == labels)[valid].float().mean()
    loss = torch.nn.functional.cross_entropy(logits[valid], labels[valid])
    assert metrics["count"] == 40
    assert metrics["accuracy"] == pytest.approx(float(expected))
    assert metrics["loss"] == pytest.approx(float(loss), rel=1e-5)


def test_distiller_export_student_writes_weights_and_config(tmp_path):
    student = mlp(0)
    distiller = dk.Distiller(
        student, teacher_mlp(), loader(points(64), 32), max_steps=2, progress=False
    )
    distiller.fit()
    path = distiller.export_student(tmp_path / "student", config={"hidden": 32})
    from safetensors.torch import load_file

    fresh = mlp(99)
    fresh.load_state_dict(load_file(str(path / "model.safetensors")))
    for name, value in student.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value)
    assert json.loads((path / "config.json").read_text()) == {"hidden": 32}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_steps": 0}, "max_steps"),
        ({"grad_accum_steps": 1.5}, "grad_accum_steps"),
        ({"mixed_precision": "fp8"}, "mixed_precision"),
        ({"save_every": 5}, "output_dir"),
        ({"eval_every": 5}, "eval_data"),
        ({"optimizer": "lion"}, "optimizer"),
        ({"loss_options": {"normalizer": 3}}, "normalizer"),
        ({"teacher_dtype": "int8"}, "teacher_dtype"),
    ],
)
def test_distiller_rejects_bad_arguments(options, message):
    with pytest.raises(ValueError, match=message):
        dk.Distiller(
            mlp(0),
            mlp(1),
            [(torch.randn(4, trainkit.DIM), torch.zeros(4, dtype=torch.long))],
            **{"max_steps": 3, **options},
        )


def test_distiller_rejects_one_shot_iterators_and_shared_teacher():
    batches = [(torch.randn(4, trainkit.DIM), torch.zeros(4, dtype=torch.long))]
    with pytest.raises(TypeError, match="train_data"):
        dk.Distiller(mlp(0), mlp(1), iter(batches), max_steps=1)
    student = mlp(0)
    with pytest.raises(ValueError, match="share parameters"):
        dk.Distiller(student, student, batches, max_steps=1)


def test_distiller_export_student_loads_back_as_a_hugging_face_model(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        n_layer=1,
        n_embd=32,
        n_head=2,
        vocab_size=50,
        n_positions=16,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = transformers.GPT2LMHeadModel(config)  # tied input/output embeddings
    batches = [(torch.zeros(1), torch.zeros(1, dtype=torch.long))]
    distiller = dk.Distiller(model, None, batches, max_steps=1, progress=False)
    path = distiller.export_student(tmp_path / "student")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(path)
    assert type(loaded) is type(model)
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name


def test_distiller_callable_optimizer_keeps_its_learning_rate():
    inputs, labels = points(32)[:]
    distiller = dk.Distiller(
        mlp(0), teacher_mlp(), [(inputs, labels)], alpha=0.5, max_steps=1,
        optimizer=lambda groups: torch.optim.SGD(groups, lr=0.1), progress=False,
    )  # fmt: skip
    record = distiller.fit().history[0]
    assert record["lr"] == 0.1 and distiller.optimizer.param_groups[0]["lr"] == 0.1
    # The update is plain SGD at 0.1 on the kd_loss gradient, computed here by hand.
    reference = mlp(0)
    loss = kd_loss(
        reference(inputs), teacher_mlp()(inputs).detach(), labels, temperature=4.0, alpha=0.5
    )
    grads = torch.autograd.grad(loss.total, list(reference.parameters()))
    for (name, param), grad in zip(reference.named_parameters(), grads):
        expected = param.detach() - 0.1 * grad
        torch.testing.assert_close(
            distiller.student.state_dict()[name], expected, rtol=1e-6, atol=1e-7
        )
    # A learning rate given explicitly still wins over the optimizer's own.
    explicit = dk.Distiller(
        mlp(0), teacher_mlp(), [(inputs, labels)], max_steps=1, learning_rate=0.3,
        optimizer=lambda groups: torch.optim.SGD(groups, lr=0.1), progress=False,
    )  # fmt: skip
    assert explicit.fit().history[0]["lr"] == 0.3


def test_distiller_logs_the_last_step_whatever_log_every():
    result = dk.Distiller(
        mlp(0), teacher_mlp(), loader(points(64), 16), max_steps=7, log_every=5, progress=False
    ).fit()
    assert [r["step"] for r in result.history] == [5, 7]
    assert result.final["total"] == result.history[-1]["total"]


def test_distiller_refuses_deepspeed(monkeypatch):
    """`accelerate launch` with a DeepSpeed config sets this; the Distiller refuses before
    Accelerate imports deepspeed (not installed here). FSDP: tests/train/fsdp/."""
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ValueError, match="does not run under DeepSpeed"):
        dk.Distiller(mlp(0), teacher_mlp(), loader(points(32), 16), max_steps=1, progress=False)


def test_distiller_dataset_of_examples_gets_a_dataloader_hint():
    dataset = points(32)
    with pytest.raises(
        TypeError,
        match=r"train_data is a dataset of single examples \(TensorDataset\); wrap it in a DataLoader",
    ):
        dk.Distiller(mlp(0), teacher_mlp(), dataset, max_steps=1)
    with pytest.raises(TypeError, match=r"eval_data is a dataset of single examples"):
        dk.Distiller(mlp(0), teacher_mlp(), loader(dataset, 8), eval_data=dataset, max_steps=1)


def test_distiller_transfer_set_option_matches_a_reference_update():
    """distill_unlabelled=True: soft targets on every example, the hard term on the labelled
    ones, both divided by the number of examples (one SGD step, checked in float64)."""
    inputs, labels = points(24)[:]
    labels[::3] = -100  # unlabelled, still distilled on
    distiller = dk.Distiller(
        mlp(0), teacher_mlp(), [(inputs, labels)], task=dk.ClassificationTask(distill_unlabelled=True),
        temperature=2.0, alpha=0.7, optimizer="sgd", learning_rate=0.1, max_steps=1, progress=False,
    )  # fmt: skip
    distiller.fit()
    reference, teacher = mlp(0).double(), teacher_mlp().double()
    z, t = reference(inputs.double()), teacher(inputs.double()).detach()
    p, log_q = torch.softmax(t / 2, -1), torch.log_softmax(z / 2, -1)
    kl = (p * (p.log() - log_q)).sum(-1)  # every example
    known = labels != -100
    ce = -torch.log_softmax(z, -1)[known].gather(1, labels[known, None]).squeeze(1)
    total = (0.7 * 4 * kl.sum() + 0.3 * ce.sum()) / len(labels)
    grads = torch.autograd.grad(total, list(reference.parameters()))
    for (name, param), grad in zip(reference.named_parameters(), grads):
        expected = (
            param.detach() - 0.1 * grad
        ).float()  # SGD's first step: momentum is the gradient
        torch.testing.assert_close(
            distiller.student.state_dict()[name], expected, rtol=1e-5, atol=1e-6
        )


def test_task_protocol_is_the_documented_methods_and_every_task_satisfies_it():
    """The Task protocol lists the methods the Distiller calls (it once also held a copy of
    ClassificationTask's private transfer-set helper, which no causal-LM task has)."""
    from darkknowledge.train.task import Task

    for task in (dk.ClassificationTask(), dk.llm.CausalLMTask(), dk.llm.CachedCausalLMTask()):
        assert isinstance(task, Task), type(task).__name__
