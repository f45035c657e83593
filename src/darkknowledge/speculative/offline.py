"""The acceptance rate of a draft model on held-out text, without decoding (teacher forcing).

At every position ``t`` of held-out text both models read the same prefix ``x_{<=t}``; with
``p_t`` the target's and ``q_t`` the draft's next-token distribution (after the temperature
decoding will use, or the one-hot argmax for greedy decoding), a draft token there would be
accepted with probability

    alpha_t = Σ_x min(p_t(x), q_t(x)) = 1 − TVD(p_t, q_t)

(:func:`~darkknowledge.speculative.acceptance_rate`), and the offline acceptance rate is its
mean over the positions that predict a token. It predicts the per-token acceptance of
:func:`~darkknowledge.speculative.generate` in so far as decoding visits text like the held-out
text: sampled continuations of the target itself are what speculative decoding sees.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

import torch
from torch import nn

from ..llm.heads import last_hidden_states, logits_from_hidden, output_layer
from ..losses._checks import check_count
from .acceptance import acceptance_rate
from .drafter import fit_vocabulary
from .verify import Sampler, check_sampling


class OfflineAcceptance(NamedTuple):
    """``rate``: the mean of ``Σ min(p, q)`` over ``positions`` predicted tokens."""

    rate: float
    positions: int


@torch.no_grad()
def offline_acceptance_rate(
    target: nn.Module,
    draft: nn.Module,
    batches: Iterable[Any],
    *,
    temperature: float = 1.0,
    greedy: bool = False,
    chunk_size: int = 256,
    ignore_index: int = -100,
) -> OfflineAcceptance:
    """The expected acceptance of ``draft``'s tokens by ``target`` over held-out text.

    Args:
        target, draft: Hugging Face causal LMs sharing a tokenizer (a draft with a wider output
            layer has its extra logits cut, a narrower one gives the missing tokens probability
            0, as in decoding).
        batches: causal-LM batches as :class:`~darkknowledge.llm.CausalLMTask` reads them: dicts
            with ``input_ids`` ``(B, T)`` and optionally ``attention_mask``, ``labels``,
            ``prompt_lengths`` or ``completion_mask``, or bare ``input_ids`` tensors. A position
            counts when its shifted label does (padding and prompts do not).
        temperature, greedy: the decoding settings (:class:`~darkknowledge.speculative.Sampler`);
            greedy makes ``alpha_t`` 1 where the two argmaxes agree and 0 elsewhere.
        chunk_size: positions whose ``(chunk, V)`` logits are held at once.

    Returns :class:`OfflineAcceptance` ``(rate, positions)``.

    >>> import torch, transformers
    >>> transformers.logging.set_verbosity_error()
    >>> config = transformers.GPT2Config(vocab_size=16, n_positions=16, n_embd=8, n_layer=1, n_head=2)
    >>> model = transformers.GPT2LMHeadModel(config).eval()
    >>> offline_acceptance_rate(model, model, [torch.randint(16, (2, 9))])   # a draft equal to its target
    OfflineAcceptance(rate=1.0, positions=16)
    """
    from ..llm.task import CausalLMTask

    check_sampling(temperature, greedy, None)
    check_count(chunk_size, "chunk_size", "a positive int")
    sampler = Sampler(float(temperature), greedy)
    reader = CausalLMTask(ignore_index=ignore_index)
    target_layer, draft_layer = output_layer(target), output_layer(draft)
    vocab = target_layer.weight.shape[0]
    total = torch.zeros((), dtype=torch.float64)
    positions = 0
    for batch in batches:
        inputs = reader.inputs(batch)
        keep = inputs["labels"] != ignore_index  # (B, T): positions that predict a token
        target_rows = _hidden(target, inputs)[keep.to(_device(target))]  # (N, H_target)
        draft_rows = _hidden(draft, inputs)[keep.to(_device(draft))]  # (N, H_draft)
        for start in range(0, target_rows.shape[0], chunk_size):
            chunk = slice(start, start + chunk_size)
            p = sampler.probs(logits_from_hidden(target_rows[chunk], target_layer))  # (n, V)
            draft_logits = fit_vocabulary(logits_from_hidden(draft_rows[chunk], draft_layer), vocab)
            q = sampler.probs(draft_logits).to(p.device)
            total += acceptance_rate(p, q, reduction="sum").double().cpu()
        positions += int(keep.sum())
    if positions == 0:
        raise ValueError("the batches hold no position that predicts a token (all masked)")
    return OfflineAcceptance(float(total) / positions, positions)


def _hidden(model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    device = _device(model)
    mask = inputs["attention_mask"]
    return last_hidden_states(
        model, inputs["input_ids"].to(device), None if mask is None else mask.to(device)
    )


def _device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")
