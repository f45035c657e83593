"""Self-speculation: a model's own MTP heads draft, the model verifies (``dk.speculative``).

One target call gives the target's hidden state at position ``L − 2`` of a sequence of length
``L`` (the state from which it predicted the last token ``t_{L−1}``). Depth ``k`` on it predicts
token ``L − 2 + k + 1 = L + k − 1``, so depths ``1..D`` draft ``x_L .. x_{L+D−1}`` without any
further call of the model:

- parallel heads: ``q_k = probs(W s^k)``, ``s^k = f_k(h_{L−2})``, the same whatever is drafted;
- sequential modules: ``s^1`` reads ``E(t_{L−1})``, and depth ``k >= 2`` reads the embedding of
  the token drafted at depth ``k − 1``, so ``q_k`` depends on the earlier draft tokens.

Each draft token ``x`` is drawn by ``sampler.sample`` from exactly the row ``q_k`` that
:class:`MTPDrafter` reports (``sampler.probs`` of the depth's logits, the target's temperature or
greedy one-hot), which is all :func:`darkknowledge.speculative.verify` needs to emit tokens
that follow the target exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..llm.heads import logits_from_hidden
from ..speculative import Draft, GenerationOutput, generate
from ..speculative.acceptance import acceptance_rate, chained_tokens_per_call
from ..speculative.drafter import DraftRows
from ..speculative.verify import Sampler, check_sampling
from .loss import depth_labels
from .student import as_mtp_student


class MTPDrafter:
    """The draft of self-speculative decoding from an :class:`~darkknowledge.mtp.MTPStudent`'s
    heads; the target given to :func:`~darkknowledge.speculative.generate` must be that
    student's ``model`` (:func:`self_speculate` pairs them).

    It proposes ``min(num_tokens, num_depths)`` tokens per round (ask for ``gamma = num_depths``)
    from the target's hidden state at the last committed position; with a one-token prompt the
    first round has no state and proposes nothing. It keeps no cache: ``rollback`` has nothing
    to undo. ``forward_calls`` counts proposals since ``reset()``.
    """

    wants_target_hidden = True

    def __init__(self, student: nn.Module) -> None:
        self.student = as_mtp_student(student)
        self.forward_calls = 0
        self._layer = None

    def reset(self) -> None:
        # Read once per sequence: a LoRA output layer computes W + s·BA when read.
        self._layer = self.student.output_layer()
        self.forward_calls = 0

    def propose(
        self,
        input_ids: torch.Tensor,
        num_tokens: int,
        sampler: Sampler,
        target_hidden: torch.Tensor | None = None,
    ) -> Draft:
        layer = self._layer if self._layer is not None else self.student.output_layer()
        rows = DraftRows(sampler)
        if target_hidden is None or target_hidden.shape[1] == 0 or num_tokens < 1:
            return rows.draft(layer.weight.shape[0], input_ids.device)  # nothing to draft from
        heads = self.student.heads
        trunk_row = target_hidden[:, -1]  # (1, H): position L - 2

        def choose(state: torch.Tensor) -> torch.Tensor:  # (1, H) -> (1,)
            return rows.draw(logits_from_hidden(state, layer)[0]).reshape(1)

        embeddings = self.student.input_embeddings() if heads.needs_embeddings else None
        heads.draft(trunk_row, input_ids[:, -1], embeddings, choose, num_tokens)
        self.forward_calls += 1
        return rows.draft(layer.weight.shape[0], input_ids.device)

    def rollback(self, num_accepted: int) -> None:
        """Nothing to undo: every proposal starts from the target's committed state."""


def self_speculate(
    student: nn.Module,
    input_ids: torch.Tensor,
    *,
    max_new_tokens: int,
    gamma: int | None = None,
    **options: Any,
) -> GenerationOutput:
    """:func:`darkknowledge.speculative.generate` with the student's model as the target and
    its heads as the draft (``gamma`` defaults to the number of depths). ``options``:
    ``temperature``, ``greedy``, ``generator``, ``eos_token_id``."""
    inner = as_mtp_student(student)
    gamma = inner.num_depths if gamma is None else gamma
    return generate(
        inner.model,
        MTPDrafter(inner),
        input_ids,
        max_new_tokens=max_new_tokens,
        gamma=gamma,
        **options,
    )


@torch.no_grad()
def depth_acceptance_rates(
    student: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    greedy: bool = False,
    chunk_size: int = 256,
    ignore_index: int = -100,
) -> torch.Tensor:
    """``(D,)`` the offline acceptance rate of each depth on held-out text, without decoding.

    Depth ``k``'s draft at row ``i``, ``q^k_i``, is verified against the target's distribution at
    position ``i + k``, ``p_{i+k}`` (both at ``temperature``, or with ``greedy`` the one-hot
    argmax: the rate is then how often the two argmaxes agree); its expected acceptance is
    ``Σ_x min(p, q) = 1 − TVD`` (:func:`darkknowledge.speculative.acceptance_rate`), averaged over
    the rows that count at depth ``k`` (``labels`` shifted, as in the loss). Sequential modules
    read the text's tokens (teacher forcing): the draft's own tokens are the text's whenever
    depth ``k`` is reached with the earlier drafts accepted. The logits are made ``chunk_size``
    rows at a time.
    """
    inner = as_mtp_student(student)
    check_sampling(temperature, greedy, None)
    sampler = Sampler(float(temperature), greedy)
    layer = inner.output_layer()
    output = student(input_ids=input_ids, attention_mask=attention_mask)
    length = output.hidden.shape[1]
    rates = []
    for depth, states in enumerate(output.depth_hidden, start=1):
        rows = max(length - depth, 0)
        valid = depth_labels(labels, depth, attention_mask, ignore_index) != ignore_index
        draft = states[:, :rows][valid]  # (N, H) rows that count
        target = output.hidden[:, depth:][valid]  # (N, H) the target at i + depth
        total = torch.zeros((), dtype=torch.float64, device=draft.device)
        for start in range(0, draft.shape[0], chunk_size):
            chunk = slice(start, start + chunk_size)
            q = sampler.probs(logits_from_hidden(draft[chunk], layer))
            p = sampler.probs(logits_from_hidden(target[chunk], layer))
            total += acceptance_rate(p, q, reduction="sum").double()
        rates.append(total / max(draft.shape[0], 1))
    return torch.stack(rates).float()


def expected_tokens_per_call(depth_rates: Sequence[float] | torch.Tensor) -> float:
    """Tokens per target call when depth ``k`` is accepted with probability ``a_k`` given that
    the earlier depths were: ``1 + a_1 + a_1 a_2 + ... + a_1 ⋯ a_D``.

    >>> round(expected_tokens_per_call([0.8, 0.5]), 6)           # 1 + 0.8 + 0.8 · 0.5
    2.2
    """
    return chained_tokens_per_call(depth_rates)
