"""Training from a teacher cache refuses what does not fit, with errors naming the field."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from cachekit import teacher
from training_worker import VOCAB, dataset

sys.path.insert(0, str(Path(__file__).parents[1] / "llm"))
from tiny_models import tiny_gpt2

import darkknowledge as dk


@pytest.fixture(scope="module")
def cache_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("errors") / "cache"
    dk.cache.write_teacher_cache(teacher(VOCAB), dataset(), folder, k=4, progress=False)
    return folder


def _fit(student, teacher_model, loader, task=None, **options):
    options = {"temperature": 1.0, "max_steps": 1, "progress": False, **options}
    task = task or dk.llm.CachedCausalLMTask()
    return dk.Distiller(student, teacher_model, loader, task=task, **options).fit()


def _loader(folder, data=None, **options):
    options = {"batch_size": 4, "num_workers": 0, **options}
    return dk.cache.cached_loader(dataset() if data is None else data, folder, **options)


def test_cached_training_refuses_a_cache_for_another_vocabulary(cache_folder):
    student = tiny_gpt2(0, n_embd=8, vocab_size=VOCAB + 8)
    with pytest.raises(ValueError, match=r"vocab_size is 40 in the cache, 48 here"):
        _fit(student, dk.cache.CachedTeacher(cache_folder), _loader(cache_folder))


def test_cached_loader_refuses_a_cache_of_another_dataset(cache_folder):
    other = dataset()
    other[3]["input_ids"] = torch.as_tensor(other[3]["input_ids"]).flip(0)
    with pytest.raises(ValueError, match=r"dataset_fingerprint is '[0-9a-f]{64}' in the cache"):
        _loader(cache_folder, other)


@pytest.mark.parametrize("in_memory", [True, False])
def test_cached_targets_refuse_unknown_or_changed_examples_without_the_dataset_check(
    cache_folder, in_memory
):
    """check_dataset=False still checks every lookup: by key, then by content hash."""
    data = dataset()
    changed = dict(data[0], input_ids=torch.as_tensor(data[0]["input_ids"]).flip(0))
    unknown = {"input_ids": torch.tensor([1, 2, 3]), "attention_mask": torch.ones(3)}
    targets = dk.cache.CachedTargets(
        [changed, unknown], dk.cache.TeacherCache(cache_folder), check_dataset=False,
        in_memory=in_memory,
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"dataset\[0\] \(key '0'\) holds other tokens"):
        targets[0]
    with pytest.raises(KeyError, match=r"key 'sha256:[0-9a-f]{64}'\) is not in the teacher cache"):
        targets[1]


def test_cached_training_refuses_a_cache_captured_at_another_temperature(tmp_path):
    folder = tmp_path / "hot"
    dk.cache.write_teacher_cache(
        teacher(VOCAB), dataset(), folder, k=4, temperature=2.0, progress=False
    )
    student = tiny_gpt2(0, n_embd=8, vocab_size=VOCAB)
    with pytest.raises(ValueError, match=r"captured at temperature 2.0; training needs T = 1"):
        _fit(student, dk.cache.CachedTeacher(folder), _loader(folder))


def test_cached_training_sampled_refuses_another_training_temperature(tmp_path):
    folder = tmp_path / "sampled"
    dk.cache.write_teacher_cache(
        teacher(VOCAB), dataset(), folder, representation="sampled", num_samples=4,
        progress=False,
    )  # fmt: skip
    student = tiny_gpt2(0, n_embd=8, vocab_size=VOCAB)
    with pytest.raises(ValueError, match=r"representation='sampled' needs temperature=1.0"):
        _fit(student, dk.cache.CachedTeacher(folder), _loader(folder), temperature=2.0)


def test_cached_task_refuses_a_live_teacher_and_batches_without_targets(cache_folder):
    student = tiny_gpt2(0, n_embd=8, vocab_size=VOCAB)
    with pytest.raises(
        TypeError, match=r"teacher must be dk.cache.CachedTeacher\(path\), got GPT2"
    ):
        _fit(student, teacher(VOCAB), _loader(cache_folder))
    plain = [{"input_ids": torch.randint(VOCAB, (4, 6))}]
    with pytest.raises(ValueError, match=r"needs 'teacher_ids' and 'teacher_values'"):
        _fit(student, dk.cache.CachedTeacher(cache_folder), plain)
    with pytest.raises(TypeError, match=r"a CachedTeacher has no forward pass"):
        dk.cache.CachedTeacher(cache_folder)(torch.zeros(1, 3, dtype=torch.long))


def test_cached_task_refuses_other_divergences_and_tails(cache_folder):
    with pytest.raises(ValueError, match=r"tail must be one of 'bucket', 'none', got 'drop'"):
        dk.llm.CachedCausalLMTask(tail="drop")
    student = tiny_gpt2(0, n_embd=8, vocab_size=VOCAB)
    with pytest.raises(ValueError, match=r"forward KL .*divergence='jsd'"):
        _fit(
            student, dk.cache.CachedTeacher(cache_folder), _loader(cache_folder),
            loss_options={"divergence": "jsd"},
        )  # fmt: skip


def test_cached_training_refuses_a_student_larger_than_its_padding(cache_folder):
    """A student of 64 rows is not the cache's 40 padded (at most 1/16 more): refused with both
    sizes; so is an explicit vocab_size other than the cache's."""
    with pytest.raises(ValueError, match=r"vocab_size is 40 in the cache, 64 here"):
        _fit(
            tiny_gpt2(0, n_embd=8, vocab_size=64), dk.cache.CachedTeacher(cache_folder),
            _loader(cache_folder),
        )  # fmt: skip
    with pytest.raises(ValueError, match=r"vocab_size is 40 in the cache, 32 here"):
        _fit(
            tiny_gpt2(0, n_embd=8, vocab_size=VOCAB), dk.cache.CachedTeacher(cache_folder),
            _loader(cache_folder), task=dk.llm.CachedCausalLMTask(vocab_size=32),
        )  # fmt: skip
