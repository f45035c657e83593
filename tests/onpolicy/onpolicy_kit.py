"""Tiny random GPT-2 models and prompt/completion batches for the on-policy tests."""

from __future__ import annotations

import torch
import transformers

transformers.logging.set_verbosity_error()
VOCAB = 40


def tiny_gpt2(seed: int = 0, *, n_embd: int = 16, dropout: float = 0.0, positions: int = 32):
    """A GPT-2 from a config (nothing downloaded); ``dropout`` on every dropout layer."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=positions, n_embd=n_embd, n_layer=1, n_head=2,
        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


def prompt_batches(
    count: int, rows: int = 4, length: int = 12, seed: int = 0
) -> list[dict[str, torch.Tensor]]:
    """Batches of token windows whose first 3 to 5 tokens are the prompt."""
    generator = torch.Generator().manual_seed(seed)
    return [
        {
            "input_ids": torch.randint(1, VOCAB, (rows, length), generator=generator),
            "prompt_lengths": torch.randint(3, 6, (rows,), generator=generator),
        }
        for _ in range(count)
    ]


def parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}
