"""On-policy and mixed distillation (GKD: Agarwal et al., ICLR 2024) as a Distiller task.

Each optimizer step flips one coin: with probability ``fraction`` (GKD's λ) the step's
completions are sampled from the student itself, from the dataset's prompts; otherwise the
dataset's completions are used as they are, which is exactly :class:`CausalLMTask`. The teacher
scores the sampled sequences in one forward pass and the loss counts completion tokens only:

- ``objective="divergence"``: the configured divergence (forward KL, reverse KL, JSD, ...) per
  completion token through the fused chunked loss, at the loss temperature T;
- ``objective="sampled_reverse_kl"``: the per-token estimate of reverse KL from the student's
  own sample, which needs only the teacher's log-probability of each sampled token
  (:func:`darkknowledge.llm.sampled_kl.sampled_reverse_kl_loss`); on the dataset's steps the
  exact reverse KL of the fused loss (there is no sample of the student to estimate from).

No cross-entropy on the student's own text: on a sampled step the loss is
``alpha · soft_scale · D`` alone (the hard term is 0, not renormalised away), on a dataset step
the usual ``(1 − alpha)·CE + alpha·soft_scale·D`` on the dataset's completion tokens.

The coin and the samples are functions of ``(seed, step)`` and of each row's prompt, never of the
global RNG: a resumed run draws the same, ``fraction=0`` is bitwise the off-policy task (nothing
is drawn, dropout sees the same RNG), and several processes and accumulation micro-batches agree
on the coin of their step.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..losses import KDLoss
from ..losses.engine.call import resolve_soft_scale
from .generation import Completions, GenerateSampler, Sampler, takes_vocab_size
from .heads import output_layer
from .sampled_kl import sampled_reverse_kl_loss, token_logprobs
from .task import CausalLMTask, StudentPass, TeacherOutputs, _to
from .vocab import shared_vocab_size

OBJECTIVES = ("divergence", "sampled_reverse_kl")
SAMPLED = "sampled_by_student"  # the key that marks a batch whose completions the student wrote
STUDENT_ROWS = "student_vocab_rows"  # beside it: the rows of the output layer sampled from


class OnPolicyTask(CausalLMTask):
    """:class:`CausalLMTask` whose completions are, with probability ``fraction`` per step, the
    student's own samples (see the module docstring).

    Args:
        fraction: λ, the probability that a step's completions are sampled (0: off-policy
            distillation, 1: fully on-policy).
        sampler: a :class:`~darkknowledge.llm.generation.Sampler` (default: Hugging Face
            ``generate`` at sampling temperature 1, full distribution).
        objective: ``"divergence"`` or ``"sampled_reverse_kl"``.
        max_new_tokens: tokens sampled per prompt (None: as many as the row's completion in
            the data has, so a sampled batch has the data's shape; only the lengths are read).
        seed: the coin's and the samples' seed (the Distiller's ``seed`` is a good choice).
        chunk_size, ignore_index, vocab_size: as :class:`CausalLMTask`.

    Batches must say where prompts end: ``prompt_lengths`` ``(B,)`` or ``completion_mask``.
    The student samples only ids that the loss keeps: when its output layer is larger (a
    student padded beyond the teacher's vocabulary, or ``vocab_size`` below its size) the
    sampler is asked for the first ``V`` ids alone, ``V`` the vocabulary both models share
    (:meth:`bind` learns it from the teacher; a larger teacher is cut as in
    :class:`CausalLMTask`).
    """

    needs_teacher = True

    def __init__(
        self,
        *,
        fraction: float = 1.0,
        sampler: Sampler | None = None,
        objective: str = "divergence",
        max_new_tokens: int | None = None,
        seed: int = 0,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        if isinstance(fraction, bool) or not isinstance(fraction, int | float):
            raise TypeError(f"fraction must be a float in [0, 1], got fraction={fraction!r}")
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fraction must be in [0, 1], got fraction={fraction!r}")
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
        if max_new_tokens is not None and (
            isinstance(max_new_tokens, bool)
            or not isinstance(max_new_tokens, int)
            or max_new_tokens < 1
        ):
            raise ValueError(f"max_new_tokens must be an int >= 1 or None, got {max_new_tokens!r}")
        sampler = GenerateSampler() if sampler is None else sampler
        if not isinstance(sampler, Sampler):
            raise TypeError(f"sampler must be a callable Sampler, got {type(sampler).__name__}")
        self.fraction, self.sampler, self.objective = float(fraction), sampler, objective
        self.max_new_tokens, self.seed = max_new_tokens, int(seed)
        self._shared_vocab: int | None = None  # learnt by bind(): the ids the student may write

    def bind(self, student: nn.Module, teacher: nn.Module | None) -> None:
        """Learn the vocabulary that the student may sample from: the one it shares with the
        teacher (:func:`~darkknowledge.llm.vocab.shared_vocab_size`, a ValueError for two
        tokenizers). Called by the Distiller before the first step."""
        if teacher is not None:
            self._shared_vocab = self.shared_vocab(output_layer(student), output_layer(teacher))

    # -- the step's batches ------------------------------------------------------------------
    def on_policy(self, step: int) -> bool:
        """The coin of optimizer step ``step``: True with probability ``fraction``."""
        if self.fraction in (0.0, 1.0):
            return self.fraction == 1.0
        return _unit_hash("coin", self.seed, step) < self.fraction

    @torch.no_grad()
    def prepare_batch(self, student: nn.Module, batch: Any, *, step: int) -> Any:
        """The batch as given, or (on an on-policy step) its prompts completed by ``student``:
        ``{"input_ids", "attention_mask", "completion_mask"}``, right-padded. Called by the
        Distiller before it counts the step's valid tokens."""
        if not self.on_policy(step):
            return batch
        prompt_ids, prompt_mask, lengths = split_prompts(batch)
        seeds = row_seeds(prompt_ids, prompt_mask, seed=self.seed, step=step)
        count = self.max_new_tokens or max(int(lengths.max()), 1)
        rows = output_layer(student).weight.shape[0]
        limit = self._sample_limit(rows)
        cut = {} if limit is None else {"vocab_size": limit}
        completions = self.sampler(
            student, prompt_ids, prompt_mask, max_new_tokens=count, seeds=seeds, **cut
        )
        if limit is not None:
            check_below(completions, limit, self.sampler)
        if self.max_new_tokens is None:  # each row as long as its completion in the data
            kept = torch.arange(count, device=lengths.device) < lengths.unsqueeze(-1)  # (B, M)
            completions = completions._replace(
                mask=completions.mask & kept.to(completions.mask.device)
            )
        # The ids the student could write: the teacher checks that it reads them all.
        written = rows if limit is None else limit
        return {**sampled_batch(prompt_ids, prompt_mask, completions), STUDENT_ROWS: written}

    def _sample_limit(self, rows: int) -> int | None:
        """How many of the student's ``rows`` ids it may sample: None for all of them."""
        shared = self._shared_vocab if self._shared_vocab is not None else self.vocab_size
        if shared is None or shared >= rows:
            return None
        if not takes_vocab_size(self.sampler):
            raise ValueError(
                f"the student's output layer has {rows} rows but the vocabulary the loss keeps "
                f"is {shared} ids, and the sampler {type(self.sampler).__name__} takes no "
                "vocab_size keyword to sample below it: add one (see Sampler), or give the "
                f"student {shared} rows (resize_token_embeddings)"
            )
        return shared

    # -- the loss --------------------------------------------------------------------------
    def teacher_outputs(self, teacher: nn.Module, batch: Any) -> TeacherOutputs:
        """As :class:`CausalLMTask`; a sampled batch is first checked to hold only token ids
        that the teacher reads and the loss keeps (see :func:`check_sampled_vocabulary`)."""
        if isinstance(batch, Mapping) and batch.get(SAMPLED) and STUDENT_ROWS in batch:
            check_sampled_vocabulary(
                batch[STUDENT_ROWS], output_layer(teacher).weight.shape[0], self.vocab_size
            )
        return super().teacher_outputs(teacher, batch)

    def distillation_loss(
        self,
        student: StudentPass,
        teacher_outputs: TeacherOutputs,
        *,
        loss_fn: Any,
        step: int,
        normalizer: Any,
    ) -> tuple[KDLoss, float | torch.Tensor]:
        """:class:`CausalLMTask`'s loss on the dataset's completions; on sampled ones the soft
        term alone (the divergence, or the sampled reverse KL)."""
        self._check_objective(loss_fn)
        if not (isinstance(student.batch, Mapping) and student.batch.get(SAMPLED)):
            return super().distillation_loss(
                student, teacher_outputs, loss_fn=loss_fn, step=step, normalizer=normalizer
            )
        _, hidden, layer, labels = student
        options = self._loss_options(loss_fn, step)
        alpha, temperature = options.pop("alpha"), options["temperature"]
        if self.objective == "divergence":
            # alpha = 1 leaves the soft term alone; alpha then weighs it as on a dataset step.
            loss = self.fused_kd(
                hidden, layer, teacher_outputs, labels, normalizer, {**options, "alpha": 1.0}
            )
            total = alpha * loss.total
        else:
            if isinstance(temperature, torch.Tensor):
                raise ValueError("objective='sampled_reverse_kl' needs a float temperature")
            teacher_layer = teacher_outputs.layer
            vocab = self.shared_vocab(layer, teacher_layer)
            teacher_logprobs = token_logprobs(
                teacher_outputs.hidden.to(hidden.device), teacher_layer.weight.to(hidden.device),
                labels, bias=_to(teacher_layer.bias, hidden.device), temperature=temperature,
                logit_scale=teacher_layer.logit_scale, softcap=teacher_layer.softcap,
                vocab_size=vocab, ignore_index=self.ignore_index, chunk_size=self.chunk_size,
            )  # fmt: skip
            soft_weight = float(resolve_soft_scale(options.get("soft_scale", "T2"), temperature))
            loss = sampled_reverse_kl_loss(
                hidden, layer.weight, labels, teacher_logprobs, bias=layer.bias,
                temperature=temperature, soft_weight=alpha * soft_weight, normalizer=normalizer,
                logit_scale=layer.logit_scale, softcap=layer.softcap, vocab_size=vocab,
                ignore_index=self.ignore_index, chunk_size=self.chunk_size,
            )  # fmt: skip
            total = loss.total
        # No cross-entropy on the student's own text.
        return KDLoss(total, loss.soft, torch.zeros_like(loss.soft)), temperature

    def _check_objective(self, loss_fn: Any) -> None:
        divergence = loss_fn.kd_options.get("divergence", "forward_kl")
        if self.objective == "sampled_reverse_kl" and divergence != "reverse_kl":
            raise ValueError(
                "objective='sampled_reverse_kl' estimates reverse KL on sampled steps and uses the "
                f"exact reverse KL on the dataset's steps: set divergence='reverse_kl', got {divergence!r}"
            )


def check_sampled_vocabulary(
    student_rows: int, teacher_rows: int, vocab_size: int | None = None
) -> None:
    """Refuse a sampled batch whose ids may reach past the vocabulary that the loss keeps
    (``vocab_size``, or what :func:`~darkknowledge.llm.vocab.shared_vocab_size` cuts both
    layers to): ``student_rows`` is how many ids the student sampled from. That happens only
    when :meth:`OnPolicyTask.bind` never saw the teacher (``prepare_batch`` called by hand).

    >>> check_sampled_vocabulary(250, 256)  # a padded teacher is cut to the student's 250
    >>> check_sampled_vocabulary(256, 250)
    Traceback (most recent call last):
    ...
    ValueError: the student sampled from 256 ids, but the teacher's output layer has 250 rows ...
    """
    shared = shared_vocab_size(student_rows, teacher_rows, vocab_size=vocab_size)
    if shared is not None and shared < student_rows:
        raise ValueError(
            f"the student sampled from {student_rows} ids, but the teacher's output layer has "
            f"{teacher_rows} rows and the loss keeps the first {shared} ids: a sampled id >= "
            f"{shared} has no teacher probability. Train through dk.Distiller (it calls "
            f"task.bind(student, teacher), which cuts the sampling to {shared} ids), or pass "
            f"vocab_size={shared} to OnPolicyTask"
        )


def check_below(completions: Completions, limit: int, sampler: Any) -> None:
    """A sampler asked for ids below ``limit`` that wrote one at or above it: refused, naming it
    (one host sync, after generation has synchronised anyway)."""
    written = completions.ids[completions.mask.bool()]
    if written.numel() and int(written.max()) >= limit:
        raise ValueError(
            f"the sampler {type(sampler).__name__} was given vocab_size={limit} but wrote id "
            f"{int(written.max())}: a sampler must draw ids below its vocab_size"
        )


def split_prompts(batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded prompts ``(B, P)`` of a batch, their mask, and each row's number of
    completion tokens ``(B,)``.

    A row's prompt is its first ``prompt_lengths[b]`` real tokens, or its real tokens before the
    first ``completion_mask`` one. The completions' tokens are never read (only their number).
    """
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        raise TypeError("on-policy distillation needs dict batches with input_ids and prompts")
    ids = batch["input_ids"]
    real = batch.get("attention_mask")
    real = torch.ones_like(ids, dtype=torch.bool) if real is None else real.bool()
    if batch.get("prompt_lengths") is not None:
        in_prompt = real & (real.cumsum(-1) <= batch["prompt_lengths"].to(ids.device).unsqueeze(-1))
    elif batch.get("completion_mask") is not None:
        started = (batch["completion_mask"].bool() & real).cumsum(-1) > 0
        in_prompt = real & ~started
    else:
        raise ValueError(
            "on-policy distillation needs prompts: give batches prompt_lengths (B,) or "
            "completion_mask (B, T) (data.prompt_length for stdlib_bytes)"
        )
    lengths = in_prompt.sum(-1)  # (B,)
    if bool((lengths == 0).any()):
        raise ValueError(
            "every row needs a prompt of at least one token to sample a completion from"
        )
    width = int(lengths.max())
    prompt_ids = ids.new_zeros(ids.shape[0], width)
    prompt_mask = torch.zeros_like(prompt_ids)
    for row in range(ids.shape[0]):
        tokens = ids[row][in_prompt[row]]  # this row's prompt, in order
        prompt_ids[row, width - tokens.numel() :] = tokens  # left-padded, for generation
        prompt_mask[row, width - tokens.numel() :] = 1
    return prompt_ids, prompt_mask, real.sum(-1) - lengths


def sampled_batch(
    prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completions: Completions
) -> dict[str, Any]:
    """Prompt + completion per row, starting at position 0 and right-padded: the positions the
    tokens had during generation (transformers counts them from the first real token). A
    completion is its first ``mask.sum()`` tokens (the mask is True up to the row's end)."""
    device = completions.ids.device
    lengths = prompt_mask.sum(-1).tolist()  # (B,)
    kept = completions.mask.sum(-1).tolist()
    rows, width = len(lengths), max(p + k for p, k in zip(lengths, kept))
    ids = completions.ids.new_zeros(rows, width)
    attention = torch.zeros(rows, width, dtype=torch.long, device=device)
    completion = torch.zeros(rows, width, dtype=torch.bool, device=device)
    for row, (prompt, count) in enumerate(zip(lengths, kept)):
        ids[row, :prompt] = prompt_ids[row, prompt_ids.shape[1] - prompt :].to(device)
        ids[row, prompt : prompt + count] = completions.ids[row, :count]
        attention[row, : prompt + count] = 1
        completion[row, prompt : prompt + count] = True
    return {
        "input_ids": ids,
        "attention_mask": attention,
        "completion_mask": completion,
        SAMPLED: True,
    }


def row_seeds(
    prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *, seed: int, step: int
) -> torch.Tensor:
    """``(B,)`` int64 seeds from ``(seed, step, the row's prompt, which repeat of that prompt
    in the batch it is)``: the same row draws the same completion wherever it sits (another
    process, micro-batch or position), and a resumed run draws it again."""
    seen: Counter = Counter()
    seeds = []
    for ids, mask in zip(prompt_ids.tolist(), prompt_mask.tolist()):
        prompt = tuple(token for token, keep in zip(ids, mask) if keep)
        seeds.append(int(_unit_hash("row", seed, step, prompt, seen[prompt]) * 2**62))
        seen[prompt] += 1
    return torch.tensor(seeds, dtype=torch.long)


def _unit_hash(*key: Any) -> float:
    """A number in [0, 1) from ``repr(key)`` (BLAKE2b): the same in every process and run."""
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64
