"""Training from a teacher cache (issue 12 §3): ``CachedTeacher`` + ``cached_loader`` +
``CachedCausalLMTask`` on ``dk.Distiller``, against a live teacher and independent lookups."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from cachekit import direct_log_probs, teacher
from torch.utils.data import DataLoader
from training_worker import VOCAB, dataset

sys.path.insert(0, str(Path(__file__).parents[1] / "llm"))
from tiny_models import tiny_gpt2

import darkknowledge as dk


@pytest.fixture(scope="module")
def live_teacher():
    return teacher(VOCAB)


@pytest.fixture(scope="module")
def full_cache(tmp_path_factory, live_teacher):
    """Every token kept (k = V), float16 log-probabilities."""
    folder = tmp_path_factory.mktemp("full") / "cache"
    dk.cache.write_teacher_cache(live_teacher, dataset(), folder, k=VOCAB, progress=False)
    return folder


def _fit(teacher_model, loader, task, *, steps=6, temperature=1.0, alpha=0.7, **options):
    student = tiny_gpt2(5, n_embd=8, vocab_size=VOCAB)
    before = {name: p.detach().clone() for name, p in student.named_parameters()}
    options = {"optimizer": "sgd", "learning_rate": 0.1, **options}
    result = dk.Distiller(
        student, teacher_model, loader, task=task, temperature=temperature, alpha=alpha,
        max_steps=steps, log_every=1, progress=False, **options,
    ).fit()  # fmt: skip
    losses = [record["total"] for record in result.history if record["kind"] == "train"]
    updates = {name: p.detach() - before[name] for name, p in student.named_parameters()}
    return losses, updates, student


def _live_loader(batch_size=4):
    plain = [{k: v for k, v in example.items() if k != "id"} for example in dataset()]
    return DataLoader(plain, batch_size=batch_size, collate_fn=dk.llm.PaddingCollator())


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_cached_training_topk_full_vocabulary_matches_the_live_teacher(
    full_cache, live_teacher, temperature
):
    """k = V: six SGD steps from the cache follow the live teacher's run.

    Not bitwise: the cache stores log p in float16 (rounding 2^-11 ≈ 5e-4 of |log p| ≈ 3.7,
    i.e. p off by up to ~2e-3 of itself), the live run uses the float32 teacher, and the two
    losses sum in other orders. So the losses agree to 1e-4 and each parameter's total update
    to 5e-3 of its norm (observed: 3e-6 and 2e-4..1.5e-3); a misaligned, mis-keyed or
    mis-normalised target moves them by O(1)."""
    cached_loader = dk.cache.cached_loader(
        dataset(), full_cache, batch_size=4, shuffle=False, num_workers=0
    )
    cached = _fit(
        dk.cache.CachedTeacher(full_cache), cached_loader, dk.llm.CachedCausalLMTask(),
        temperature=temperature,
    )  # fmt: skip
    live = _fit(live_teacher, _live_loader(), dk.llm.CausalLMTask(), temperature=temperature)
    torch.testing.assert_close(cached[0], live[0], rtol=1e-4, atol=0)
    for name, update in live[1].items():
        error = (cached[1][name] - update).norm() / update.norm().clamp_min(1e-12)
        assert float(error) < 5e-3, (name, float(error))


def test_cached_training_gradient_accumulation_equals_one_batch(full_cache):
    """Two micro-batches of 2 per step give one batch of 4's updates (global normaliser)."""
    runs = []
    for batch_size, accumulation in ((4, 1), (2, 2)):
        loader = dk.cache.cached_loader(
            dataset(), full_cache, batch_size=batch_size, shuffle=False, num_workers=0
        )
        task = dk.llm.CachedCausalLMTask()
        teacher_model = dk.cache.CachedTeacher(full_cache)
        runs.append(_fit(teacher_model, loader, task, steps=3, grad_accum_steps=accumulation))
    for name, update in runs[0][1].items():
        torch.testing.assert_close(runs[1][1][name], update, rtol=1e-5, atol=1e-7, msg=name)


def _kl_to_teacher(student, live_teacher) -> float:
    """Mean KL(teacher ‖ student) per real predicting position of the dataset, float64."""
    total, count = 0.0, 0
    with torch.no_grad():
        for example in dataset():
            log_p = direct_log_probs(live_teacher, example)[:-1]
            log_q = direct_log_probs(student, example)[:-1]
            total += float((log_p.exp() * (log_p - log_q)).sum())
            count += log_p.shape[0]
    return total / count


def test_cached_training_sampled_cache_moves_the_student_to_the_teacher(tmp_path):
    """Pure distillation (alpha = 1) from 12 draws per position: the student's KL to the
    teacher falls, and further than training on the labels does."""
    live_teacher = teacher(VOCAB)
    with torch.no_grad():  # logits x 20: a peaked teacher (12 draws of a flat one are mostly
        live_teacher.transformer.ln_f.weight.mul_(20.0)  # noise), far from the random student
    folder = tmp_path / "sampled"
    dk.cache.write_teacher_cache(
        live_teacher, dataset(), folder, representation="sampled", num_samples=12,
        progress=False,
    )  # fmt: skip
    loader = dk.cache.cached_loader(dataset(), folder, batch_size=4, num_workers=0)
    options = {"steps": 40, "alpha": 1.0, "optimizer": "adamw", "learning_rate": 1e-2}
    start = _kl_to_teacher(tiny_gpt2(5, n_embd=8, vocab_size=VOCAB), live_teacher)
    *_, distilled = _fit(
        dk.cache.CachedTeacher(folder), loader, dk.llm.CachedCausalLMTask(), **options
    )
    *_, baseline = _fit(None, _live_loader(), dk.llm.CausalLMTask(), **options)
    distilled_kl = _kl_to_teacher(distilled, live_teacher)
    assert distilled_kl < 0.6 * start, (start, distilled_kl)  # seen: 1.28 -> 0.51
    assert distilled_kl < _kl_to_teacher(baseline, live_teacher)


@pytest.mark.parametrize(("padding_side", "in_memory"), [("right", False), ("left", True)])
def test_cached_loader_shuffled_batches_carry_each_sequences_own_targets(
    tmp_path, live_teacher, padding_side, in_memory
):
    """Two shuffled epochs through worker processes, over the captured examples in another
    order (so neither the loop's step nor the dataset index finds them): every row's targets
    are its own sequence's top-5, recomputed from the teacher (not read from the cache), at
    its positions in the padded batch; padding rows hold id -1 and value 0."""
    folder = tmp_path / "top5"
    data = dataset()
    for example in data:  # the batch's attention mask then marks exactly the real tokens
        example["attention_mask"] = [1] * len(example["input_ids"])
    data[1:1] = [dict(data[0]), dict(data[2])]  # repeated samples: by id, and by content
    dk.cache.write_teacher_cache(live_teacher, data, folder, k=5, progress=False)
    data = data[1::2] + data[::2]  # the same examples, another order
    by_tokens = {tuple(torch.as_tensor(e["input_ids"]).tolist()): e for e in data}
    collate = dk.llm.PaddingCollator(padding_side=padding_side)
    loader = dk.cache.cached_loader(
        data, folder, batch_size=3, shuffle=True, num_workers=2, collate_fn=collate,
        check_dataset=False,  # the order differs from the capture's, so the fingerprint does
        in_memory=in_memory,  # entries read at the start, or through the memory map
    )  # fmt: skip
    assert loader.dataset.in_memory is in_memory
    orders = []
    for epoch in range(2):
        torch.manual_seed(epoch)  # the DataLoader's shuffle seed
        order = []
        for batch in loader:
            assert batch["teacher_ids"].dtype == torch.int32
            assert batch["teacher_values"].dtype == torch.float16
            for row in range(batch["input_ids"].shape[0]):
                real = batch["attention_mask"][row].bool()
                tokens = tuple(batch["input_ids"][row][real].tolist())
                order.append(tokens)
                values, ids = direct_log_probs(live_teacher, by_tokens[tokens]).float().topk(5)
                got_ids, got_values = batch["teacher_ids"][row], batch["teacher_values"][row]
                assert (got_ids[~real] == -1).all() and (got_values[~real] == 0).all()
                assert torch.equal(got_ids[real], ids.int())
                torch.testing.assert_close(got_values[real].float(), values, rtol=1e-3, atol=0)
        orders.append(order)
    dataset_order = [tuple(torch.as_tensor(e["input_ids"]).tolist()) for e in data]
    assert sorted(orders[0]) == sorted(dataset_order) and orders[0] != orders[1]
    assert orders[0] != dataset_order


def test_cached_training_skips_the_id_check_only_for_a_verified_cache(full_cache, monkeypatch):
    """A cache read with verify=True (ids checked at capture, shards by SHA-256) trains without
    the sparse loss's per-call id check; verify=False keeps it. The losses are the same."""
    from darkknowledge.losses import sparse

    calls = []
    check_ids = sparse._check_ids

    def counted(ids, vocab):
        calls.append(ids.shape)
        check_ids(ids, vocab)

    monkeypatch.setattr(sparse, "_check_ids", counted)
    runs = {}
    for verify in (True, False):
        calls.clear()
        loader = dk.cache.cached_loader(
            dataset(), full_cache, batch_size=4, shuffle=False, num_workers=0
        )
        cache = dk.cache.TeacherCache(full_cache, verify=verify)
        losses, _, _ = _fit(dk.cache.CachedTeacher(cache), loader, dk.llm.CachedCausalLMTask())
        runs[verify] = (losses, len(calls))
    assert runs[True][1] == 0 and runs[False][1] == 6  # one check a step when unverified
    assert runs[True][0] == runs[False][0]


def test_cached_training_cuts_a_student_vocabulary_padded_beyond_the_cache(tmp_path):
    """A cache of a 250-token vocabulary and a student whose output layer is it padded to 256
    rows (before: refused as another vocabulary): the loss and gradient are those of the same
    student without its padding rows, as the live task cuts a padded layer."""
    data = dataset()  # ids < 40 <= 250
    folder = tmp_path / "cache"
    dk.cache.write_teacher_cache(teacher(250), data, folder, k=4, progress=False)
    padded, unpadded = (
        tiny_gpt2(5, n_embd=8, vocab_size=256),
        tiny_gpt2(5, n_embd=8, vocab_size=250),
    )
    with torch.no_grad():  # the same model: its first 250 embedding (= output) rows
        for name, param in unpadded.named_parameters():
            param.copy_(dict(padded.named_parameters())[name][: param.shape[0]])
    batch = next(iter(dk.cache.cached_loader(data, folder, batch_size=4, num_workers=0)))
    task, cached = dk.llm.CachedCausalLMTask(), dk.cache.CachedTeacher(folder)
    targets = task.teacher_outputs(cached, batch)
    loss_fn = dk.DistillationLoss(temperature=2.0, alpha=0.5)

    def loss_and_grads(student):
        out = task.compute_loss(student, batch, targets, loss_fn=loss_fn, step=0)
        return out.loss.total, torch.autograd.grad(out.loss.total, list(student.parameters()))

    (cut, cut_grads), (whole, whole_grads) = loss_and_grads(padded), loss_and_grads(unpadded)
    torch.testing.assert_close(cut, whole, rtol=1e-6, atol=1e-7)
    for got, want in zip(cut_grads, whole_grads):
        torch.testing.assert_close(got[: want.shape[0]], want, rtol=1e-5, atol=1e-7)
    assert not cut_grads[0][250:].any()  # the padding rows get no gradient: they were cut
