"""Causal-LM distillation for Hugging Face models: labels, output layers and the Distiller task.

- :func:`shift_labels`: the one place labels are shifted (position t predicts token t+1).
- :func:`output_layer`, :func:`last_hidden_states`: what the fused loss needs, without logits.
- :class:`CausalLMTask`: the :class:`darkknowledge.Distiller` task, on the fused loss.
- :class:`CachedCausalLMTask`: the same from a teacher cache (``dk.cache``), on the sparse loss.
- :class:`PaddingCollator`: ragged examples -> one padded batch (left or right).
- :func:`shared_vocab_size`: the vocabulary teacher and student share (padding rows cut, a
  tokenizer mismatch refused).
"""

from .cached_task import CachedCausalLMTask
from .collate import PaddingCollator
from .heads import (
    OutputLayer,
    last_hidden_states,
    logit_transform,
    logits_from_hidden,
    output_layer,
)
from .labels import shift_labels
from .task import CausalLMTask
from .vocab import shared_vocab_size

__all__ = [
    "CachedCausalLMTask",
    "CausalLMTask",
    "OutputLayer",
    "PaddingCollator",
    "last_hidden_states",
    "logit_transform",
    "logits_from_hidden",
    "output_layer",
    "shared_vocab_size",
    "shift_labels",
]
