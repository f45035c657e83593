"""The offline teacher cache: run the teacher once, train many students from its sparse targets.

- :func:`write_teacher_cache`: capture a teacher's top-k log-probabilities or sampled token
  counts for every sequence of a dataset into sharded safetensors plus a JSON manifest
  (resumable, verified, keyed by sample id or content hash, across torchrun processes).
- :class:`TeacherCache`: read it back by position, sample key or content.
- :class:`CachedTeacher`, :func:`cached_loader`: train from the cache with
  :class:`darkknowledge.llm.CachedCausalLMTask` (no teacher in memory).
- :class:`CaptureBackend`: the interface a serving engine implements to write the same files;
  :class:`HuggingFaceBackend` is the default.

See ``docs/cache.md`` for the format.
"""

from .backends import CaptureBackend, HuggingFaceBackend, inverse_cdf
from .capture import write_teacher_cache
from .hashing import (
    content_hash,
    dataset_fingerprint,
    sampling_uniforms,
    tokenizer_hash,
    weights_hash,
)
from .reader import TeacherCache
from .targets import unique_counts
from .training import CachedCollator, CachedTargets, CachedTeacher, cached_loader

__all__ = [
    "CachedCollator",
    "CachedTargets",
    "CachedTeacher",
    "CaptureBackend",
    "HuggingFaceBackend",
    "TeacherCache",
    "cached_loader",
    "content_hash",
    "dataset_fingerprint",
    "inverse_cdf",
    "sampling_uniforms",
    "tokenizer_hash",
    "unique_counts",
    "weights_hash",
    "write_teacher_cache",
]
