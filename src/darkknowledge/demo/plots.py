"""The demo's three figures: learning curves, the gradient balance, temperature over time.

Each takes the ``runs`` of :func:`darkknowledge.demo.classifier.run_classifier_demo` (per
method, one summary per seed) and writes a small PNG atomically.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from .._files import save_figure

COLORS = {"labels": "#7f7f7f", "kd": "#1f77b4", "kd_learnable_t": "#d62728"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path: str) -> str:
    figure.tight_layout()
    return str(save_figure(figure, path, dpi=90))


def _stack(series: list[dict[str, list]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """Steps and a ``(seeds, steps)`` array over the steps every seed has."""
    steps = sorted(set.intersection(*(set(s["step"]) for s in series))) if series else []
    values = np.array(
        [[dict(zip(s["step"], s[key]))[t] for t in steps] for s in series], dtype=float
    )
    return np.array(steps), values.reshape(len(series), len(steps))


def learning_curves(
    runs: dict[str, list[dict]], labels: dict[str, str], teacher_accuracy: float, path: str
) -> str:
    """Test accuracy against step, mean over seeds with the min-max band."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(5.6, 3.6))
    for method, summaries in runs.items():
        steps, values = _stack([s["curve"] for s in summaries], "accuracy")
        if not len(steps):
            continue
        axes.plot(steps, values.mean(0), color=COLORS.get(method), label=labels[method])
        axes.fill_between(
            steps, values.min(0), values.max(0), color=COLORS.get(method), alpha=0.2, linewidth=0
        )
    axes.axhline(teacher_accuracy, color="black", linestyle="--", linewidth=1, label="teacher")
    axes.set(
        xlabel="optimizer step",
        ylabel="test accuracy",
        title="Learning curves (mean, min-max over seeds)",
    )
    axes.legend(loc="lower right", fontsize=8)
    axes.grid(alpha=0.3)
    path = _save(figure, path)
    plt.close(figure)
    return path


def _rolling_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over up to ``window`` points along the last axis."""
    cumulative = np.cumsum(np.pad(values, [(0, 0)] * (values.ndim - 1) + [(1, 0)]), axis=-1)
    ends = np.arange(1, values.shape[-1] + 1)
    starts = np.maximum(ends - window, 0)
    return (cumulative[..., ends] - cumulative[..., starts]) / (ends - starts)


def gradient_balance(
    runs: dict[str, list[dict]], labels: dict[str, str], path: str, window: int = 10
) -> str:
    """Soft and hard gradient norms at the student logits (mean over seeds, trailing mean
    over ``window`` logged steps: a batch may hold no labelled example, its hard norm is 0).
    Reads results written before the rename too (their key was ``"signal"``)."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(5.6, 3.6))
    for method, summaries in runs.items():
        series = [_balance(s) for s in summaries if _balance(s)["step"]]
        if not series:
            continue
        keys = ("hard_grad_norm",) if method == "labels" else ("soft_grad_norm", "hard_grad_norm")
        for key in keys:
            steps, values = _stack(series, key)
            part = "soft" if key.startswith("soft") else "hard"
            style = "-" if part == "soft" else ":"
            axes.plot(steps, _rolling_mean(values.mean(0), window), style, color=COLORS.get(method),
                      label=f"{labels[method]}: {part}")  # fmt: skip
    axes.set_yscale("log")
    axes.set(
        xlabel="optimizer step",
        ylabel="‖∂loss/∂logits‖ per batch",
        title="Gradient balance: soft vs hard gradient",
    )
    axes.legend(fontsize=7)
    axes.grid(alpha=0.3, which="both")
    path = _save(figure, path)
    plt.close(figure)
    return path


def _balance(summary: dict[str, Any]) -> dict[str, list]:
    """A run's gradient-balance series; results.json files from before the rename call it
    ``"signal"``."""
    return summary["gradient_balance"] if "gradient_balance" in summary else summary["signal"]


def temperature_plot(runs: dict[str, list[dict]], labels: dict[str, str], path: str) -> str:
    """The temperature in force against step: fixed and learnable (mean over seeds)."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(5.6, 3.6))
    for method, summaries in runs.items():
        series = [s["temperature"] for s in summaries if s["temperature"]["step"]]
        if not series:
            continue
        steps, values = _stack(series, "temperature")
        axes.plot(steps, values.mean(0), color=COLORS.get(method), label=labels[method])
        if len(series) > 1:
            axes.fill_between(
                steps,
                values.min(0),
                values.max(0),
                color=COLORS.get(method),
                alpha=0.2,
                linewidth=0,
            )
    axes.set(xlabel="optimizer step", ylabel="temperature T", title="Temperature over training")
    axes.legend(fontsize=8)
    axes.grid(alpha=0.3)
    path = _save(figure, path)
    plt.close(figure)
    return path


def make_plots(results: dict[str, Any], labels: dict[str, str], output_dir: str) -> dict[str, str]:
    runs = results["runs"]
    return {
        "learning_curves": learning_curves(
            runs,
            labels,
            results["teacher"]["accuracy"],
            os.path.join(output_dir, "learning_curves.png"),
        ),
        "gradient_balance": gradient_balance(
            runs, labels, os.path.join(output_dir, "gradient_balance.png")
        ),
        "temperature": temperature_plot(runs, labels, os.path.join(output_dir, "temperature.png")),
    }
