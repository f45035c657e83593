"""Next-token labels: the one place where causal-LM labels are shifted.

Convention (the same as Hugging Face's ``shift_labels``): labels keep the sequence length and
are **padded at the end** with ``ignore_index``. The hidden state at position ``t`` predicts
``labels[:, t] = input_ids[:, t + 1]``; the last position predicts nothing. Hidden states are
never trimmed, so ``hidden[:, t]`` and ``labels[:, t]`` always line up::

    input_ids   P0 P1 C0 C1 C2            (P = prompt token, C = completion token)
    labels      -- C0 C1 C2 --            (-- = ignore_index)

A target ``input_ids[:, t + 1]`` counts only if

- both ``t`` and ``t + 1`` are real tokens (``attention_mask`` is 1 at both): padding is never
  predicted and never predicts, with left or right padding;
- token ``t + 1`` is a completion token, when ``prompt_lengths`` or ``completion_mask`` is
  given: prompt tokens never count, and the first completion token *is* predicted, from the
  last prompt position;
- ``input_ids[:, t + 1] != ignore_index``, so Hugging Face-style unshifted ``labels`` (already
  holding ``ignore_index``) can be passed in place of ``input_ids``.
"""

from __future__ import annotations

import torch


def shift_labels(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    prompt_lengths: torch.Tensor | None = None,
    completion_mask: torch.Tensor | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Labels ``(B, T)`` aligned with hidden states ``(B, T, H)``: position t predicts token t+1.

    Args:
        input_ids: ``(B, T)`` token ids (or unshifted labels holding ``ignore_index``).
        attention_mask: ``(B, T)``, 1/True for real tokens, 0/False for padding (left or right).
        prompt_lengths: ``(B,)`` number of prompt tokens of each row, counted from the row's
            first real token (so it means the same with left padding). Prompt tokens are
            not predicted.
        completion_mask: ``(B, T)`` bool, True for the tokens to predict. Give this or
            ``prompt_lengths``, not both.
        ignore_index: the label of positions that do not count.

    Returns:
        ``(B, T)`` int64 labels; ``labels[:, -1]`` is always ``ignore_index``.

    >>> ids = torch.tensor([[0, 5, 6, 7, 8]])           # left-padded: one pad, 2 prompt tokens
    >>> shift_labels(ids, torch.tensor([[0, 1, 1, 1, 1]]), prompt_lengths=torch.tensor([2]))
    tensor([[-100, -100,    7,    8, -100]])
    """
    _check_ids(input_ids, "input_ids")
    if prompt_lengths is not None and completion_mask is not None:
        raise ValueError(
            "give prompt_lengths or completion_mask, not both (they say the same thing)"
        )
    shape = input_ids.shape
    real = _bool_like(attention_mask, shape, "attention_mask")
    keep = input_ids != ignore_index  # (B, T): may token t be a target?
    if real is not None:
        keep = keep & real
        # The predicting position must be real too: with left padding, the first real token
        # has only padding before it and is not predicted.
        keep[:, 1:] &= real[:, :-1]
    if completion_mask is not None:
        keep = keep & _bool_like(completion_mask, shape, "completion_mask")
    if prompt_lengths is not None:
        keep = keep & _completion_from_prompt_lengths(prompt_lengths, real, shape, input_ids.device)
    labels = torch.full(shape, ignore_index, dtype=torch.long, device=input_ids.device)
    labels[:, :-1] = torch.where(keep[:, 1:], input_ids[:, 1:].long(), ignore_index)
    return labels


def _completion_from_prompt_lengths(
    prompt_lengths: torch.Tensor,
    real: torch.Tensor | None,
    shape: torch.Size,
    device: torch.device,
) -> torch.Tensor:
    """``(B, T)`` bool: True at tokens whose index within the real sequence is >= the prompt length."""
    if not isinstance(prompt_lengths, torch.Tensor):
        prompt_lengths = torch.as_tensor(prompt_lengths)
    if prompt_lengths.shape != shape[:1] or prompt_lengths.dtype.is_floating_point:
        raise ValueError(
            f"prompt_lengths must be an integer tensor of shape (batch,) = {tuple(shape[:1])}, got "
            f"shape {tuple(prompt_lengths.shape)} and dtype {prompt_lengths.dtype}"
        )
    if bool((prompt_lengths < 0).any()):
        raise ValueError(f"prompt_lengths must be >= 0, got {prompt_lengths.tolist()}")
    # Index of each token within its row's real tokens: 0 at the first real token. On the
    # batch's device: the mask it joins lives there.
    if real is None:
        index = torch.arange(shape[1], device=device).expand(shape)
    else:
        index = real.long().cumsum(dim=1) - 1
    prompt_lengths = prompt_lengths.to(index.device)
    return index >= prompt_lengths.unsqueeze(1)


def _check_ids(input_ids: torch.Tensor, name: str) -> None:
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor of token ids, got {type(input_ids).__name__}"
        )
    if input_ids.dim() != 2 or input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise ValueError(
            f"{name} must be an integer tensor of shape (batch, seq_len), got shape "
            f"{tuple(input_ids.shape)} and dtype {input_ids.dtype}"
        )


def _bool_like(mask: torch.Tensor | None, shape: torch.Size, name: str) -> torch.Tensor | None:
    """A 0/1 or bool mask of ``shape`` as bool (a fresh tensor, safe to modify in place)."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.shape != shape:
        raise ValueError(
            f"{name} must have the shape of input_ids {tuple(shape)}, got {tuple(mask.shape)}"
        )
    return mask.bool().clone() if mask.dtype == torch.bool else mask != 0
