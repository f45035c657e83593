"""Multi-token prediction: heads that predict several tokens ahead, their distillation, and
self-speculative decoding with them (docs/mtp.md).

- :class:`ParallelMTPHeads` (Gloeckle et al., 2024) and :class:`SequentialMTPModules`
  (DeepSeek-V3): ``(B, T, H)`` trunk states -> one ``(B, T, H)`` state per depth ``k = 1..D``,
  row ``i`` of depth ``k`` predicting token ``i + k + 1`` through the model's own output layer;
- :class:`MTPStudent`: a Hugging Face causal LM and its heads as one module (optimizer, DDP,
  checkpoints see both);
- :func:`mtp_kd_loss`: depth ``k`` at row ``i`` matched to the teacher at position ``i + k``,
  per-depth weights, on the fused chunked loss (no ``(tokens, vocab)`` logits);
  :func:`mtp_batch_loss`: the student's whole objective on a batch (next token + depths);
  :class:`MTPTask`: that objective as a :class:`darkknowledge.Distiller` task;
- :class:`MTPDrafter`, :func:`self_speculate`: the heads as the draft of
  :func:`darkknowledge.speculative.generate`; :func:`depth_acceptance_rates` measures them
  offline.
"""

from .drafter import MTPDrafter, depth_acceptance_rates, expected_tokens_per_call, self_speculate
from .heads import (
    MTPHeads,
    ParallelMTPHeads,
    SequentialMTPModules,
    heads_for_model,
    heads_from_spec,
    load_heads,
    save_heads,
)
from .loss import MTPLoss, count_valid_per_depth, depth_labels, mtp_batch_loss, mtp_kd_loss
from .student import MTPOutput, MTPStudent, as_mtp_student
from .task import MTPTask

__all__ = [
    "MTPDrafter",
    "MTPHeads",
    "MTPLoss",
    "MTPOutput",
    "MTPStudent",
    "MTPTask",
    "ParallelMTPHeads",
    "SequentialMTPModules",
    "as_mtp_student",
    "count_valid_per_depth",
    "depth_acceptance_rates",
    "depth_labels",
    "expected_tokens_per_call",
    "heads_for_model",
    "heads_from_spec",
    "load_heads",
    "mtp_batch_loss",
    "mtp_kd_loss",
    "save_heads",
    "self_speculate",
]
