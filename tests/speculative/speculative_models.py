"""Tiny random GPT-2 language models (from configs, nothing downloaded) and naive decoders that
use no KV cache: the references of the speculative decoding tests."""

from __future__ import annotations

import copy

import torch
import transformers

from darkknowledge.speculative import verify

transformers.logging.set_verbosity_error()


def tiny_lm(seed: int, *, n_layer: int = 2, n_embd: int = 32, vocab_size: int = 24):
    """A GPT-2 in eval mode without dropout. initializer_range 0.2 (GPT-2 uses 0.02) makes the
    random model's greedy continuations vary instead of repeating one token."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=vocab_size,
        n_positions=64,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=2,
        initializer_range=0.2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config).eval()


def tiny_llama(seed: int, *, num_hidden_layers: int = 2, hidden_size: int = 32):
    """A Llama (rotary positions, grouped-query attention) with the same vocabulary as tiny_lm."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=24,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        initializer_range=0.2,
    )
    return transformers.LlamaForCausalLM(config).eval()


def perturbed(model, scale: float, seed: int):
    """A copy of ``model`` with every weight matrix moved by ``scale`` times its own spread:
    a draft that agrees with the target often, but not always."""
    copy_ = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in copy_.parameters():
            if parameter.dim() > 1:
                parameter.add_(
                    scale * parameter.std() * torch.randn(parameter.shape, generator=generator)
                )
    return copy_


@torch.no_grad()
def next_token_logits(model, sequence: torch.Tensor) -> torch.Tensor:
    """The logits after ``sequence`` ``(1, L)`` from a full forward pass, no cache: ``(V,)``."""
    return model(sequence, use_cache=False).logits[0, -1]


def naive_greedy(model, prompt: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    sequence = prompt
    for _ in range(max_new_tokens):
        token = next_token_logits(model, sequence).argmax()
        sequence = torch.cat([sequence, token.reshape(1, 1)], 1)
    return sequence


def naive_speculative(target, draft, prompt, *, max_new_tokens, gamma, temperature, generator):
    """Speculative sampling without any cache: every distribution comes from a full forward pass
    of the whole sequence. It draws random numbers in the same order as generate (k draft tokens,
    then verify), so with the same generator the two agree token for token iff generate's cached
    distributions equal these."""
    sequence, new = prompt, 0
    while new < max_new_tokens:
        count = min(gamma, max_new_tokens - new - 1)
        drafted, draft_rows = sequence, []
        for _ in range(count):
            row = (next_token_logits(draft, drafted) / temperature).softmax(-1)
            token = torch.multinomial(row, 1, generator=generator)
            drafted = torch.cat([drafted, token.reshape(1, 1)], 1)
            draft_rows.append(row)
        draft_tokens = drafted[0, sequence.shape[1] :]
        with torch.no_grad():
            logits = target(drafted, use_cache=False).logits[0, sequence.shape[1] - 1 :]
        target_rows = (logits / temperature).softmax(-1)
        draft_probs = (
            torch.stack(draft_rows) if draft_rows else torch.zeros(0, target_rows.shape[1])
        )
        tokens, _ = verify(draft_tokens, draft_probs, target_rows, generator=generator)
        sequence = torch.cat([sequence, tokens.reshape(1, -1)], 1)
        new += tokens.shape[0]
    return sequence
