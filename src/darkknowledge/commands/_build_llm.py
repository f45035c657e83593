"""Config -> objects for ``task: causal_lm``: text data, Hugging Face causal LMs, their task.

The data are the standard library's source as bytes (``stdlib_bytes``, the corpus of ``dk demo
llm``) or user code returning ``(train, eval)`` datasets of token-id examples, padded into
batches by :class:`darkknowledge.llm.PaddingCollator`. Every model is built by
:func:`darkknowledge.llm.models.build_causal_lm`; every stage trains with
:class:`darkknowledge.llm.CausalLMTask` (the fused loss), the distilled student with the
on-policy task when ``distill.on_policy`` is set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..config import Config, DataConfig, ModelConfig, thaw
from ..llm.data import VOCAB_SIZE, WindowDataset, sequential_windows, stdlib_corpus
from ..llm.models import build_causal_lm, load_causal_lm_weights
from ..models import import_callable


@dataclass(frozen=True)
class TextData:
    """Training examples, the eval batches, the vocabulary size the data imply (None: unknown)
    and how training examples become batches (None: default stacking)."""

    train: Dataset
    eval: Any
    vocab_size: int | None
    collate: Any = None


def build_text_data(spec: DataConfig, seed: int) -> TextData:
    """The data set named by ``data.name`` for a causal LM."""
    if spec.name == "stdlib_bytes":
        corpus = stdlib_corpus(train_bytes=spec.train_bytes, heldout_bytes=spec.heldout_bytes)
        train = WindowDataset(
            corpus.train, block_size=spec.block_size, prompt_length=spec.prompt_length, seed=seed
        )
        # Held-out windows count every token: bits per byte comparable across prompt lengths.
        evaluation = sequential_windows(
            corpus.heldout, block_size=spec.block_size, batch_size=spec.eval_batch_size
        )
        return TextData(train, evaluation, spec.vocab_size or VOCAB_SIZE)
    from ..llm.collate import PaddingCollator

    result = import_callable(spec.name, "data.name")(**thaw(spec.args))
    if not (isinstance(result, tuple | list) and len(result) == 2):
        raise TypeError(
            f"data.name {spec.name!r} must return (train_dataset, eval_dataset), got {type(result).__name__}"
        )
    train, evaluation = result
    first = train[0] if len(train) else None
    if not (isinstance(first, dict) and "input_ids" in first):
        raise TypeError(
            f"data.name {spec.name!r}: a causal-LM example is a dict with input_ids (and optionally "
            f"prompt_lengths, completion_mask, labels, attention_mask), got {type(first).__name__}"
        )
    collate = PaddingCollator(pad_token_id=spec.pad_token_id)
    batches = DataLoader(evaluation, batch_size=spec.eval_batch_size, collate_fn=collate)
    return TextData(train, batches, spec.vocab_size, collate)


class CausalLMParts:
    """What a run of ``task: causal_lm`` builds (the interface of :class:`._build.ClassifierParts`)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.data = build_text_data(config.data, config.data.split_seed)
        self.num_classes = self.data.vocab_size  # what a learnable temperature would see

    def model(self, spec: ModelConfig, path: str) -> nn.Module:
        model = build_causal_lm(
            spec.name, args=thaw(spec.args), checkpoint=spec.checkpoint,
            vocab_size=self.data.vocab_size, what=path,
        )  # fmt: skip
        if self.config.mtp is not None and path == "student":  # the student gets the heads
            from ..mtp import MTPStudent

            mtp = self.config.mtp
            return MTPStudent.from_model(
                model, mtp.kind, mtp.num_depths, intermediate_size=mtp.intermediate_size,
                freeze_model=mtp.freeze_model,
            )  # fmt: skip
        return model

    def load(self, model: nn.Module, path: str) -> nn.Module:
        return load_causal_lm_weights(model, path)

    def loaders(self, stage: str, distill: bool) -> tuple[DataLoader, Any]:
        spec, data = self.config.data, self.data
        generator = torch.Generator().manual_seed(self.config.train.seed)
        if distill and self.config.teacher.cache is not None:  # batches carry cached targets
            from ._cached import cached_train_loader

            return cached_train_loader(self.config, data, generator), data.eval
        train = DataLoader(
            data.train, batch_size=spec.batch_size, shuffle=True, generator=generator,
            collate_fn=data.collate, drop_last=False,
        )  # fmt: skip
        return train, data.eval

    def task(self, stage: str, distill: bool) -> Any:
        """The fused-loss task; the distilled student's is on-policy with ``distill.on_policy``."""
        from ..llm.task import CausalLMTask

        if distill and self.config.teacher.cache is not None:  # the fused sparse loss
            from ._cached import cached_task

            return cached_task(self.config)
        if distill and self.config.distill.on_policy is not None:
            return on_policy_task(self.config)
        if self.config.mtp is not None and stage in ("student", "baseline"):
            from ..mtp import MTPTask

            mtp = self.config.mtp
            return MTPTask(depth_weights=mtp.depth_weights, main_weight=mtp.main_weight)
        return CausalLMTask()

    def eval_task(self) -> Any:
        from ..llm.task import CausalLMTask

        if self.config.mtp is not None:  # evaluates an MTP student's model and plain models
            from ..mtp import MTPTask

            return MTPTask()
        return CausalLMTask()

    def metrics(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """Add bits per token and perplexity to a final evaluation (``eval_loss`` in nats)."""
        return {**metrics, **lm_metrics(metrics.get("eval_loss"), prefix="eval_")}


def lm_metrics(loss: float | None, prefix: str = "") -> dict[str, float]:
    """``bits_per_token = loss / ln 2`` and ``perplexity = exp(loss)`` of a cross-entropy in nats.

    >>> lm_metrics(math.log(8), prefix="eval_")["eval_bits_per_token"]
    3.0
    """
    if loss is None:
        return {}
    return {
        f"{prefix}bits_per_token": loss / math.log(2),
        f"{prefix}perplexity": math.exp(min(loss, 700.0)),  # exp overflows a float past ~709
    }


def on_policy_task(config: Config) -> Any:
    """:class:`darkknowledge.llm.OnPolicyTask` from ``distill.on_policy`` (seeded by
    ``train.seed``), its sampler built-in or named ``package.module:callable``."""
    from ..llm.generation import GenerateSampler
    from ..llm.on_policy import OnPolicyTask

    spec = config.distill.on_policy
    settings = {
        "temperature": spec.sampling_temperature, "top_k": spec.top_k, "top_p": spec.top_p,
        "eos_token_id": spec.eos_token_id,
    }  # fmt: skip
    if spec.sampler == "generate":
        sampler = GenerateSampler(**settings, pad_token_id=config.data.pad_token_id)
    else:
        sampler = import_callable(spec.sampler, "distill.on_policy.sampler")(
            **settings, **thaw(spec.sampler_args)
        )
    return OnPolicyTask(
        fraction=spec.fraction, sampler=sampler, objective=spec.objective,
        max_new_tokens=spec.max_new_tokens, seed=config.train.seed,
    )  # fmt: skip
