"""The config sections: every field declared once, with its default, its check and its doc.

``docs/cli.md`` is generated from these declarations (:func:`darkknowledge.config.reference`),
so the reference and the code cannot drift apart.
"""

# field_() wraps dataclasses.field(), which ruff does not recognise as a field specifier.
# ruff: noqa: RUF009

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from ..llm.models import BUILTIN_LLM_MODELS
from ..losses._checks import DIVERGENCES
from ..models import BUILTIN_MODELS
from .decoding import MTPConfig, SpeculateConfig
from .fields import (
    INVALID,
    boolean,
    builtin_or_reference,
    choice,
    either,
    field_,
    freeze,
    integer,
    mapping,
    number,
    optional,
    section,
    sections,
    text,
    tuple_of,
)
from .on_policy import OnPolicyConfig

EMPTY: Mapping[str, Any] = MappingProxyType({})
OPTIMIZERS = ("adamw", "adam", "sgd")
TASKS = ("classification", "causal_lm")
BUILTIN_DATA = ("digits", "stdlib_bytes")
PRECISIONS = ("no", "fp16", "bf16")


def schedule_or_number(
    *, above: float | None = None, at_least: float | None = None, at_most: float | None = None
):
    """A float, or a schedule mapping such as ``{kind: cosine, start: 8, end: 2, steps: 1000}``.

    The mapping is built once with :func:`darkknowledge.schedules.from_config` to check it, and
    its value at step 0 and at ``steps`` must respect the same bounds as a plain float.
    """
    plain = number(above=above, at_least=at_least, at_most=at_most)

    def convert(value, path, errors):
        if not isinstance(value, Mapping):
            return plain(value, path, errors)
        from .. import schedules

        try:
            schedule = schedules.from_config(dict(value))
        except (ValueError, TypeError, KeyError) as error:
            message = error.args[0] if error.args else error
            errors.append(f"{path}: bad schedule {dict(value)!r}: {message}")
            return INVALID
        # Check the start and the end (a schedule holds its end value afterwards).
        ends = [value.get(key) for key in ("steps", "total_steps", "warmup_steps")]
        for step in sorted({0, *(n for n in ends if isinstance(n, int) and n > 0)}):
            if plain(schedule(step), f"{path} (at step {step})", errors) is INVALID:
                return INVALID
        return freeze(value)

    return convert


@dataclass(frozen=True)
class ModelConfig:
    name: str = field_(
        "mlp",
        builtin_or_reference(*BUILTIN_MODELS, *BUILTIN_LLM_MODELS),
        'a built-in model ("mlp", "cnn", "linear"; "hf_causal_lm" for task causal_lm) or '
        '"package.module:callable" returning an nn.Module',
    )
    hidden: tuple[int, ...] = field_(
        (), tuple_of(integer(at_least=1)), "layer widths of an mlp, or conv channels of a cnn"
    )
    dropout: float = field_(
        0.0, number(at_least=0, at_most=0.99), "dropout after each hidden layer (built-ins)"
    )
    args: Mapping[str, Any] = field_(
        EMPTY,
        mapping,
        "keyword arguments for a package.module:callable model; for hf_causal_lm, the Hugging "
        "Face config: model_type and its fields (e.g. {model_type: gpt2, n_layer: 2, n_embd: 64}; "
        "vocab_size from the data when absent)",
    )
    checkpoint: str | None = field_(
        None,
        optional(text),
        "safetensors weights to load into the model; for hf_causal_lm also a folder (a "
        "save_pretrained folder, used as is when args has no model_type; a dk export or "
        "checkpoint folder). Local paths only, nothing is downloaded",
    )


@dataclass(frozen=True)
class TeacherConfig(ModelConfig):
    train_steps: int = field_(
        0,
        integer(at_least=0),
        "without a checkpoint: train the teacher from labels for this many steps first (0: use as is)",
    )
    dtype: str | None = field_(
        None,
        optional(choice("float32", "bfloat16", "float16")),
        "dtype the teacher runs in while it teaches, every teacher of a chain (null: as built)",
    )
    cache: str | None = field_(
        None,
        optional(text),
        "causal_lm: a teacher cache folder (docs/cache.md): dk cache-teacher writes the teacher's "
        "sparse targets there (settings: the cache section), then dk distill trains the student "
        "from it without the teacher model",
    )


@dataclass(frozen=True)
class DataConfig:
    name: str = field_(
        "digits",
        builtin_or_reference(*BUILTIN_DATA),
        'a built-in data set ("digits"; "stdlib_bytes" for task causal_lm: the Python standard '
        'library\'s source as bytes, offline) or "package.module:callable" returning (train, eval) '
        "datasets (causal_lm: of token-id examples {input_ids, and optionally prompt_lengths, "
        "completion_mask, labels, attention_mask}, padded by PaddingCollator)",
    )
    args: Mapping[str, Any] = field_(
        EMPTY, mapping, "keyword arguments for a package.module:callable data set"
    )
    batch_size: int = field_(64, integer(at_least=1), "training micro-batch size")
    eval_batch_size: int = field_(512, integer(at_least=1), "evaluation batch size")
    test_fraction: float = field_(
        0.25, number(above=0, at_most=0.9), "digits: held-out share (stratified)"
    )
    split_seed: int = field_(
        0, integer(at_least=0), "digits: seed of the train/test split (fixed across runs)"
    )
    labelled_fraction: float = field_(
        1.0,
        number(above=0, at_most=1),
        "digits: share of the training split whose labels the student sees (stratified, drawn with "
        "split_seed); dk distill gives soft targets on all of it, dk train only the labelled part",
    )
    block_size: int = field_(
        64, integer(at_least=2), "stdlib_bytes: tokens (bytes) per training and eval window"
    )
    prompt_length: int = field_(
        0,
        integer(at_least=0),
        "stdlib_bytes: the first N bytes of a training window are its prompt and the rest its "
        "completion, the only tokens the loss counts (0: no prompt, every token counts); needed "
        "by distill.on_policy. Eval windows count every token",
    )
    train_bytes: int = field_(
        2_000_000,
        integer(at_least=1),
        "stdlib_bytes: bytes of training text (files in sorted order)",
    )
    heldout_bytes: int = field_(
        32_768,
        integer(at_least=1),
        "stdlib_bytes: bytes of eval text, from every tenth file (files the models never see)",
    )
    vocab_size: int | None = field_(
        None,
        optional(integer(at_least=1)),
        "causal_lm: vocabulary size for hf_causal_lm models whose args give none (null: 256 for "
        "stdlib_bytes; user data must set it, or each model's args.vocab_size)",
    )
    pad_token_id: int = field_(
        0, integer(at_least=0), "causal_lm user data: the id written at padding (masked out)"
    )


@dataclass(frozen=True)
class LearnableTemperatureConfig:
    initial: float = field_(
        4.0, number(above=0), "starting temperature, inside (minimum, minimum + t_range)"
    )
    minimum: float = field_(1.0, number(above=0), "lowest temperature")
    t_range: float = field_(
        19.0, number(above=0), "width of the allowed range: T in (minimum, minimum + t_range)"
    )
    lambda_max: float = field_(1.0, number(at_least=0), "final gradient-reversal strength")
    curriculum_steps: int = field_(
        1000, integer(at_least=1), "steps over which the reversal strength ramps up"
    )
    per_sample: bool = field_(
        False, boolean, "one temperature per sample (a small network) instead of one global"
    )
    hidden: int = field_(64, integer(at_least=1), "hidden width of the per-sample network")


@dataclass(frozen=True)
class DistillConfig:
    temperature: float | Mapping[str, Any] = field_(
        4.0, schedule_or_number(above=0), "softmax temperature T > 0: a float or a schedule mapping"
    )
    alpha: float | Mapping[str, Any] = field_(
        0.9,
        schedule_or_number(at_least=0, at_most=1),
        "weight of the soft term in [0, 1]: a float or a schedule",
    )
    divergence: str = field_(
        "forward_kl", choice(*DIVERGENCES), f"D(p, q): {', '.join(DIVERGENCES)}"
    )
    soft_scale: str | float = field_(
        "T2",
        either(choice("T2", "none"), number(above=0), expected='"T2", "none" or a number > 0'),
        'factor on the soft term: "T2" (Hinton), "none", or a number',
    )
    beta: float = field_(
        0.5, number(at_least=0, at_most=1), "jsd mixture weight (0: forward KL, 1: reverse KL)"
    )
    lam: float = field_(
        0.1, number(at_least=0, at_most=0.999), "skew of skew_kl / skew_reverse_kl, in [0, 1)"
    )
    standardize: bool = field_(
        False, boolean, "z-score the logits before the temperature (Sun et al., 2024)"
    )
    dkd_weights: tuple[float, float] | None = field_(
        None,
        optional(tuple_of(number(at_least=0), length=2)),
        "[tckd, nckd] weights: decoupled KD instead",
    )
    learnable_temperature: LearnableTemperatureConfig | None = field_(
        None,
        section(LearnableTemperatureConfig, optional=True),
        "learn T adversarially (CTKD) instead of a fixed temperature; omit `temperature` then",
    )
    unlabelled: str = field_(
        "skip",
        choice("skip", "distill"),
        'examples labelled -100: "skip" them, or "distill" on them: soft targets on every '
        "example, the hard term on the labelled ones, means over all (the transfer-set regime)",
    )
    on_policy: OnPolicyConfig | None = field_(
        None,
        section(OnPolicyConfig, optional=True),
        "causal_lm: on-policy and mixed distillation (GKD): the student learns on its own "
        "samples, scored by the teacher; no cross-entropy on them (docs/on-policy.md)",
    )
    tail: str = field_(
        "bucket",
        choice("bucket", "none"),
        "training from a top-k teacher.cache: the mass outside the k ids is one more category "
        '("bucket") or dropped, both sides renormalised ("none"; biased)',
    )


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int = field_(1000, integer(at_least=1), "optimizer steps")
    optimizer: str = field_("adamw", choice(*OPTIMIZERS), f"one of {', '.join(OPTIMIZERS)}")
    learning_rate: float | Mapping[str, Any] = field_(
        1e-3,
        schedule_or_number(at_least=0),
        "a float >= 0 or a schedule mapping (0 at a warm-up's start is fine)",
    )
    weight_decay: float = field_(0.0, number(at_least=0), "decoupled weight decay")
    grad_accum_steps: int = field_(1, integer(at_least=1), "micro-batches per optimizer step")
    max_grad_norm: float | None = field_(
        None, optional(number(above=0)), "clip the gradient norm (null: no clip)"
    )
    mixed_precision: str = field_("no", choice(*PRECISIONS), f"one of {', '.join(PRECISIONS)}")
    on_nonfinite: str = field_(
        "stop",
        choice("stop", "skip"),
        'a step whose loss or gradients hold NaN or Inf: "stop" the run (no checkpoint after '
        'it) or "skip" the step (no update; counted as nonfinite_steps in the log)',
    )
    eval_every: int = field_(0, integer(at_least=0), "evaluate every N steps (0: only at the end)")
    save_every: int = field_(
        0, integer(at_least=0), "checkpoint every N steps (0: only at the end)"
    )
    keep_last: int | None = field_(
        None, optional(integer(at_least=1)), "keep the newest N checkpoints of a stage (null: all)"
    )
    log_every: int = field_(10, integer(at_least=1), "log every N steps (JSONL, TensorBoard)")
    progress: bool = field_(True, boolean, "show a progress bar")
    seed: int = field_(0, integer(at_least=0), "random seed")
    output_dir: str | None = field_(
        None, optional(text), "where logs and checkpoints go (null: none written)"
    )


@dataclass(frozen=True)
class CacheConfig:
    representation: str = field_(
        "sampled",
        choice("topk", "sampled"),
        "what dk cache-teacher stores per position: sampled draws (an unbiased gradient at "
        "T = 1; 12 draws are 48 bytes a token with 16-bit ids) or the top k (any "
        "distill.temperature; biased at small k)",
    )
    k: int | None = field_(
        None, optional(integer(at_least=1)), "topk: ids kept per position (null: 32)"
    )
    num_samples: int | None = field_(
        None, optional(integer(at_least=1)), "sampled: draws per position (null: 12)"
    )
    temperature: float = field_(
        1.0, number(above=0), "capture temperature (training from the cache needs 1)"
    )
    values_dtype: str = field_("float16", choice("float16", "bfloat16"), "dtype of stored values")
    shard_size: int = field_(512, integer(at_least=1), "sequences per shard file")
    batch_size: int = field_(64, integer(at_least=1), "sequences per teacher call")
    seed: int = field_(0, integer(at_least=0), "sampled: seed of the draws")


@dataclass(frozen=True)
class Config:
    task: str = field_(
        "classification",
        choice(*TASKS),
        'what the models do: "classification" (inputs -> class logits) or "causal_lm" (token ids '
        "-> next-token logits; Hugging Face causal LMs, the fused loss, see docs/llm.md)",
    )
    student: ModelConfig | None = field_(
        None, section(ModelConfig, optional=True), "the student model (omit when `stages` is given)"
    )
    teacher: TeacherConfig | None = field_(
        None, section(TeacherConfig, optional=True), "the teacher model (needed by dk distill)"
    )
    stages: tuple[ModelConfig, ...] = field_(
        (),
        sections(ModelConfig),
        "teacher-assistant chain: models trained in turn, each the next one's teacher; the last is the student",
    )
    data: DataConfig = field_(DataConfig(), section(DataConfig), "the data set")
    distill: DistillConfig = field_(
        DistillConfig(), section(DistillConfig), "the distillation objective"
    )
    train: TrainConfig = field_(TrainConfig(), section(TrainConfig), "the optimisation")
    cache: CacheConfig = field_(
        CacheConfig(), section(CacheConfig), "dk cache-teacher: how teacher.cache is captured"
    )
    mtp: MTPConfig | None = field_(
        None,
        section(MTPConfig, optional=True),
        "causal_lm: multi-token-prediction heads on the student, trained with it (docs/mtp.md)",
    )
    speculate: SpeculateConfig = field_(
        SpeculateConfig(),
        section(SpeculateConfig),
        "dk speculate: speculative decoding of the teacher with the student as draft (with mtp: "
        "the student with its own heads), measured (docs/speculative.md)",
    )

    @property
    def students(self) -> tuple[ModelConfig, ...]:
        """The models trained in turn: the stages, or the one student."""
        return self.stages if self.stages else ((self.student,) if self.student is not None else ())
