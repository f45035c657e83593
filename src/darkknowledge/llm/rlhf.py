"""``dk demo rlhf``: why an RLHF policy is held near its reference by a KL penalty.

The ``dk demo llm`` teacher (a byte-level GPT-2 trained on the Python standard library, loaded
from its cache) is both the starting policy and the frozen reference. A policy-gradient loop
with group-normalised advantages (GRPO, Shao et al. 2024) rewards the share of one byte
(default ``e``) in sampled continuations of training-text prompts:

    A_i = (R_i − mean_group R) / (std_group R + eps),      G samples per prompt
    loss = −mean_tokens(A · log π(y_t)) + beta · kl_penalty(log π(y_t), log π_ref(y_t))

with :func:`darkknowledge.rl.kl_penalty` (k3 value, unbiased gradient) as the KL term, once for
each ``beta`` in 0, 0.05, 0.2. One update per batch of samples, so the loop is exactly
on-policy (no ratio or clipping is needed). Samples come from the full distribution (no top-k,
no top-p). Dropout stays off throughout, so the policy that samples is the policy that learns.

Report: reward and the exact per-byte KL to the reference over steps (one PNG), each final
policy's held-out bits per byte (the llm demo's evaluation) and a sample of its text.
"""

from __future__ import annotations

import copy
import inspect
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .. import rl
from .._files import write_json
from . import demo as llm_demo
from .data import RandomWindows, sequential_windows, stdlib_corpus
from .rlhf_plots import plot_curves, sample_text


@dataclass(frozen=True)
class RLHFRecipe:
    """Sizes of one run. The teacher is the llm demo's (``teacher``), from its cache."""

    steps: int = 40
    prompts_per_step: int = 8
    group_size: int = 8
    prompt_length: int = 32
    completion_length: int = 32
    learning_rate: float = 1e-3
    kl_coefficients: tuple[float, ...] = (0.0, 0.05, 0.2)
    target: str = "e"
    estimator: str = "k3"
    advantage_eps: float = 1e-4
    max_grad_norm: float = 1.0
    seed: int = 0
    teacher: llm_demo.Recipe = field(default_factory=llm_demo.Recipe)


# The llm demo's tiny quick teacher; a large learning rate so that the reward moves in seconds.
QUICK = RLHFRecipe(
    steps=12, prompts_per_step=4, group_size=8, prompt_length=8, completion_length=16,
    learning_rate=1e-2, teacher=llm_demo.QUICK,
)  # fmt: skip


def run_rlhf_demo(
    recipe: RLHFRecipe,
    *,
    cache_dir: Path,
    output_dir: Path,
    log: Callable[[str], None] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Load (or train) the teacher, run the loop once per KL coefficient, write the report.

    ``log`` receives one line per stage (None: silent); ``progress`` shows a bar per loop.
    """
    say = log if log is not None else (lambda message: None)
    _check(recipe)
    started = time.perf_counter()
    teacher_recipe = recipe.teacher
    corpus = stdlib_corpus(
        train_bytes=teacher_recipe.train_bytes, heldout_bytes=teacher_recipe.heldout_bytes
    )
    eval_data = sequential_windows(
        corpus.heldout,
        block_size=teacher_recipe.block_size,
        batch_size=4 * teacher_recipe.batch_size,
    )
    reference, teacher_info = llm_demo.load_teacher(
        teacher_recipe, corpus.digest, cache_dir, say=say
    )
    say(f"reference = starting policy: the llm demo's teacher, from {teacher_info['cache_path']}")
    reference.eval().requires_grad_(False)
    # One held-out prompt for the text samples shown in the report.
    show_prompt = corpus.heldout[: recipe.prompt_length].long().unsqueeze(0)  # (1, P)
    policies: dict[str, Any] = {
        "reference": {
            **_evaluate_policy(reference, eval_data, show_prompt, recipe),
            "cache_path": teacher_info["cache_path"],
        }
    }
    say(
        f"reference: {policies['reference']['bits_per_byte']:.3f} held-out bits per byte; "
        f"{recipe.steps} steps per KL coefficient"
    )
    for beta in recipe.kl_coefficients:
        policy = copy.deepcopy(reference).requires_grad_(True)
        began = time.perf_counter()
        history = train_policy(policy, reference, corpus.train, recipe, beta, progress=progress)
        seconds = time.perf_counter() - began
        result = {
            "kl_coefficient": beta,
            "train_seconds": seconds,
            "history": history,
            "final_reward": _tail_mean(history, "reward"),
            "final_kl": _tail_mean(history, "kl"),
            **_evaluate_policy(policy, eval_data, show_prompt, recipe),
        }
        policies[f"kl={beta:g}"] = result
        say(
            f"kl coefficient {beta:g}: reward {result['final_reward']:.3f}, KL "
            f"{result['final_kl']:.3f} nats/byte, {result['bits_per_byte']:.3f} held-out bits "
            f"per byte ({seconds:.0f} s)"
        )
    report = {
        "recipe": asdict(recipe),
        "corpus_digest": corpus.digest,
        "threads": torch.get_num_threads(),
        "policies": policies,
        "total_seconds": time.perf_counter() - started,
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    write_json(output_dir / "results.json", report)
    plot_curves(report, output_dir / "reward_kl.png")
    return report


def train_policy(
    policy: torch.nn.Module,
    reference: torch.nn.Module,
    text: torch.Tensor,
    recipe: RLHFRecipe,
    beta: float,
    *,
    progress: bool = False,
) -> list[dict[str, float]]:
    """The GRPO-style loop; returns per step: mean reward, the exact KL to the reference per
    completion byte (from the full logits) and the k-estimator's value."""
    policy.eval()  # no dropout: the sampling policy and the trained policy are one
    optimizer = torch.optim.Adam(policy.parameters(), lr=recipe.learning_rate)
    prompts = RandomWindows(
        text,
        block_size=recipe.prompt_length,
        batch_size=recipe.prompts_per_step,
        num_batches=recipe.steps,
        seed=recipe.seed,
    )
    generator = torch.Generator().manual_seed(recipe.seed)  # same samples stream for every beta
    target = ord(recipe.target)
    groups, size = recipe.prompts_per_step, recipe.group_size
    history = []
    bar = tqdm(prompts, desc=f"kl coefficient {beta:g}", disable=not progress, leave=False)
    for step, batch in enumerate(bar):
        prompt = batch["input_ids"].repeat_interleave(size, 0)  # (B·G, P)
        completion = sample(policy, prompt, recipe.completion_length, generator)  # (B·G, L)
        sequences = torch.cat([prompt, completion], 1)  # (B·G, P + L)
        logits = _completion_logits(policy, sequences, recipe.prompt_length)  # (B·G, L, V)
        with torch.no_grad():
            ref_logits = _completion_logits(reference, sequences, recipe.prompt_length)
        logprobs = _gather(logits, completion)  # (B·G, L)
        ref_logprobs = _gather(ref_logits, completion)

        reward = (completion == target).float().mean(1).view(groups, size)  # (B, G)
        advantage = (reward - reward.mean(1, keepdim=True)) / (
            reward.std(1, keepdim=True) + recipe.advantage_eps
        )
        # Every token of a sample shares its advantage; the mean is over all completion tokens.
        policy_loss = -(advantage.reshape(-1, 1) * logprobs).mean()
        kl = rl.kl_penalty(logprobs, ref_logprobs, estimator=recipe.estimator)
        loss = policy_loss + beta * kl if beta else policy_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), recipe.max_grad_norm)
        optimizer.step()
        exact = rl.kl_penalty(
            None, None, estimator="full", policy_logits=logits.detach(), ref_logits=ref_logits
        )
        history.append(
            {
                "step": step,
                "reward": float(reward.mean()),
                "kl": float(exact),
                "kl_estimate": float(kl.detach()),
            }
        )
        bar.set_postfix(reward=f"{history[-1]['reward']:.2f}", kl=f"{history[-1]['kl']:.2f}")
    return history


@torch.no_grad()
def sample(
    model: torch.nn.Module, prompt: torch.Tensor, length: int, generator: torch.Generator
) -> torch.Tensor:
    """``length`` tokens after each ``(N, P)`` prompt, from the model's full distribution at
    temperature 1 (no top-k, no top-p), with the KV cache. Returns ``(N, length)``."""
    # transformers 5.x renamed `past_key_values` (argument and output field) to `cache`.
    keyword = (
        "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    )
    output = model(prompt, use_cache=True)
    tokens = []
    for position in range(length):
        probabilities = torch.softmax(output.logits[:, -1].float(), -1)  # (N, V)
        token = torch.multinomial(probabilities, 1, generator=generator)  # (N, 1)
        tokens.append(token)
        if position + 1 < length:
            output = model(token, use_cache=True, **{keyword: getattr(output, keyword)})
    return torch.cat(tokens, 1)


def _completion_logits(model, sequences: torch.Tensor, prompt_length: int) -> torch.Tensor:
    """Float32 logits at the positions that predict the completion: ``(N, L, V)``."""
    return model(sequences).logits[:, prompt_length - 1 : -1].float()


def _gather(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token] per position: ``(N, L, V), (N, L) -> (N, L)``."""
    return torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def _tail_mean(history: list[dict[str, float]], key: str) -> float:
    """The mean over the last tenth of the steps (at least one): less noisy than the last."""
    tail = history[-max(1, len(history) // 10) :]
    return sum(row[key] for row in tail) / len(tail)


def _evaluate_policy(model, eval_data, show_prompt, recipe: RLHFRecipe) -> dict[str, Any]:
    """The llm demo's held-out evaluation, and a sample continuation of one held-out prompt."""
    model.eval()
    generator = torch.Generator().manual_seed(recipe.seed + 1)
    continuation = sample(model, show_prompt, recipe.completion_length, generator)[0]
    return {
        **llm_demo.evaluate_heldout(model, eval_data),
        "sample_prompt": sample_text(show_prompt[0]),
        "sample": sample_text(continuation),
    }


def _check(recipe: RLHFRecipe) -> None:
    """Refuse bad settings before minutes of work, naming the flag."""
    for name in ("steps", "prompts_per_step", "prompt_length", "completion_length"):
        if getattr(recipe, name) < 1:
            raise ValueError(
                f"--{name.replace('_', '-')} must be >= 1, got {getattr(recipe, name)}"
            )
    if recipe.group_size < 2:
        raise ValueError(
            f"--group-size must be >= 2 (advantages are normalised within a group), got {recipe.group_size}"
        )
    if recipe.prompt_length + recipe.completion_length > recipe.teacher.block_size:
        raise ValueError(
            f"--prompt-length + --completion-length must fit the model's {recipe.teacher.block_size} "
            f"positions, got {recipe.prompt_length} + {recipe.completion_length}"
        )
    if len(recipe.target.encode()) != 1:
        raise ValueError(f"--target must be one ASCII character (one byte), got {recipe.target!r}")
    if not (recipe.learning_rate > 0 and math.isfinite(recipe.learning_rate)):
        raise ValueError(f"--learning-rate must be finite and > 0, got {recipe.learning_rate}")
    if any(not beta >= 0 for beta in recipe.kl_coefficients) or not recipe.kl_coefficients:
        raise ValueError(f"--kl-coefficients must be >= 0, got {list(recipe.kl_coefficients)}")
    if recipe.estimator not in rl.ESTIMATORS:
        raise ValueError(
            f"--estimator must be one of {', '.join(rl.ESTIMATORS)}, got {recipe.estimator!r}"
        )
