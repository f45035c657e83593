"""Capture then read: the stored targets are the teacher's, computed independently here."""

from __future__ import annotations

import hashlib
import json
import pickle
import random
import struct
from collections import Counter

import pytest
import torch
from cachekit import direct_log_probs, ragged_dataset, teacher

import darkknowledge as dk


def _reference_uniforms(seed: int, key: str, positions: int, count: int) -> torch.Tensor:
    """The documented derivation, written out again: sha256(f"{seed}\\0{key}")[:8] LE, 63 bits."""
    digest = hashlib.sha256(f"{seed}\0{key}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    return torch.rand((positions, count), generator=generator, dtype=torch.float64)


def _key(example: dict) -> str:
    if "id" in example:
        return str(example["id"])
    mask = example.get("attention_mask")
    return "sha256:" + dk.cache.content_hash(example["input_ids"], mask)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_write_teacher_cache_topk_matches_teacher_log_probs(tmp_path, temperature):
    model, data = teacher(), ragged_dataset()
    dk.cache.write_teacher_cache(
        model, data, tmp_path, k=6, batch_size=3, shard_size=4, temperature=temperature,
        progress=False,
    )  # fmt: skip
    cache = dk.cache.TeacherCache(tmp_path)
    assert len(cache) == len(data)
    for index, example in enumerate(data):
        entry = cache[index]
        reference = direct_log_probs(model, example, temperature)  # (T, V) float64
        top = reference.topk(6, dim=-1)
        valid = torch.ones(len(reference), dtype=torch.bool)
        if "attention_mask" in example:
            valid = example["attention_mask"].bool()
        assert entry["ids"].shape == entry["values"].shape == (len(reference), 6)
        assert entry["key"] == _key(example)
        assert torch.equal(entry["ids"][valid], top.indices[valid])
        torch.testing.assert_close(
            entry["values"][valid].double(), top.values[valid], rtol=1e-3, atol=1e-3
        )
        # Positions the example's own mask hides hold the padding entry.
        assert (entry["ids"][~valid] == -1).all() and (entry["values"][~valid] == 0).all()


def test_write_teacher_cache_sampled_matches_inverse_cdf_draws(tmp_path):
    model, data, draws = teacher(), ragged_dataset(), 12
    manifest = dk.cache.write_teacher_cache(
        model, data, tmp_path, representation="sampled", num_samples=draws, seed=7,
        batch_size=4, shard_size=3, progress=False,
    )  # fmt: skip
    assert manifest["values"]["meaning"] == "counts" and manifest["seed"] == 7
    cache = dk.cache.TeacherCache(tmp_path)
    for index, example in enumerate(data):
        probs = direct_log_probs(model, example).exp()  # (T, V)
        cdf = probs.cumsum(-1).numpy()
        uniforms = _reference_uniforms(7, _key(example), len(probs), draws).numpy()
        entry = cache[index]
        valid = example.get("attention_mask", torch.ones(len(probs))).bool()
        for position in range(len(probs)):
            if not valid[position]:
                assert (entry["ids"][position] == -1).all()
                continue
            counts = Counter(
                int((cdf[position] > u * cdf[position][-1]).argmax()) for u in uniforms[position]
            )
            ids = sorted(counts)
            expected_ids = ids + [-1] * (draws - len(ids))
            expected_counts = [counts[i] for i in ids] + [0] * (draws - len(ids))
            assert entry["ids"][position].tolist() == expected_ids
            assert entry["values"][position].tolist() == expected_counts


def test_inverse_cdf_frequencies_follow_probabilities():
    probs = torch.tensor([[0.5, 0.0, 0.2, 0.3]])
    uniforms = torch.rand(
        1, 200_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    draws = dk.cache.inverse_cdf(probs, uniforms)
    frequencies = torch.bincount(draws[0], minlength=4).double() / draws.numel()
    torch.testing.assert_close(frequencies, probs[0].double(), atol=4e-3, rtol=0)
    assert frequencies[1] == 0


@pytest.mark.parametrize(
    ("vocab_size", "encoding", "id_bytes"),
    [(40, "int16", 2), (40_000, "uint16", 2), (70_000, "int32", 4)],
)
def test_write_teacher_cache_id_encoding_round_trips_and_bytes_per_token(
    tmp_path, vocab_size, encoding, id_bytes
):
    model = teacher(vocab_size)
    data = ragged_dataset(5, vocab_size=vocab_size)
    manifest = dk.cache.write_teacher_cache(
        model, data, tmp_path, k=16, batch_size=2, shard_size=2, progress=False
    )
    assert manifest["ids"]["encoding"] == encoding
    assert manifest["bytes_per_token"]["payload"] == 16 * (id_bytes + 2)
    positions = sum(len(example["input_ids"]) for example in data)
    files = [tmp_path / shard["file"] for shard in manifest["shards"]]
    on_disk = sum(path.stat().st_size for path in files) / positions
    assert manifest["bytes_per_token"]["on_disk"] == pytest.approx(on_disk, abs=1e-3)
    payload = 0
    for path in files:  # the tensors' own byte ranges, read from each safetensors header
        raw = path.read_bytes()
        header = json.loads(raw[8 : 8 + struct.unpack("<Q", raw[:8])[0]])
        payload += sum(
            header[name]["data_offsets"][1] - header[name]["data_offsets"][0]
            for name in ("ids", "values")
        )
        assert header["ids"]["dtype"] == ("I32" if id_bytes == 4 else "I16")
    assert payload == positions * 16 * (id_bytes + 2)
    cache = dk.cache.TeacherCache(tmp_path)
    for index, example in enumerate(data):
        expected = direct_log_probs(model, example).topk(16, dim=-1).indices
        valid = example.get("attention_mask", torch.ones(len(expected))).bool()
        assert torch.equal(cache[index]["ids"][valid], expected[valid])
    if encoding == "uint16":
        assert int(torch.cat([cache[i]["ids"] for i in range(len(data))]).max()) >= 32768


def test_teacher_cache_get_and_lookup_survive_a_shuffled_dataset(tmp_path):
    model, data = teacher(), ragged_dataset(12)
    dk.cache.write_teacher_cache(
        model, data, tmp_path, k=4, batch_size=5, shard_size=5, progress=False
    )
    cache = dk.cache.TeacherCache(tmp_path)
    shuffled = data[:]
    random.Random(0).shuffle(shuffled)
    assert [_key(example) for example in shuffled] != cache.keys()
    for example in shuffled:
        expected = direct_log_probs(model, example).topk(4, dim=-1).indices
        valid = example.get("attention_mask", torch.ones(len(expected))).bool()
        by_key = cache.get(example.get("id", _key(example)))
        by_content = cache.lookup(example["input_ids"], example.get("attention_mask"))
        assert torch.equal(by_key["ids"][valid], expected[valid])
        assert torch.equal(by_content["ids"], by_key["ids"])
    with pytest.raises(KeyError, match="no sample with key 'missing'"):
        cache.get("missing")
    with pytest.raises(KeyError, match="content hash"):
        cache.lookup(torch.tensor([1, 2, 3, 4, 5, 6, 7, 8, 9]))


def test_teacher_cache_reads_the_same_without_mmap_and_after_pickling(tmp_path):
    model, data = teacher(), ragged_dataset(6)
    dk.cache.write_teacher_cache(model, data, tmp_path, k=3, shard_size=4, progress=False)
    mapped = dk.cache.TeacherCache(tmp_path)
    in_memory = dk.cache.TeacherCache(tmp_path, mmap=False)
    _ = mapped[0]  # opens a shard, which a pickled copy (a DataLoader worker) must reopen
    copied = pickle.loads(pickle.dumps(mapped))
    for index in range(len(data)):
        for other in (in_memory, copied):
            assert torch.equal(other[index]["ids"], mapped[index]["ids"])
            assert torch.equal(other[index]["values"], mapped[index]["values"])
    assert torch.equal(mapped[-1]["ids"], mapped[len(data) - 1]["ids"])
    assert torch.equal(mapped[torch.tensor(2)]["ids"], mapped[2]["ids"])  # any integer index
    with pytest.raises(IndexError):
        mapped[len(data)]


def test_write_teacher_cache_bfloat16_values(tmp_path):
    model, data = teacher(), ragged_dataset(4)
    manifest = dk.cache.write_teacher_cache(
        model, data, tmp_path, k=5, values_dtype="bfloat16", progress=False
    )
    assert manifest["values"]["dtype"] == "bfloat16"
    assert manifest["bytes_per_token"]["payload"] == 5 * (2 + 2)
    cache = dk.cache.TeacherCache(tmp_path)
    reference = direct_log_probs(model, data[0]).topk(5, dim=-1).values
    torch.testing.assert_close(cache[0]["values"].double(), reference, rtol=8e-3, atol=1e-2)


@pytest.mark.parametrize(
    ("vocab_size", "encoding"),
    [(32768, "int16"), (32769, "uint16"), (65535, "uint16"), (65536, "int32")],
)
def test_encode_ids_round_trips_through_safetensors_at_the_boundaries(vocab_size, encoding):
    from safetensors.torch import load, save

    from darkknowledge.cache.shards import decode_ids, encode_ids, id_encoding

    assert id_encoding(vocab_size) == encoding
    ids = torch.tensor([[-1, 0, 1, vocab_size // 2, vocab_size - 2, vocab_size - 1]])
    stored = load(save({"ids": encode_ids(ids, encoding)}))["ids"]
    assert stored.element_size() == (4 if encoding == "int32" else 2)
    assert torch.equal(decode_ids(stored, encoding), ids)
