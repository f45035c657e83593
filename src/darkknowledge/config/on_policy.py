"""The ``distill.on_policy`` section: on-policy and mixed distillation (docs/on-policy.md)."""

# field_() wraps dataclasses.field(), which ruff does not recognise as a field specifier.

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from .fields import builtin_or_reference, choice, field_, integer, mapping, number, optional

NO_ARGUMENTS: Mapping[str, Any] = MappingProxyType({})


@dataclass(frozen=True)
class OnPolicyConfig:
    fraction: float = field_(
        1.0,
        number(at_least=0, at_most=1),
        "GKD's lambda: the probability that a step's completions are sampled from the student "
        "(from the data's prompts) instead of taken from the data (0: off-policy KD)",
    )
    sampling_temperature: float = field_(
        1.0,
        number(above=0),
        "temperature of the student's samples, apart from the loss temperature distill.temperature",
    )
    top_k: int | None = field_(
        None,
        optional(integer(at_least=1)),
        "sample from the k most likely tokens only (null: the full distribution; truncation "
        "makes the samples off-policy)",
    )
    top_p: float | None = field_(
        None,
        optional(number(above=0, at_most=1)),
        "sample from the nucleus of mass p only (null: the full distribution; off-policy too)",
    )
    max_new_tokens: int | None = field_(
        None,
        optional(integer(at_least=1)),
        "tokens sampled per prompt (null: as many as the row's completion in the data has)",
    )
    eos_token_id: int | None = field_(
        None,
        optional(integer(at_least=0)),
        "a sampled completion ends after this token (null: never, max_new_tokens always)",
    )
    objective: str = field_(
        "divergence",
        choice("divergence", "sampled_reverse_kl"),
        'on sampled completions: "divergence" (distill.divergence through the fused loss) or '
        '"sampled_reverse_kl" (the per-token estimate from the teacher\'s log-probability of '
        "each sampled token; needs divergence: reverse_kl, used exactly on the data's steps)",
    )
    sampler: str = field_(
        "generate",
        builtin_or_reference("generate"),
        'what samples: "generate" (Hugging Face generate with a KV cache) or '
        '"package.module:callable" called with temperature, top_k, top_p, eos_token_id and '
        "sampler_args, returning a darkknowledge.llm.Sampler (e.g. a vLLM engine)",
    )
    sampler_args: Mapping[str, Any] = field_(
        NO_ARGUMENTS, mapping, "more keyword arguments for a package.module:callable sampler"
    )
