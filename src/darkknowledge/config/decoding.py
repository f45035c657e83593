"""The config sections of multi-token prediction and speculative decoding: ``mtp`` (heads on
the student, docs/mtp.md) and ``speculate`` (``dk speculate``, docs/speculative.md)."""

from __future__ import annotations

from dataclasses import dataclass

from .fields import boolean, choice, field_, integer, number, optional, text, tuple_of


@dataclass(frozen=True)
class MTPConfig:
    kind: str = field_(
        "sequential",
        choice("sequential", "parallel"),
        'the heads: "sequential" (DeepSeek-V3 modules, each reading the next token\'s embedding) '
        'or "parallel" (independent heads on the trunk, Gloeckle et al.)',
    )
    num_depths: int = field_(
        2, integer(at_least=1), "depths D: head k predicts the token k + 1 places ahead of the next"
    )
    depth_weights: tuple[float, ...] | None = field_(
        None,
        optional(tuple_of(number(at_least=0))),
        "w_k >= 0 of depths 1..D, one per depth (null: 1.0 each); DeepSeek-V3's lambda/D",
    )
    main_weight: float = field_(
        1.0, number(at_least=0), "weight of the model's own next-token loss (0 with freeze_model)"
    )
    intermediate_size: int | None = field_(
        None, optional(integer(at_least=1)), "width of each head's MLP (null: 4 x hidden size)"
    )
    freeze_model: bool = field_(
        False,
        boolean,
        "train the heads alone on the student model as loaded (no gradient, no dropout in it)",
    )


@dataclass(frozen=True)
class SpeculateConfig:
    draft_checkpoint: str | None = field_(
        None,
        optional(text),
        "the draft's weights (with mtp: the student's, heads included); null: "
        "<train.output_dir>/student, else <train.output_dir>/baseline",
    )
    target_checkpoint: str | None = field_(
        None,
        optional(text),
        "the target's weights (without mtp); null: teacher.checkpoint, else "
        "<train.output_dir>/teacher",
    )
    gamma: int = field_(4, integer(at_least=1), "draft tokens per target call (mtp: at most D)")
    max_new_tokens: int = field_(48, integer(at_least=1), "tokens decoded per prompt")
    prompts: int = field_(8, integer(at_least=1), "prompts: the first eval rows long enough")
    prompt_length: int = field_(16, integer(at_least=1), "tokens of each prompt")
    greedy: bool = field_(False, boolean, "decode the target's argmax instead of sampling")
    temperature: float = field_(1.0, number(above=0), "sampling temperature of both models")
    repeats: int = field_(3, integer(at_least=1), "timings are medians over this many repeats")
    seed: int = field_(0, integer(at_least=0), "prompt i is decoded with seed + i")
    threads: int = field_(1, integer(at_least=1), "torch CPU threads while decoding")
