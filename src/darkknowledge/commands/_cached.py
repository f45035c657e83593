"""``teacher.cache`` in configs: the folder of the teacher's cached targets (``dk.cache``).

``dk cache-teacher CONFIG`` writes it (the settings in the ``cache`` section); ``dk distill
CONFIG`` then trains the student from it: no teacher model is built, the batches carry their
cached targets (:func:`darkknowledge.cache.cached_loader`, keyed by content hash) and the loss is
the fused sparse one (:class:`darkknowledge.llm.CachedCausalLMTask`). The student's batches
are those of the live run of the same config (same dataset, same shuffle seed).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import DataLoader, default_collate


def cached_teacher(
    config: Any, summaries: list[dict[str, Any]], say: Callable[[str], None]
) -> torch.nn.Module:
    """The teacher's stand-in for ``teacher.cache``; appends the teacher's summary."""
    from ..cache import CachedTeacher, TeacherCache

    path = config.teacher.cache
    try:
        cache = TeacherCache(path)
    except ValueError as error:
        raise ValueError(
            f"teacher.cache: {error}; write it with dk cache-teacher CONFIG (same config)"
        ) from None
    manifest = cache.manifest
    width = f"k={manifest['k']}" if cache.representation == "topk" else (
        f"{manifest['num_samples']} samples"
    )  # fmt: skip
    bytes_per_token = manifest["bytes_per_token"]["on_disk"]
    say(
        f"teacher: from the cache {path} ({cache.representation}, {width}, {len(cache)} "
        f"sequences, {bytes_per_token:.1f} bytes/token); no teacher model in memory"
    )
    summaries.append({
        "stage": "teacher", "model": f"teacher cache ({cache.representation}, {width})",
        "source": str(path), "teacher": manifest["teacher"],
        "bytes_per_token": manifest["bytes_per_token"],
    })  # fmt: skip
    return CachedTeacher(cache)


def cached_train_loader(config: Any, data: Any, generator: torch.Generator) -> DataLoader:
    """The student's training batches with their cached targets; the dataset is checked
    against the cache's fingerprint (a cache of other data is refused, naming both).

    The lookups run in one loader worker when a GPU trains (the CPU is otherwise idle), in the
    training process on a CPU, where a worker competes for the same cores and its shared-memory
    hand-over cost more than the lookups (benchmarks/results/teacher_cache.md)."""
    from ..cache import cached_loader

    try:
        return cached_loader(
            data.train, config.teacher.cache, batch_size=config.data.batch_size, shuffle=True,
            generator=generator, collate_fn=data.collate or default_collate,
            num_workers=1 if torch.cuda.is_available() else 0,
        )  # fmt: skip
    except ValueError as error:
        raise ValueError(
            f"teacher.cache: {error} (capture it from this config's data: dk cache-teacher CONFIG)"
        ) from None


def cached_task(config: Any) -> Any:
    from ..llm.cached_task import CachedCausalLMTask

    return CachedCausalLMTask(tail=config.distill.tail)
