"""Speculative decoding, exact (Leviathan et al., 2023; Chen et al., 2023).

A cheap draft proposes ``gamma`` tokens; the target scores them all in one call and keeps a
prefix so that every emitted token follows the target's distribution exactly:

- :func:`acceptance_rate`: ``alpha = Σ min(p, q) = 1 − TVD(p, q)``, computed without decoding;
  :func:`offline_acceptance_rate`: its mean over held-out text for a target and a draft model;
- :func:`expected_tokens_per_call`, :func:`expected_speedup`: what ``alpha`` buys;
- :func:`verify`: the accept/reject step on probabilities;
- :func:`generate`: decoding of Hugging Face causal LMs with KV caches for both models;
  :func:`autoregressive_generate`: the target alone, the baseline of a measured speed-up;
- :func:`measure_speedup`: both decodings timed on the same prompts, beside the prediction;
- :class:`Drafter`: what a draft must provide (a separate LM: :class:`ModelDrafter`; the
  target's own multi-token-prediction heads: self-speculation).

This package imports transformers' model code only when decoding; ``dk.speculative`` loads on
first access.
"""

from .acceptance import acceptance_rate, expected_speedup, expected_tokens_per_call
from .decode import GenerationOutput, autoregressive_generate, generate
from .drafter import Draft, Drafter, ModelDrafter
from .measure import SpeedupMeasurement, measure_speedup
from .offline import OfflineAcceptance, offline_acceptance_rate
from .verify import Sampler, verify

__all__ = [
    "Draft",
    "Drafter",
    "GenerationOutput",
    "ModelDrafter",
    "OfflineAcceptance",
    "Sampler",
    "SpeedupMeasurement",
    "acceptance_rate",
    "autoregressive_generate",
    "expected_speedup",
    "expected_tokens_per_call",
    "generate",
    "measure_speedup",
    "offline_acceptance_rate",
    "verify",
]
