"""A causal-LM student with multi-token-prediction heads: one module, one set of parameters.

:class:`MTPStudent` holds the Hugging Face model and the heads, so an optimizer, DDP,
Accelerate and a checkpoint see both (``state_dict`` keys ``model.*`` and ``heads.*``; the
embedding and the output layer are the model's, stored once). Its ``forward`` runs the model
up to its last hidden states (the output layer is skipped: no logits) and the heads on them.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn

from ..llm.heads import OutputLayer, last_hidden_states, output_layer, unwrap_model
from .heads import MTPHeads, heads_for_model


class MTPOutput(NamedTuple):
    """``hidden`` ``(B, T, H)``: the trunk's last hidden states (depth 0, the next token);
    ``depth_hidden``: ``num_depths`` states ``(B, T, H)``, depth k's row i predicting token
    ``i + k + 1``."""

    hidden: torch.Tensor
    depth_hidden: list[torch.Tensor]


class MTPStudent(nn.Module):
    """A Hugging Face causal LM and its MTP heads, trained together.

    Args:
        model: the causal LM (GPT-2-like: ``get_input_embeddings``, ``get_output_embeddings``).
        heads: :class:`~darkknowledge.mtp.ParallelMTPHeads` or
            :class:`~darkknowledge.mtp.SequentialMTPModules` of the model's hidden size.

    >>> import transformers
    >>> transformers.logging.set_verbosity_error()
    >>> config = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=8, n_layer=1, n_head=2)
    >>> student = MTPStudent.from_model(transformers.GPT2LMHeadModel(config), "sequential", num_depths=2)
    >>> out = student(torch.randint(40, (2, 6)))
    >>> tuple(out.hidden.shape), [tuple(h.shape) for h in out.depth_hidden]
    ((2, 6, 8), [(2, 6, 8), (2, 6, 8)])
    """

    def __init__(self, model: nn.Module, heads: MTPHeads) -> None:
        super().__init__()
        if not isinstance(heads, MTPHeads):
            raise TypeError(
                f"heads must be ParallelMTPHeads or SequentialMTPModules, got {type(heads).__name__}"
            )
        width = output_layer(model).weight.shape[1]
        if width != heads.hidden_size:
            raise ValueError(
                f"the heads have hidden size {heads.hidden_size} but the model's output layer reads "
                f"{width}-wide hidden states"
            )
        if heads.needs_embeddings:
            embedding_size = _input_embeddings(model).weight.shape[1]
            if embedding_size != heads.embedding_size:
                raise ValueError(
                    f"the modules read {heads.embedding_size}-wide token embeddings but the "
                    f"model's input embedding is {embedding_size} wide"
                )
        self.model = model
        self.heads = heads
        self.model_frozen = False

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        kind: str,
        num_depths: int,
        *,
        intermediate_size: int | None = None,
        freeze_model: bool = False,
    ) -> MTPStudent:
        """``model`` with fresh heads of ``kind`` (``"parallel"``/``"sequential"``) sized for it;
        ``freeze_model``: train the heads alone (:meth:`freeze_model`)."""
        heads = heads_for_model(model, kind, num_depths, intermediate_size=intermediate_size)
        student = cls(model, heads)
        return student.freeze_model() if freeze_model else student

    def freeze_model(self) -> MTPStudent:
        """Train the heads alone on a finished model: the model's parameters (its embedding and
        output layer included) stop requiring gradients, and the model stays in eval mode
        whatever ``train()`` says, so the heads learn from the same dropout-free states they
        will draft from. Returns ``self``."""
        self.model.requires_grad_(False)
        self.model_frozen = True
        self.model.eval()
        return self

    def train(self, mode: bool = True) -> MTPStudent:
        super().train(mode)
        if self.model_frozen:
            self.model.eval()  # a frozen trunk never drops out
        return self

    @property
    def num_depths(self) -> int:
        return self.heads.num_depths

    def output_layer(self) -> OutputLayer:
        """The model's output layer, shared by every depth."""
        return output_layer(self.model)

    def input_embeddings(self) -> nn.Module:
        """The model's input embedding (read by the sequential form)."""
        return _input_embeddings(self.model)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        **model_kwargs: Any,
    ) -> MTPOutput:
        """The trunk's last hidden states and every depth's, for ``input_ids`` ``(B, T)``."""
        hidden = last_hidden_states(self.model, input_ids, attention_mask, **model_kwargs)
        embeddings = self.input_embeddings() if self.heads.needs_embeddings else None
        return MTPOutput(hidden, self.heads(hidden, input_ids, embeddings))


def as_mtp_student(module: nn.Module) -> MTPStudent:
    """The :class:`MTPStudent` inside DDP / Accelerate / ``torch.compile`` wrappers."""
    inner = unwrap_model(module)
    if not isinstance(inner, MTPStudent):
        raise TypeError(
            f"expected an MTPStudent (a causal LM with MTP heads), got {type(inner).__name__}; "
            "build one with darkknowledge.mtp.MTPStudent.from_model(model, kind, num_depths)"
        )
    return inner


def _input_embeddings(model: nn.Module) -> nn.Module:
    inner = unwrap_model(model)
    embeddings = inner.get_input_embeddings() if hasattr(inner, "get_input_embeddings") else None
    if embeddings is None or not isinstance(getattr(embeddings, "weight", None), torch.Tensor):
        raise TypeError(
            f"{type(inner).__name__} has no input embedding with a weight (get_input_embeddings())"
        )
    return embeddings
