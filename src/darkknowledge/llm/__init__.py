"""Causal-LM distillation for Hugging Face models: labels, output layers and the Distiller task.

- :func:`shift_labels`: the one place labels are shifted (position t predicts token t+1).
- :func:`output_layer`, :func:`last_hidden_states`: what the fused loss needs, without logits.
- :class:`CausalLMTask`: the :class:`darkknowledge.Distiller` task, on the fused loss.
- :class:`CachedCausalLMTask`: the same from a teacher cache (``dk.cache``), on the sparse loss.
- :class:`PaddingCollator`: ragged examples -> one padded batch (left or right).
- :class:`OnPolicyTask`: on-policy and mixed distillation (GKD), completions sampled from the
  student by a :class:`Sampler` (:class:`GenerateSampler`: Hugging Face ``generate``);
  :func:`sampled_reverse_kl_loss` and :func:`token_logprobs` for its sampled reverse KL.
- :func:`shared_vocab_size`: the vocabulary teacher and student share (padding rows cut, a
  tokenizer mismatch refused).
"""

from .cached_task import CachedCausalLMTask
from .collate import PaddingCollator
from .generation import Completions, GenerateSampler, Sampler
from .heads import (
    OutputLayer,
    last_hidden_states,
    logit_transform,
    logits_from_hidden,
    output_layer,
)
from .labels import shift_labels
from .on_policy import OnPolicyTask
from .sampled_kl import sampled_reverse_kl_loss, token_logprobs
from .task import CausalLMTask
from .vocab import shared_vocab_size

__all__ = [
    "CachedCausalLMTask",
    "CausalLMTask",
    "Completions",
    "GenerateSampler",
    "OnPolicyTask",
    "OutputLayer",
    "PaddingCollator",
    "Sampler",
    "last_hidden_states",
    "logit_transform",
    "logits_from_hidden",
    "output_layer",
    "sampled_reverse_kl_loss",
    "shared_vocab_size",
    "shift_labels",
    "token_logprobs",
]
