"""Tiny random GPT-2 models from configs (nothing downloaded), shared by tests and the DDP worker."""

from __future__ import annotations

import torch
import transformers

transformers.logging.set_verbosity_error()


def tiny_gpt2(
    seed: int = 0, *, n_embd: int = 16, n_layer: int = 1, vocab_size: int = 40, tied: bool = True
):
    """A GPT-2 with dropout off, so two forward passes agree."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=vocab_size,
        n_positions=32,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=tied,
    )
    return transformers.GPT2LMHeadModel(config)
