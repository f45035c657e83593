"""The identities a teacher cache is keyed and checked by: sample keys, content hashes, the
dataset fingerprint, the teacher's weights hash, the tokenizer hash, the sampling seeds.

Every one is a SHA-256 over a documented byte encoding, so another program (a vLLM capture
script, a data pipeline) can compute the same values without darkknowledge:

- content hash of an example: ``sha256(b"input_ids:" + int64-LE bytes of input_ids
  [+ b"attention_mask:" + uint8 bytes of the mask, only when it holds a 0])``;
- sample key: ``str(example["id"])`` when the example has an ``id``, else
  ``"sha256:" + content hash``;
- dataset fingerprint: ``sha256`` of the lines ``f"{key}\\t{content_hash}\\n"`` in dataset order;
- sampling seed of a sequence: the first 8 bytes (little-endian) of
  ``sha256(f"{seed}\\0{key}")``, masked to 63 bits.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

# Hash a large tensor in slices of this many bytes, so hashing never copies a whole tensor.
_HASH_SLICE_BYTES = 64 * 2**20


class Example(NamedTuple):
    """One validated dataset example."""

    input_ids: torch.Tensor  # (T,) int64
    attention_mask: torch.Tensor | None  # (T,) bool, or None when every position is valid
    key: str
    content_hash: str


def content_hash(
    input_ids: torch.Tensor | Sequence[int], attention_mask: torch.Tensor | None = None
) -> str:
    """SHA-256 (hex) of a sequence's tokens, and of its mask when the mask hides a position.

    >>> content_hash([1, 2, 3]) == content_hash(torch.tensor([1, 2, 3]), torch.ones(3))
    True
    >>> content_hash([1, 2, 3]) == content_hash([1, 2, 3], torch.tensor([1, 1, 0]))
    False
    """
    ids = _as_ids(input_ids, "input_ids")
    mask = None if attention_mask is None else _as_mask(attention_mask, ids.shape, "attention_mask")
    return _content_hash(ids, mask)


def _content_hash(ids: torch.Tensor, mask: torch.Tensor | None) -> str:
    hasher = hashlib.sha256(b"input_ids:")
    hasher.update(ids.to(torch.int64).contiguous().numpy().astype("<i8").tobytes())
    if mask is not None and not bool(mask.all()):
        hasher.update(b"attention_mask:")
        hasher.update(mask.to(torch.uint8).contiguous().numpy().tobytes())
    return hasher.hexdigest()


def read_example(example: Any, index: int, vocab_size: int | None = None) -> Example:
    """Validate ``dataset[index]``: a mapping with a 1-D integer ``input_ids``, an optional
    ``attention_mask`` of the same shape and an optional ``id`` (int or str)."""
    where = f"dataset[{index}]"
    if not isinstance(example, Mapping):
        raise TypeError(
            f"{where} must be a dict with 'input_ids' (and optionally 'attention_mask', 'id'), "
            f"got {type(example).__name__}"
        )
    if "input_ids" not in example:
        raise ValueError(f"{where} has no 'input_ids'; its keys are {sorted(map(str, example))}")
    ids = _as_ids(example["input_ids"], f"{where}['input_ids']")
    if vocab_size is not None and ids.numel() and int(ids.max()) >= vocab_size:
        raise ValueError(
            f"{where}['input_ids'] holds token id {int(ids.max())}, outside the teacher's "
            f"vocabulary of {vocab_size}"
        )
    mask = example.get("attention_mask")
    if mask is not None:
        mask = _as_mask(mask, ids.shape, f"{where}['attention_mask']")
        if bool(mask.all()):
            mask = None
    digest = _content_hash(ids, mask)
    sample_id = example.get("id")
    if sample_id is None:
        key = f"sha256:{digest}"
    elif isinstance(sample_id, bool) or not isinstance(sample_id, int | str):
        raise TypeError(
            f"{where}['id'] must be an int or a str, got {type(sample_id).__name__} {sample_id!r}"
        )
    else:
        key = str(sample_id)
    return Example(ids, mask, key, digest)


def _as_ids(value: Any, name: str) -> torch.Tensor:
    ids = value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    if ids.dim() != 1 or ids.numel() == 0:
        raise ValueError(
            f"{name} must be a non-empty 1-D sequence (T,), got shape {tuple(ids.shape)}"
        )
    if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.is_complex():
        raise TypeError(f"{name} must hold integer token ids, got dtype {ids.dtype}")
    ids = ids.detach().to("cpu", torch.int64)
    if int(ids.min()) < 0:
        raise ValueError(f"{name} must hold token ids >= 0, got {int(ids.min())}")
    return ids


def _as_mask(value: Any, shape: torch.Size, name: str) -> torch.Tensor:
    mask = value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    if mask.shape != shape:
        raise ValueError(
            f"{name} must have the shape of input_ids {tuple(shape)}, got {tuple(mask.shape)}"
        )
    mask = mask.detach().cpu()
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"{name} must hold only 0 and 1 (or booleans)")
    return mask.bool()


def dataset_fingerprint(dataset: Sequence[Mapping[str, Any]]) -> str:
    """SHA-256 over the dataset's sample keys and content hashes, in order.

    >>> data = [{"input_ids": [1, 2], "id": "a"}, {"input_ids": [3]}]
    >>> dataset_fingerprint(data) == dataset_fingerprint(data[::-1])
    False
    """
    return fingerprint(read_example(dataset[i], i) for i in range(len(dataset)))


def fingerprint(examples: Any) -> str:
    """The dataset fingerprint of an iterable of :class:`Example`."""
    hasher = hashlib.sha256()
    for example in examples:
        hasher.update(f"{example.key}\t{example.content_hash}\n".encode())
    return hasher.hexdigest()


def weights_hash(model: nn.Module) -> str:
    """SHA-256 of a model's state dict: for every tensor in order of name,
    ``f"{name}|{dtype}|{shape}|"`` then its bytes (little-endian), hashed one 64 MB slice at a
    time (never a second copy of the model in memory).

    >>> weights_hash(nn.Linear(2, 2)) == weights_hash(nn.Linear(2, 2))  # other random weights
    False
    """
    hasher = hashlib.sha256()
    state = model.state_dict()
    for name in sorted(state):
        tensor = state[name].detach()
        if tensor.device.type == "meta":
            raise ValueError(
                f"cannot hash the teacher's weights: {name!r} is on the meta device (offloaded); "
                "load the teacher's weights before capturing"
            )
        hasher.update(
            f"{name}|{str(tensor.dtype).removeprefix('torch.')}|{list(tensor.shape)}|".encode()
        )
        flat = tensor.reshape(-1)
        step = max(1, _HASH_SLICE_BYTES // max(1, tensor.element_size()))
        for start in range(0, flat.numel(), step):
            piece = flat[start : start + step].to("cpu").contiguous()
            hasher.update(piece.view(torch.uint8).numpy().tobytes())
    return hasher.hexdigest()


def tokenizer_hash(tokenizer: Any) -> str:
    """SHA-256 of a tokenizer's vocabulary (``get_vocab()``: token -> id, sorted by id).

    >>> class Bytes:
    ...     def get_vocab(self):
    ...         return {chr(i): i for i in range(256)}
    >>> len(tokenizer_hash(Bytes()))
    64
    """
    get_vocab = getattr(tokenizer, "get_vocab", None)
    if not callable(get_vocab):
        raise TypeError(
            f"tokenizer must have get_vocab() (a Hugging Face tokenizer), got {type(tokenizer).__name__}"
        )
    vocab = sorted(get_vocab().items(), key=lambda item: (item[1], item[0]))
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()


def sampling_seed(seed: int, key: str) -> int:
    """The seed of a sequence's uniforms: depends on ``(seed, key)`` only, never on the order,
    the batch or the process a sequence is captured in.

    >>> sampling_seed(0, "a") == sampling_seed(0, "a") != sampling_seed(1, "a")
    True
    """
    digest = hashlib.sha256(f"{seed}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def sampling_uniforms(seed: int, key: str, positions: int, num_samples: int) -> torch.Tensor:
    """The uniforms ``u`` ``(positions, num_samples)`` (float64, CPU) whose inverse-CDF draws
    are a sequence's samples: ``torch.rand`` from a generator seeded by :func:`sampling_seed`."""
    generator = torch.Generator().manual_seed(sampling_seed(seed, key))
    return torch.rand((positions, num_samples), generator=generator, dtype=torch.float64)
