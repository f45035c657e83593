"""Multi-token-prediction heads over a causal LM's last hidden states, in two forms.

Both map the trunk's final hidden states ``h`` ``(B, T, H)`` (the output layer's input, after
the model's final norm) to one ``(B, T, H)`` state per depth ``k = 1..D``. Depth ``k``'s row
``i`` predicts token ``i + k + 1`` through the model's own output layer (depth 0 is the model's
next-token prediction); rows with ``i + k + 1 >= T`` have nothing to predict.

- :class:`ParallelMTPHeads` (Gloeckle et al., 2024): independent heads on the shared trunk,
  ``s^k_i = f_k(h_i)``.
- :class:`SequentialMTPModules` (DeepSeek-V3): depth ``k`` combines the previous depth's state
  with the embedding of token ``i + k``,
  ``s^k_i = f_k(P_k [norm(s^{k-1}_i); norm(E(t_{i+k}))])``, ``s^0 = h``, where ``P_k`` is a
  ``(H + E) -> H`` projection and ``E`` the model's own input embedding.

``f_k`` is a pre-norm residual MLP, ``x + W_down gelu(W_up norm(x))``, position-wise: where
DeepSeek-V3 puts a transformer block, this keeps a depth's row ``i`` a function of row ``i``
alone, so that drafting needs the last position only and no KV cache of the heads' own.
``W_down`` starts at zero, so a fresh parallel head starts as the model's next-token head.
The heads own no copy of the embedding or the output layer: they are given at each call.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .._files import atomic_path
from ..losses._checks import check_count

# The safetensors metadata key that holds a saved set of heads' spec (JSON).
SPEC_KEY = "darkknowledge.mtp"
KINDS = ("parallel", "sequential")
NORMS = ("layer", "rms")


def _norm(kind: str, size: int, eps: float) -> nn.Module:
    return nn.LayerNorm(size, eps=eps) if kind == "layer" else nn.RMSNorm(size, eps=eps)


def norm_of(config: Any) -> tuple[str, float]:
    """``("rms", eps)`` for a model whose config has ``rms_norm_eps`` (Llama, Qwen, Gemma...),
    else ``("layer", eps)`` (GPT-2's ``layer_norm_epsilon``, ``layer_norm_eps``, or 1e-5)."""
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    if getattr(config, "rms_norm_eps", None) is not None:
        return "rms", float(config.rms_norm_eps)
    for name in ("layer_norm_epsilon", "layer_norm_eps", "norm_eps"):
        if getattr(config, name, None) is not None:
            return "layer", float(getattr(config, name))
    return "layer", 1e-5


class ResidualMLP(nn.Module):
    """``x + W_down · gelu(W_up · norm(x))``, ``(..., H) -> (..., H)``; the identity at first."""

    def __init__(self, size: int, intermediate_size: int, norm: str, eps: float) -> None:
        super().__init__()
        self.norm = _norm(norm, size, eps)
        self.up = nn.Linear(size, intermediate_size)
        self.down = nn.Linear(intermediate_size, size)
        # Zero-initialised output: the block starts as the identity and learns a correction.
        nn.init.zeros_(self.down.weight)
        nn.init.zeros_(self.down.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.down(nn.functional.gelu(self.up(self.norm(hidden))))


class MTPModule(nn.Module):
    """One DeepSeek-V3 depth: ``ResidualMLP(P [norm(s^{k-1}); norm(e)])``, ``(..., H), (..., E)
    -> (..., H)``. ``P`` starts as ``[I | 0]``: at first the state carries the previous depth's
    (normalised) and learns how much of the next token to take in."""

    def __init__(
        self, hidden_size: int, embedding_size: int, intermediate_size: int, norm: str, eps: float
    ) -> None:
        super().__init__()
        self.hidden_norm = _norm(norm, hidden_size, eps)
        self.embedding_norm = _norm(norm, embedding_size, eps)
        self.projection = nn.Linear(hidden_size + embedding_size, hidden_size, bias=False)
        with torch.no_grad():
            self.projection.weight.zero_()
            self.projection.weight[:, :hidden_size].copy_(torch.eye(hidden_size))
        self.block = ResidualMLP(hidden_size, intermediate_size, norm, eps)

    def forward(self, previous: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        joined = torch.cat([self.hidden_norm(previous), self.embedding_norm(embedding)], dim=-1)
        return self.block(self.projection(joined))  # (..., H + E) -> (..., H)


# choose(state (n, H)) -> tokens (n,): the drafter's pick from a depth's state.
Chooser = Callable[[torch.Tensor], torch.Tensor]


class MTPHeads(nn.Module):
    """What both forms share: checks, one layer per depth, the depth loop, the spec they are
    saved with.

    Subclasses set ``kind``, ``needs_embeddings`` and implement :meth:`new_layer` (built once per
    depth, as ``self.layers``) and :meth:`step`.
    """

    kind: str = ""
    needs_embeddings: bool = False

    def __init__(
        self,
        hidden_size: int,
        num_depths: int,
        *,
        intermediate_size: int | None = None,
        norm: str = "layer",
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        check_count(hidden_size, "hidden_size")
        check_count(num_depths, "num_depths")
        intermediate_size = 4 * hidden_size if intermediate_size is None else intermediate_size
        check_count(intermediate_size, "intermediate_size")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        if isinstance(eps, bool) or not isinstance(eps, int | float) or not 0 < eps < 1:
            raise ValueError(f"eps must be a float in (0, 1), got {eps!r}")
        self.hidden_size, self.num_depths = hidden_size, num_depths
        self.intermediate_size, self.norm, self.eps = intermediate_size, norm, float(eps)
        self.layers = nn.ModuleList(self.new_layer() for _ in range(num_depths))

    def new_layer(self) -> nn.Module:
        """One depth's module, freshly initialised (called ``num_depths`` times)."""
        raise NotImplementedError

    def spec(self) -> dict[str, Any]:
        """The constructor arguments, JSON-able: ``heads_from_spec(heads.spec())`` rebuilds it."""
        return {
            "kind": self.kind,
            "hidden_size": self.hidden_size,
            "num_depths": self.num_depths,
            "intermediate_size": self.intermediate_size,
            "norm": self.norm,
            "eps": self.eps,
        }

    def step(
        self,
        depth: int,
        trunk: torch.Tensor,
        previous: torch.Tensor,
        embedding: torch.Tensor | None,
    ) -> torch.Tensor:
        """Depth ``depth``'s state ``(..., H)`` from the trunk's, the previous depth's and the
        embedding of the token ``depth`` positions ahead (``(..., E)``, or None if unused)."""
        raise NotImplementedError

    def forward(
        self,
        trunk_hidden: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        embeddings: nn.Module | None = None,
    ) -> list[torch.Tensor]:
        """``num_depths`` states ``(B, T, H)``; depth ``k`` (entry ``k − 1``) row ``i`` predicts
        token ``i + k + 1``.

        Args:
            trunk_hidden: ``(B, T, H)`` the model's last hidden states (the output layer's input).
            input_ids: ``(B, T)`` the tokens; needed by the sequential form only.
            embeddings: the model's input embedding (``model.get_input_embeddings()``); needed
                by the sequential form only.
        """
        if not isinstance(trunk_hidden, torch.Tensor) or trunk_hidden.dim() != 3:
            got = (
                tuple(trunk_hidden.shape)
                if isinstance(trunk_hidden, torch.Tensor)
                else type(trunk_hidden).__name__
            )
            raise ValueError(f"trunk_hidden must be a (B, T, H) tensor, got {got}")
        if trunk_hidden.shape[-1] != self.hidden_size:
            raise ValueError(
                f"trunk_hidden has hidden size {trunk_hidden.shape[-1]}, these heads "
                f"{self.hidden_size}"
            )
        token_embeddings = self._embed(input_ids, embeddings, trunk_hidden.shape[:2])
        states, previous = [], trunk_hidden
        for depth in range(1, self.num_depths + 1):
            ahead = None if token_embeddings is None else _shift_left(token_embeddings, depth)
            previous = self.step(depth, trunk_hidden, previous, ahead)
            states.append(previous)
        return states

    def draft(
        self,
        trunk_row: torch.Tensor,
        next_tokens: torch.Tensor,
        embeddings: nn.Module | None,
        choose: Chooser,
        num_tokens: int,
    ) -> None:
        """Run depths ``1..min(num_tokens, D)`` on one position: ``trunk_row`` ``(n, H)`` is the
        trunk's state at ``i``, ``next_tokens`` ``(n,)`` token ``i + 1``. Each depth's state goes
        to ``choose``, which returns the token it drafted; the sequential form reads that token
        at the next depth (teacher forcing by the draft's own choices)."""
        previous, tokens = trunk_row, next_tokens
        for depth in range(1, min(num_tokens, self.num_depths) + 1):
            embedding = embeddings(tokens) if self.needs_embeddings else None
            previous = self.step(depth, trunk_row, previous, embedding)
            tokens = choose(previous)

    def _embed(
        self, input_ids: torch.Tensor | None, embeddings: nn.Module | None, shape: torch.Size
    ) -> torch.Tensor | None:
        if not self.needs_embeddings:
            return None
        if input_ids is None or embeddings is None:
            raise ValueError(
                f"{type(self).__name__} needs input_ids and the model's input embeddings "
                "(model.get_input_embeddings()): depth k reads the embedding of token i + k"
            )
        if not isinstance(input_ids, torch.Tensor) or input_ids.shape != shape:
            got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else input_ids
            raise ValueError(f"input_ids must have shape (B, T) = {tuple(shape)}, got {got}")
        return embeddings(input_ids)  # (B, T, E)


class ParallelMTPHeads(MTPHeads):
    """``D`` independent heads on the shared trunk (Gloeckle et al., 2024): ``s^k = f_k(h)``.

    >>> heads = ParallelMTPHeads(hidden_size=8, num_depths=2)
    >>> states = heads(torch.randn(3, 5, 8))
    >>> len(states), tuple(states[0].shape)
    (2, (3, 5, 8))
    """

    kind = "parallel"
    needs_embeddings = False

    def new_layer(self) -> nn.Module:
        return ResidualMLP(self.hidden_size, self.intermediate_size, self.norm, self.eps)

    def step(self, depth, trunk, previous, embedding):
        return self.layers[depth - 1](trunk)


class SequentialMTPModules(MTPHeads):
    """``D`` chained modules (DeepSeek-V3): depth ``k`` reads depth ``k − 1``'s state and the
    embedding of token ``i + k``.

    Args:
        embedding_size: width ``E`` of the model's input embedding (None: ``hidden_size``).

    >>> modules = SequentialMTPModules(hidden_size=8, num_depths=2)
    >>> embeddings = torch.nn.Embedding(20, 8)
    >>> states = modules(torch.randn(3, 5, 8), torch.randint(20, (3, 5)), embeddings)
    >>> len(states), tuple(states[1].shape)
    (2, (3, 5, 8))
    """

    kind = "sequential"
    needs_embeddings = True

    def __init__(
        self,
        hidden_size: int,
        num_depths: int,
        *,
        embedding_size: int | None = None,
        intermediate_size: int | None = None,
        norm: str = "layer",
        eps: float = 1e-5,
    ) -> None:
        if embedding_size is not None:  # the default, hidden_size, is checked by MTPHeads
            check_count(embedding_size, "embedding_size")
        # A plain int may be set before nn.Module.__init__; MTPHeads.__init__ builds the
        # layers, and new_layer reads it.
        self.embedding_size = hidden_size if embedding_size is None else embedding_size
        super().__init__(
            hidden_size, num_depths, intermediate_size=intermediate_size, norm=norm, eps=eps
        )

    def new_layer(self) -> nn.Module:
        return MTPModule(
            self.hidden_size, self.embedding_size, self.intermediate_size, self.norm, self.eps
        )

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "embedding_size": self.embedding_size}

    def step(self, depth, trunk, previous, embedding):
        return self.layers[depth - 1](previous, embedding)


def heads_for_model(
    model: nn.Module,
    kind: str,
    num_depths: int,
    *,
    intermediate_size: int | None = None,
) -> MTPHeads:
    """Heads of ``kind`` (``"parallel"`` or ``"sequential"``) sized for a Hugging Face causal LM.

    The hidden size is the output layer's input width, the embedding size the input
    embedding's width, the norm RMSNorm or LayerNorm as the model's config says
    (:func:`norm_of`); the heads get the output layer's dtype and device.
    """
    from ..llm.heads import output_layer, unwrap_model

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    weight = output_layer(model).weight  # (V, H)
    inner = unwrap_model(model)
    norm, eps = norm_of(inner.config)
    options = {"intermediate_size": intermediate_size, "norm": norm, "eps": eps}
    if kind == "parallel":
        heads: MTPHeads = ParallelMTPHeads(weight.shape[1], num_depths, **options)
    else:
        embedding_size = inner.get_input_embeddings().weight.shape[1]
        heads = SequentialMTPModules(
            weight.shape[1], num_depths, embedding_size=embedding_size, **options
        )
    return heads.to(device=weight.device, dtype=weight.dtype)


def heads_from_spec(spec: Mapping[str, Any]) -> MTPHeads:
    """Heads built from :meth:`MTPHeads.spec` (float32, CPU; load a state dict into them)."""
    if not isinstance(spec, Mapping) or spec.get("kind") not in KINDS:
        kind = spec.get("kind") if isinstance(spec, Mapping) else spec
        raise ValueError(f"an MTP heads spec needs kind in {KINDS}, got {kind!r}")
    options = {name: value for name, value in spec.items() if name != "kind"}
    cls = ParallelMTPHeads if spec["kind"] == "parallel" else SequentialMTPModules
    try:
        hidden_size, num_depths = options.pop("hidden_size"), options.pop("num_depths")
        return cls(hidden_size, num_depths, **options)
    except (KeyError, TypeError) as error:
        raise ValueError(f"invalid MTP heads spec {dict(spec)!r}: {error}") from None


def save_heads(heads: MTPHeads, path: str) -> None:
    """Write the heads' state dict to a safetensors file, with their spec in its metadata."""
    if not isinstance(heads, MTPHeads):
        raise TypeError(f"heads must be MTP heads, got {type(heads).__name__}")
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in heads.state_dict().items()}
    with atomic_path(path) as temporary:
        save_file(tensors, str(temporary), metadata={SPEC_KEY: json.dumps(heads.spec())})


def load_heads(
    path: str, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> MTPHeads:
    """Heads saved by :func:`save_heads`, rebuilt from their spec, on ``device`` in ``dtype``.
    Anything else (a missing file, a folder, a pickle, a damaged file, other tensors) is a
    ``FileNotFoundError`` or ``ValueError`` naming ``path``; nothing is ever unpickled."""
    if not os.path.isfile(path):
        kind = "is a folder, not a file" if os.path.isdir(path) else "does not exist"
        raise FileNotFoundError(f"MTP heads file {str(path)!r} {kind}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        if SPEC_KEY not in metadata:
            raise ValueError(f"{path} holds no MTP heads (no {SPEC_KEY!r} metadata)")
        try:
            spec = json.loads(metadata[SPEC_KEY])
        except json.JSONDecodeError:
            raise ValueError(f"{path} has unreadable MTP heads metadata ({SPEC_KEY!r})") from None
        heads = heads_from_spec(spec)
        heads.load_state_dict(load_file(str(path)))
    except ValueError:
        raise
    except Exception as error:  # SafetensorError, or load_state_dict's RuntimeError
        detail = str(error).strip().splitlines()
        raise ValueError(
            f"{path} is not an MTP heads file written by save_heads: "
            f"{detail[-1].strip() if detail else type(error).__name__}"
        ) from None
    return heads.to(device=device, dtype=dtype)


def _shift_left(values: torch.Tensor, offset: int) -> torch.Tensor:
    """``out[:, i] = values[:, i + offset]``, zeros where ``i + offset >= T`` (rows with nothing
    to predict at that depth): ``(B, T, E) -> (B, T, E)``."""
    length = values.shape[1]
    kept = values[:, offset:]
    filler = values.new_zeros(values.shape[0], min(offset, length), values.shape[2])
    return torch.cat([kept, filler], dim=1)
