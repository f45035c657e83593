"""The report of ``dk demo rlhf``: the table, the reward/KL plot, printable samples."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .._files import save_figure
from .report_table import aligned_rows


def sample_text(tokens: torch.Tensor) -> str:
    """Bytes as one printable line: newlines as ⏎, other control bytes and non-ASCII as ·.

    >>> sample_text(torch.tensor([100, 101, 102, 10, 32, 0, 200]))
    'def⏎ ··'
    """
    characters = []
    for byte in tokens.tolist():
        if byte == 10:
            characters.append("⏎")
        elif 32 <= byte < 127:
            characters.append(chr(byte))
        else:
            characters.append("·")
    return "".join(characters)


def format_table(report: dict[str, Any]) -> str:
    """One row per policy: KL coefficient, reward, KL to the reference, held-out bits per byte;
    then each policy's sample continuation of the same held-out prompt."""
    target = report["recipe"]["target"]
    header = ("policy", f"reward (share of {target!r})", "KL to ref (nats/byte)", "bits/byte")
    rows = [header]
    for name, policy in report["policies"].items():
        if name == "reference":
            rows.append(("reference (start)", "", "0", f"{policy['bits_per_byte']:.3f}"))
            continue
        rows.append(
            (
                f"kl coefficient {policy['kl_coefficient']:g}",
                f"{policy['final_reward']:.3f}",
                f"{policy['final_kl']:.3f}",
                f"{policy['bits_per_byte']:.3f}",
            )
        )
    lines = aligned_rows(rows)
    recipe = report["recipe"]
    lines.append(
        f"reward and KL: mean over the last tenth of {recipe['steps']} steps; "
        f"{recipe['prompts_per_step']} prompts x {recipe['group_size']} samples of "
        f"{recipe['completion_length']} bytes per step; total {report['total_seconds']:.0f} s "
        f"on {report['threads']} threads"
    )
    prompt = report["policies"]["reference"]["sample_prompt"]
    lines.append(f"samples after the held-out prompt {prompt!r}:")
    label_width = max(len(name) for name in report["policies"])
    for name, policy in report["policies"].items():
        lines.append(f"  {name.ljust(label_width)}  {policy['sample']!r}")
    return "\n".join(lines)


def plot_curves(report: dict[str, Any], path: Path) -> None:
    """Reward and exact KL to the reference over steps, one curve per KL coefficient."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (reward_axes, kl_axes) = plt.subplots(1, 2, figsize=(10, 4))
    for name, policy in report["policies"].items():
        if name == "reference":
            continue
        steps = [row["step"] for row in policy["history"]]
        label = f"KL coefficient {policy['kl_coefficient']:g}"
        reward_axes.plot(steps, [row["reward"] for row in policy["history"]], label=label)
        kl_axes.plot(steps, [row["kl"] for row in policy["history"]], label=label)
    target = report["recipe"]["target"]
    reward_axes.set_title(f"reward: share of {target!r} in the sampled bytes")
    reward_axes.set_xlabel("step")
    reward_axes.set_ylabel("mean reward")
    kl_axes.set_title("KL(policy ‖ reference), exact, per sampled byte")
    kl_axes.set_xlabel("step")
    kl_axes.set_ylabel("nats per byte")
    for axes in (reward_axes, kl_axes):
        axes.legend()
        axes.grid(alpha=0.3)
    figure.suptitle("dk demo rlhf: GRPO on the llm demo's byte-level GPT-2")
    figure.tight_layout()
    save_figure(figure, path, format="png", dpi=120)
    plt.close(figure)
