"""The speculative demo's table and plot (:mod:`darkknowledge.llm.speculative_demo`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .._files import save_figure
from .report_table import aligned_rows

LABELS = {
    "data": "(a) draft, data alone",
    "tvd": "(b) draft, distilled: TVD",
    "forward_kl": "(b) draft, distilled: forward KL",
    "reverse_kl": "(b) draft, distilled: reverse KL",
    "jsd": "(b) draft, distilled: JSD",
    "on_policy_tvd": "(b) draft, distilled on-policy: TVD",
    "on_policy_forward_kl": "(b) draft, distilled on-policy: forward KL",
    "on_policy_reverse_kl": "(b) draft, distilled on-policy: reverse KL",
    "on_policy_jsd": "(b) draft, distilled on-policy: JSD",
    "mtp_labels": "(c) MTP heads, labels alone",
    "mtp_distilled": "(c) MTP heads, distilled",
}


SHORT = {
    "data": "(a) data", "tvd": "(b) TVD", "forward_kl": "(b) forward KL",
    "reverse_kl": "(b) reverse KL", "jsd": "(b) JSD", "on_policy_tvd": "(b) on-policy TVD",
    "on_policy_forward_kl": "(b) on-policy FKL", "on_policy_reverse_kl": "(b) on-policy RKL",
    "on_policy_jsd": "(b) on-policy JSD", "mtp_labels": "(c) MTP, labels",
    "mtp_distilled": "(c) MTP, distilled",
}  # fmt: skip


def label(name: str) -> str:
    return LABELS.get(name, name)


def format_tables(report: dict[str, Any]) -> str:
    """One row per draft: acceptance offline and in decoding, tokens per target call, the
    cost ratio, the measured speed-up and the predicted ones; then the setting."""
    header = (
        "draft", "params", "α offline", "α decoding", "tok/call", "c", "v",
        "speed-up", "predicted", "predicted with v",
    )  # fmt: skip
    rows = [header]
    for name, row in report["rows"].items():
        rows.append(
            (
                label(name),
                f"{row['parameters']:,}",
                f"{row['alpha_offline_samples']:.3f}",
                f"{row['acceptance_rate']:.3f}",
                f"{row['tokens_per_target_call']:.2f}",
                f"{row['cost_ratio']:.3f}",
                f"{row['verification_cost']:.2f}",
                f"{row['speedup']:.2f}",
                f"{row['predicted_speedup_offline']:.2f}",
                f"{row['predicted_speedup_offline_with_verification']:.2f}",
            )
        )
    lines = aligned_rows(rows)
    recipe = report["recipe"]
    mode = "greedy" if recipe["greedy"] else f"sampling at T = {recipe['temperature']:g}"
    loads = [row.get("load_average") for row in report["rows"].values()]
    loads = [value for pair in loads if pair for value in pair]
    load = f"; 1-min load average {min(loads):.2f}-{max(loads):.2f}" if loads else ""
    lines.append(
        "α offline: on the sampled tokens of held-out target samples, without decoding (MTP: "
        "the mean of the depths); "
        "c: draft step / plain step; v: verification round outside the draft / plain step; "
        "predicted: expected_speedup(α offline, gamma, c) (MTP: per-depth rates); with v: v in "
        "place of its 1"
    )
    lines.append(
        f"gamma {recipe['gamma']} (MTP: min(gamma, {recipe['mtp_depths']} depths)), {mode}, "
        f"{recipe['prompts']} held-out prompts of {recipe['prompt_length']} bytes + "
        f"{recipe['max_new_tokens']} new, median of {recipe['repeats']} repeats, "
        f"{report['threads']} threads{load}"
    )
    return "\n".join(lines)


def plot_report(report: dict[str, Any], path: Path) -> None:
    """Acceptance (offline, decoding) and speed-up (measured, predicted) per draft."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["rows"])
    rows = [report["rows"][n] for n in names]
    positions = list(range(len(names)))
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    width = 0.38
    left.bar([p - width / 2 for p in positions], [r["alpha_offline_samples"] for r in rows],
             width, label="offline (held-out target samples)")  # fmt: skip
    left.bar([p + width / 2 for p in positions], [_finite(r["acceptance_rate"]) for r in rows],
             width, label="in decoding")  # fmt: skip
    left.set_ylabel("acceptance rate")
    left.set_ylim(0, 1)
    width = 0.27
    bars = (
        ("speedup", "measured"),
        ("predicted_speedup_offline", "predicted (α offline, c)"),
        ("predicted_speedup_offline_with_verification", "predicted with v"),
    )
    for offset, (key, text) in zip((-width, 0.0, width), bars):
        right.bar([p + offset for p in positions], [r[key] for r in rows], width, label=text)
    right.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    right.set_ylabel("speed-up over plain decoding")
    for axes in (left, right):
        axes.set_xticks(positions)
        axes.set_xticklabels([SHORT.get(n, n) for n in names], rotation=30, ha="right", fontsize=8)
        axes.legend(fontsize=8)
    figure.suptitle("dk demo speculative: the llm demo's teacher as the target")
    figure.tight_layout()
    save_figure(figure, path, format="png", dpi=120)
    plt.close(figure)


def _finite(value: float) -> float:
    return 0.0 if value is None or math.isnan(value) else value
