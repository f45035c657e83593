"""Plots of the analyses. matplotlib is imported inside the functions, so that importing
``darkknowledge.analysis`` stays cheap; figures use the Agg canvas directly (no pyplot, no global
backend switch) and are written atomically."""

from __future__ import annotations

import os
from pathlib import Path

from .._files import save_figure
from .signal_gap import GradientNormSweep

FORMATS = ("png", "pdf", "svg")


def check_plot_path(path: str | os.PathLike, name: str = "path") -> str:
    """The image format of ``path`` from its extension; its folder must exist."""
    path = Path(path)
    image_format = path.suffix.lower().lstrip(".")
    if image_format not in FORMATS:
        raise ValueError(f"{name} must end in .png, .pdf or .svg, got {name}={str(path)!r}")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{name}: folder {str(path.parent)!r} does not exist")
    return image_format


def plot_gradient_norm_sweep(
    sweep: GradientNormSweep, path: str | os.PathLike, *, classes: int
) -> Path:
    """Gradient norm vs temperature on log-log axes: unscaled, T^2-scaled, and the
    high-temperature approximation. Writes ``path`` atomically and returns it."""
    from matplotlib.figure import Figure

    image_format = check_plot_path(path)
    figure = Figure(figsize=(7.0, 4.5), dpi=120, layout="constrained")
    axes = figure.add_subplot()
    axes.loglog(
        sweep.temperatures, sweep.unscaled, "o-", markersize=3, label="unscaled: ‖∂KL/∂z_s‖"
    )
    axes.loglog(
        sweep.temperatures, sweep.scaled, "s-", markersize=3, label="scaled: ‖∂(T² KL)/∂z_s‖"
    )
    axes.loglog(
        sweep.temperatures,
        sweep.approximation,
        "--",
        color="black",
        linewidth=1,
        label="high-T approximation ‖z_s − z_t‖ / (B N T²), batch of B",
    )
    axes.set_xlabel("temperature T")
    axes.set_ylabel("gradient norm w.r.t. student logits")
    axes.set_title(f"The signal gap: soft-loss gradient vs temperature ({classes} classes)")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    return save_figure(figure, Path(path), format=image_format)
