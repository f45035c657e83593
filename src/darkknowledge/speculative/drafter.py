"""The draft side of speculative decoding: a small protocol and the built-in model drafter.

A drafter proposes tokens and says which distributions it drew them from; :func:`generate`
verifies them against the target. Anything with these members is a drafter:

- ``wants_target_hidden: bool``: True if ``propose`` needs the target's hidden states
  (self-speculation with the target's own multi-token-prediction heads);
- ``reset()``: forget any previous sequence (called once at the start of ``generate``);
- ``propose(input_ids, num_tokens, sampler, target_hidden) -> Draft``: up to ``num_tokens``
  tokens that continue ``input_ids`` ``(1, L)``, each drawn with ``sampler.sample`` from the
  distribution ``sampler.probs(...)`` reported in ``Draft.probs`` (exactness needs only that:
  token i must be drawn from row i, which may depend on the context and the earlier draft
  tokens, or not). Fewer tokens than asked (even none) are allowed;
- ``rollback(num_accepted)``: the target kept the first ``num_accepted`` tokens of the last
  proposal and appended one token of its own; the next ``propose`` gets that sequence.

``target_hidden`` is None or ``(1, n, H)``: the target's final-layer hidden states
(``output.hidden_states[-1]``, after the final norm) at positions ``L − 1 − n .. L − 2`` of
``input_ids``, the positions the target committed to its KV cache since the previous
``propose``. The state at position ``t`` is the one from which the target predicted token
``t + 1``; multi-token heads on it predict tokens ``t + 2, t + 3, ...``, i.e. from the last one
(position ``L − 2``) the tokens at ``L, L + 1, ...``: exactly the draft. On the first call it
holds the whole prompt but its last token (it is None when the prompt has one token).
"""

from __future__ import annotations

from typing import NamedTuple, Protocol, runtime_checkable

import torch
from torch import nn

from ..llm.heads import unwrap_model
from ._cache import CachedLM
from .verify import Sampler


class Draft(NamedTuple):
    """Proposed tokens ``(k,)`` long and the distributions they were drawn from ``(k, V)``."""

    tokens: torch.Tensor
    probs: torch.Tensor


class DraftRows:
    """Draft tokens drawn one at a time with ``sampler``, and the rows they were drawn from:
    what every drafter reports (each token from exactly the row it reports)."""

    def __init__(self, sampler: Sampler) -> None:
        self.sampler = sampler
        self.tokens: list[torch.Tensor] = []
        self.probs: list[torch.Tensor] = []

    def draw(self, logits: torch.Tensor) -> torch.Tensor:
        """A token ``()`` drawn from ``sampler.probs(logits)`` (``logits`` ``(V,)``), recorded."""
        row = self.sampler.probs(logits)  # (V,)
        token = self.sampler.sample(row)
        self.tokens.append(token)
        self.probs.append(row)
        return token

    def draft(self, vocab_size: int, device: torch.device | str | None = None) -> Draft:
        """The tokens drawn so far as a :class:`Draft`: ``(k,)`` and ``(k, V)``; with none, an
        empty one of ``vocab_size`` columns on ``device``."""
        if not self.tokens:
            empty = torch.zeros(0, dtype=torch.long, device=device)
            return Draft(empty, torch.zeros(0, vocab_size, device=device))
        return Draft(torch.stack(self.tokens), torch.stack(self.probs))


@runtime_checkable
class Drafter(Protocol):
    """What :func:`darkknowledge.speculative.generate` needs from a draft (see the module doc)."""

    wants_target_hidden: bool

    def reset(self) -> None: ...

    def propose(
        self,
        input_ids: torch.Tensor,
        num_tokens: int,
        sampler: Sampler,
        target_hidden: torch.Tensor | None = None,
    ) -> Draft: ...

    def rollback(self, num_accepted: int) -> None: ...


class ModelDrafter:
    """A separate (small) Hugging Face causal LM as the draft, decoding with its own KV cache.

    Args:
        model: the draft LM; it must share the target's tokenizer.
        vocab_size: the target's vocabulary (logit width). A draft whose output layer is wider
            (padding rows) has the extra logits cut; a narrower one gives zero probability to
            the missing tokens, and a ValueError is raised if the target ever emits one (the
            draft cannot read it). Either way the draft reports the distribution it samples
            from, so decoding stays exact. None: the draft's own width.

    After proposing k tokens from a sequence of length L its cache covers ``L + k − 1`` tokens
    (the last draft token is never fed); ``rollback(n)`` crops it to at most ``L + n``.
    ``forward_calls`` counts the draft's forward passes since ``reset()``.
    """

    wants_target_hidden = False

    def __init__(self, model: nn.Module, *, vocab_size: int | None = None) -> None:
        self._lm = CachedLM(model)
        self.vocab_size = vocab_size
        inner = unwrap_model(model)
        embeddings = (
            inner.get_input_embeddings() if hasattr(inner, "get_input_embeddings") else None
        )
        weight = getattr(embeddings, "weight", None)
        # Token ids the draft can read; only checked when the target's vocabulary is larger.
        self._readable = int(weight.shape[0]) if isinstance(weight, torch.Tensor) else None
        self._context_length = 0
        self.forward_calls = 0

    def reset(self) -> None:
        self._lm.reset()
        self._context_length = 0
        self.forward_calls = 0

    def propose(
        self,
        input_ids: torch.Tensor,
        num_tokens: int,
        sampler: Sampler,
        target_hidden: torch.Tensor | None = None,
    ) -> Draft:
        length = input_ids.shape[1]
        self._context_length = length
        if self._lm.length >= length:
            raise RuntimeError(
                f"the draft's cache covers {self._lm.length} tokens of a {length}-token sequence: "
                "call rollback(num_accepted) after each verification, reset() before a new sequence"
            )
        pending = input_ids[:, self._lm.length :]  # (1, new tokens), at least one
        self._check_readable(pending)
        rows = DraftRows(sampler)
        for _ in range(num_tokens):
            logits, _ = self._lm.extend(pending, keep_logits=1)
            self.forward_calls += 1
            token = rows.draw(self._fit_vocabulary(logits[-1]))
            pending = token.reshape(1, 1)
        return rows.draft(self.vocab_size or 0)

    def rollback(self, num_accepted: int) -> None:
        keep = self._context_length + num_accepted
        if self._lm.length > keep:
            self._lm.crop(keep)

    def _check_readable(self, tokens: torch.Tensor) -> None:
        if self._readable is None or self.vocab_size is None or self.vocab_size <= self._readable:
            return
        largest = int(tokens.max())
        if largest >= self._readable:
            raise ValueError(
                f"the sequence holds token {largest}, which the draft cannot read (its embedding has "
                f"{self._readable} rows, the target's vocabulary {self.vocab_size}); use a draft with "
                "the target's full vocabulary"
            )

    def _fit_vocabulary(self, logits: torch.Tensor) -> torch.Tensor:
        return logits if self.vocab_size is None else fit_vocabulary(logits, self.vocab_size)


def fit_vocabulary(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """A draft's ``(..., V_draft)`` logits at the target's width ``(..., V)``: extra (padding)
    logits cut, missing tokens at ``-inf`` (probability 0)."""
    if logits.shape[-1] == vocab_size:
        return logits
    if logits.shape[-1] > vocab_size:
        return logits[..., :vocab_size]
    missing = vocab_size - logits.shape[-1]
    return torch.cat([logits, logits.new_full((*logits.shape[:-1], missing), float("-inf"))], -1)
