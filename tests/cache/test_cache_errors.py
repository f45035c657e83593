"""Damaged caches, mismatched caches and bad arguments: each a clear error naming what is wrong."""

from __future__ import annotations

import json
import pickle
import re

import pytest
import torch
from cachekit import ragged_dataset, teacher

import darkknowledge as dk


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """A finished cache of 6 sequences in 3 shards; tests damage copies of it."""
    folder = tmp_path_factory.mktemp("cache")
    manifest = dk.cache.write_teacher_cache(
        teacher(), ragged_dataset(6), folder, k=4, shard_size=2, progress=False
    )
    return folder, manifest


@pytest.fixture
def cache_copy(written, tmp_path):
    folder, manifest = written
    for path in folder.iterdir():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    return tmp_path, manifest


def _shard(folder, manifest, number=1):
    return folder / manifest["shards"][number]["file"]


def _rewrite_manifest(folder, change):
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def test_teacher_cache_flipped_data_byte_names_the_shard(written, cache_copy):
    folder, manifest = cache_copy
    shard = _shard(folder, manifest)
    data = bytearray(shard.read_bytes())
    header_end = 8 + int.from_bytes(data[:8], "little")
    values_end = json.loads(data[8:header_end])["values"]["data_offsets"][1]
    data[header_end + values_end - 1] ^= 0x01  # the last value's exponent: the file still parses
    shard.write_bytes(bytes(data))
    cache = dk.cache.TeacherCache(folder)
    _ = cache[0]  # other shards are fine
    with pytest.raises(ValueError, match=re.escape(str(shard)) + ".*corrupted.*SHA-256"):
        cache[2]
    with pytest.raises(ValueError, match=re.escape(str(shard))):
        dk.cache.TeacherCache(folder).verify_all()
    # verify=False serves it (a deliberate choice), and the flipped value is what it serves.
    served = dk.cache.TeacherCache(folder, verify=False)[3]["values"]
    assert not torch.equal(served, dk.cache.TeacherCache(written[0])[3]["values"])


def test_teacher_cache_flipped_header_byte_breaks_the_key_index(cache_copy):
    folder, manifest = cache_copy
    shard = _shard(folder, manifest)  # holds dataset[2], keyed by its content hash
    data = shard.read_bytes()
    position = data.index(b"sha256:") + len(b"sha256:") + 3  # a hex digit of that key
    shard.write_bytes(data[:position] + bytes([data[position] ^ 0x01]) + data[position + 1 :])
    with pytest.raises(ValueError, match=re.escape(str(shard)) + ".*header"):
        dk.cache.TeacherCache(folder).keys()


def test_teacher_cache_truncated_shard_names_the_file(cache_copy):
    folder, manifest = cache_copy
    shard = _shard(folder, manifest)
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(ValueError, match=re.escape(str(shard)) + ".*truncated"):
        dk.cache.TeacherCache(folder)
    # Even when the manifest is edited to match, the header no longer fits the file.
    _rewrite_manifest(folder, lambda m: m["shards"][1].update(bytes=shard.stat().st_size))
    with pytest.raises(ValueError, match=re.escape(str(shard)) + ".*truncated"):
        dk.cache.TeacherCache(folder, verify=False)[2]


def test_teacher_cache_missing_shard_names_the_file(cache_copy):
    folder, manifest = cache_copy
    shard = _shard(folder, manifest)
    shard.unlink()
    with pytest.raises(ValueError, match=re.escape(str(shard)) + " is missing"):
        dk.cache.TeacherCache(folder)


class _Tripwire:
    """Unpickling this writes a file: proof that something was unpickled."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_teacher_cache_pickle_in_place_of_a_shard_is_refused_unread(cache_copy, writer):
    folder, manifest = cache_copy
    shard, tripwire = _shard(folder, manifest), folder / "unpickled"
    payload = {"ids": torch.zeros(3, 4), "trap": _Tripwire(tripwire)}
    if writer == "pickle":
        shard.write_bytes(pickle.dumps(payload, protocol=4))
    else:
        torch.save(payload, shard)
    _rewrite_manifest(folder, lambda m: m["shards"][1].update(bytes=shard.stat().st_size))
    for verify in (True, False):
        with pytest.raises(ValueError, match=re.escape(str(shard)) + ".*pickle"):
            dk.cache.TeacherCache(folder, verify=verify)[2]
    assert not tripwire.exists()


def test_teacher_cache_unsupported_manifest_version_names_the_file(cache_copy):
    folder, _ = cache_copy
    _rewrite_manifest(folder, lambda m: m.update(version=2))
    with pytest.raises(ValueError, match=re.escape(str(folder / "manifest.json")) + ".*version 2"):
        dk.cache.TeacherCache(folder)
    _rewrite_manifest(folder, lambda m: m.update(version=1, format="something.else"))
    with pytest.raises(ValueError, match="not a teacher cache manifest"):
        dk.cache.TeacherCache(folder)
    _rewrite_manifest(folder, lambda m: m.update(format="darkknowledge.teacher_cache", width=0))
    with pytest.raises(ValueError, match="width 0 is not a positive int"):
        dk.cache.TeacherCache(folder)


def test_teacher_cache_manifest_with_a_path_outside_the_folder_is_refused(cache_copy):
    folder, _ = cache_copy
    _rewrite_manifest(folder, lambda m: m["shards"][0].update(file="../elsewhere.safetensors"))
    with pytest.raises(ValueError, match="not a plain file name"):
        dk.cache.TeacherCache(folder)


def test_teacher_cache_check_compatible_refuses_mismatches_naming_both_values(written):
    folder, manifest = written
    cache = dk.cache.TeacherCache(folder)
    cache.check_compatible(
        vocab_size=40,
        dataset_fingerprint=dk.cache.dataset_fingerprint(ragged_dataset(6)),
        representation="topk",
    )
    with pytest.raises(ValueError, match="vocab_size is 40 in the cache, 50 here"):
        cache.check_compatible(vocab_size=50)
    other = dk.cache.dataset_fingerprint(ragged_dataset(6, seed=5))
    with pytest.raises(
        ValueError,
        match=f"dataset_fingerprint is '{manifest['dataset']['fingerprint']}' in the cache, '{other}' here",
    ):
        cache.check_compatible(dataset_fingerprint=other)
    with pytest.raises(ValueError, match="representation is 'topk' in the cache, 'sampled' here"):
        cache.check_compatible(representation="sampled")
    with pytest.raises(ValueError, match="records no tokenizer_hash"):
        cache.check_compatible(tokenizer_hash="0" * 64)


class _Vocabulary:
    def __init__(self, size):
        self.size = size

    def get_vocab(self):
        return {f"token{i}": i for i in range(self.size)}


def test_teacher_cache_check_compatible_tokenizer_hash(tmp_path):
    dk.cache.write_teacher_cache(
        teacher(), ragged_dataset(3), tmp_path, k=2, tokenizer=_Vocabulary(40), progress=False
    )
    cache = dk.cache.TeacherCache(tmp_path)
    cache.check_compatible(tokenizer_hash=dk.cache.tokenizer_hash(_Vocabulary(40)))
    with pytest.raises(ValueError, match=r"tokenizer_hash is '[0-9a-f]{64}' in the cache"):
        cache.check_compatible(tokenizer_hash=dk.cache.tokenizer_hash(_Vocabulary(39)))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"representation": "full"}, "representation must be one of"),
        ({"representation": "topk"}, "k must be a positive int"),
        ({"k": 4, "num_samples": 3}, "num_samples does not apply"),
        ({"k": 41}, "k=41 is larger than the teacher's vocabulary of 40"),
        ({"k": 4, "batch_size": 0}, "batch_size must be a positive int"),
        ({"k": 4, "temperature": 0.0}, "temperature must be finite and > 0"),
        ({"k": 4, "seed": -1}, "seed must be an int >= 0"),
        ({"k": 4, "values_dtype": "float32"}, "values_dtype must be one of"),
        (
            {"representation": "sampled", "num_samples": 300, "values_dtype": "bfloat16"},
            "counts are not exact in bfloat16",
        ),
    ],
)
def test_write_teacher_cache_bad_arguments_name_the_argument(tmp_path, options, message):
    with pytest.raises((ValueError, TypeError), match=message):
        dk.cache.write_teacher_cache(
            teacher(), ragged_dataset(3), tmp_path, progress=False, **options
        )
    assert not tmp_path.joinpath("capture.json").exists()


@pytest.mark.parametrize(
    ("example", "message"),
    [
        ([1, 2, 3], r"dataset\[1\] must be a dict"),
        ({"tokens": [1, 2]}, r"dataset\[1\] has no 'input_ids'"),
        ({"input_ids": [1.0, 2.0]}, r"dataset\[1\]\['input_ids'\] must hold integer token ids"),
        ({"input_ids": [1, 45]}, "token id 45, outside the teacher's vocabulary of 40"),
        ({"input_ids": []}, "non-empty 1-D"),
        ({"input_ids": [1, 2], "attention_mask": [1]}, "must have the shape of input_ids"),
        ({"input_ids": [1, 2], "id": 1.5}, r"\['id'\] must be an int or a str"),
        ({"input_ids": [1, 2], "id": "a"}, "share the id 'a' but hold different tokens"),
    ],
)
def test_write_teacher_cache_bad_examples_name_the_index(tmp_path, example, message):
    dataset = [{"input_ids": [3, 4, 5], "id": "a"}, example]
    with pytest.raises((ValueError, TypeError), match=message):
        dk.cache.write_teacher_cache(teacher(), dataset, tmp_path, k=2, progress=False)


def _repeat_an_id(ids):
    ids[..., :2] = 7  # slots 0 and 1 hold the same id
    return ids


def _id_out_of_vocabulary(ids):
    ids[..., 0] = 40  # the teacher's vocabulary is 40
    return ids


class _BadTopkBackend(dk.cache.HuggingFaceBackend):
    """A backend whose top-k ids are broken by ``damage`` (a serving engine with a bug)."""

    def __init__(self, model, damage):
        super().__init__(model)
        self.damage = damage

    def topk(self, input_ids, attention_mask, *, k, temperature):
        ids, values = super().topk(input_ids, attention_mask, k=k, temperature=temperature)
        return self.damage(ids.clone()), values


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_repeat_an_id, "returned the same token id twice at a valid position"),
        (_id_out_of_vocabulary, r"returned token ids outside \[0, 40\)"),
    ],
)
def test_write_teacher_cache_refuses_bad_topk_ids_from_a_backend(tmp_path, damage, message):
    """Training from a verified cache does not check the ids again, so the capture must."""
    with pytest.raises(ValueError, match=message):
        dk.cache.write_teacher_cache(
            teacher(), ragged_dataset(3), tmp_path, k=4, progress=False,
            backend=lambda model: _BadTopkBackend(model, damage),
        )  # fmt: skip
