"""Exact speculative sampling: the accept/reject step (Leviathan et al., 2023; Chen et al., 2023).

Given draft tokens ``x_1..x_gamma`` sampled from the draft's distributions ``q_1..q_gamma`` and
the target's distributions ``p_1..p_{gamma+1}`` at the same positions (one target call):

1. accept ``x_i`` with probability ``min(1, p_i(x_i) / q_i(x_i))``, in order;
2. at the first rejection, emit one token from ``norm(max(0, p_i − q_i))`` and stop;
3. if all ``gamma`` are accepted, emit one more from ``p_{gamma+1}``.

Each emitted token is then distributed exactly as ``p`` at its position: the accepted part
contributes ``q(x)·min(1, p(x)/q(x)) = min(p(x), q(x))``, the residual part contributes
``(1 − Σ min(p, q)) · max(0, p(x) − q(x)) / Σ max(0, p − q) = p(x) − min(p(x), q(x))``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..losses import _checks
from .acceptance import check_probabilities


@dataclass(frozen=True)
class Sampler:
    """How logits become a distribution and a token: the one place of temperature and greedy.

    ``probs(logits)`` is ``softmax(logits / temperature)`` in float32, or with ``greedy`` the
    one-hot of the argmax (then verification accepts a draft token exactly when it is the
    target's argmax, and the output is the target's greedy decoding). ``sample(probs)`` draws
    from it with ``generator``. Drafters get a ``Sampler`` so that their ``q`` and the target's
    ``p`` use the same settings.

    >>> sampler = Sampler(greedy=True)
    >>> sampler.probs(torch.tensor([0.1, 2.0, -1.0]))
    tensor([0., 1., 0.])
    >>> int(sampler.sample(sampler.probs(torch.tensor([0.1, 2.0, -1.0]))))
    1
    """

    temperature: float = 1.0
    greedy: bool = False
    generator: torch.Generator | None = None

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """``(..., V)`` logits to ``(..., V)`` float32 probabilities."""
        if self.greedy:
            top = logits.argmax(-1)
            return torch.nn.functional.one_hot(top, logits.shape[-1]).to(torch.float32)
        return torch.softmax(logits.float() / self.temperature, dim=-1)

    def sample(self, probs: torch.Tensor) -> torch.Tensor:
        """One token per row: ``(V,) -> ()`` or ``(N, V) -> (N,)``, long, on ``probs``' device."""
        if self.greedy:
            return probs.argmax(-1)
        return sample_from(probs, self.generator)


def sample_from(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """``torch.multinomial`` on the generator's device: ``(V,) -> ()`` or ``(N, V) -> (N,)``."""
    device = probs.device
    if generator is not None and generator.device != device:
        probs = probs.to(generator.device)
    if probs.dim() == 1:
        return torch.multinomial(probs, 1, generator=generator)[0].to(device)
    rows = probs.reshape(-1, probs.shape[-1])
    tokens = torch.multinomial(rows, 1, generator=generator).reshape(probs.shape[:-1])
    return tokens.to(device)


def verify(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor,
    target_probs: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, int]:
    """Accept a prefix of the draft and emit one more token; the result follows the target exactly.

    Args:
        draft_tokens: ``(gamma,)`` integer, the draft tokens, ``x_i ~ q_i``.
        draft_probs: ``(gamma, V)``, ``q_i``: the distributions they were drawn from.
        target_probs: ``(gamma + 1, V)``, ``p_i``: the target's distributions at the same
            positions (row i is the target's next-token distribution before ``x_i``), and one more.
        generator: the random source (a ``torch.Generator``), on any device.

    Returns ``(tokens, num_accepted)``: ``tokens`` ``(num_accepted + 1,)`` long, on
    ``target_probs``' device: the accepted draft tokens then the residual (or bonus) token.

    Edge cases: a draft token with ``q(x) = 0`` (it cannot have been drawn from ``q``, but
    rounding happens) is accepted if ``p(x) > 0`` (the ratio is infinite) and rejected if
    ``p(x) = 0``; a residual that rounds to all zeros (``p`` equal to ``q`` within float
    precision) is replaced by ``p``. ``gamma = 0`` samples one token from ``target_probs[0]``.

    >>> p = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    >>> q = torch.tensor([[0.0, 1.0, 0.0]])
    >>> verify(torch.tensor([1]), q, p)   # p(x) = q(x): accepted; the bonus comes from p[1]
    (tensor([1, 2]), 1)
    >>> verify(torch.tensor([0]), torch.tensor([[1.0, 0.0, 0.0]]), p)  # p(x) = 0: rejected
    (tensor([1]), 0)
    """
    _check_verify_inputs(draft_tokens, draft_probs, target_probs, generator)
    return verify_unchecked(draft_tokens, draft_probs, target_probs, generator)


def verify_unchecked(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor,
    target_probs: torch.Tensor,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, int]:
    """:func:`verify` without the input checks (the decoding loop checks shapes itself)."""
    device = target_probs.device
    gamma = draft_tokens.shape[0]
    draft_probs = draft_probs.to(device)
    draft_tokens = draft_tokens.to(device)
    num_accepted = gamma
    if gamma:
        rows = torch.arange(gamma, device=device)
        # float64 for the few numbers compared and subtracted, not for whole rows.
        p_draft = target_probs[rows, draft_tokens].to(torch.float64)  # (gamma,)
        q_draft = draft_probs[rows, draft_tokens].to(torch.float64)
        device_of_generator = generator.device if generator is not None else device
        uniform = torch.rand(
            gamma, generator=generator, dtype=torch.float64, device=device_of_generator
        )
        # u < p/q without dividing: q = 0 < p accepts (ratio +inf), q = p = 0 rejects.
        accepted = (uniform.to(device) * q_draft < p_draft).tolist()  # one host sync
        num_accepted = accepted.index(False) if False in accepted else gamma
    if num_accepted < gamma:
        p_row = target_probs[num_accepted].to(torch.float64)
        residual = (p_row - draft_probs[num_accepted].to(torch.float64)).clamp_min(0.0)
        # All zero only if p = q up to rounding, where no rejection should have happened.
        final_probs = residual if float(residual.sum()) > 0 else p_row
    else:
        final_probs = target_probs[gamma]
    final = sample_from(final_probs, generator).reshape(1)
    return torch.cat([draft_tokens[:num_accepted].to(torch.long), final]), num_accepted


def _check_verify_inputs(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor,
    target_probs: torch.Tensor,
    generator: torch.Generator | None,
) -> None:
    if not isinstance(draft_tokens, torch.Tensor):
        raise TypeError(f"draft_tokens must be a torch.Tensor, got {type(draft_tokens).__name__}")
    if (
        draft_tokens.is_floating_point()
        or draft_tokens.dtype == torch.bool
        or draft_tokens.is_complex()
    ):
        raise TypeError(
            f"draft_tokens must be an integer tensor of token ids, got dtype {draft_tokens.dtype}"
        )
    if draft_tokens.dim() != 1:
        raise ValueError(f"draft_tokens must have shape (gamma,), got {tuple(draft_tokens.shape)}")
    check_probabilities(draft_probs, "draft_probs")
    check_probabilities(target_probs, "target_probs")
    gamma = draft_tokens.shape[0]
    if target_probs.dim() != 2 or target_probs.shape[0] != gamma + 1:
        raise ValueError(
            f"target_probs must have shape (gamma + 1, V) = ({gamma + 1}, V) for {gamma} draft "
            f"tokens, got {tuple(target_probs.shape)}"
        )
    vocab = target_probs.shape[1]
    if tuple(draft_probs.shape) != (gamma, vocab):
        raise ValueError(
            f"draft_probs must have shape (gamma, V) = ({gamma}, {vocab}), got {tuple(draft_probs.shape)}"
        )
    for name, value in (("draft_tokens", draft_tokens), ("draft_probs", draft_probs)):
        if value.device != target_probs.device:
            raise ValueError(
                f"{name} is on {value.device} but target_probs on {target_probs.device}; move them together"
            )
    if gamma and bool(((draft_tokens < 0) | (draft_tokens >= vocab)).any()):
        raise ValueError(f"draft_tokens must be in [0, {vocab}), got {draft_tokens.tolist()}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator or None, got {type(generator).__name__}"
        )


def check_sampling(temperature: float, greedy: bool, generator: torch.Generator | None) -> None:
    """The arguments of a :class:`Sampler`, checked with errors that name them."""
    _checks.check_temperature(temperature)
    if not isinstance(greedy, bool):
        raise TypeError(f"greedy must be a bool, got {type(greedy).__name__} {greedy!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator or None, got {type(generator).__name__}"
        )
