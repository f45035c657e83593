"""``dk signal-gap``: the soft loss's gradient norm against temperature, with and without T^2.

The numbers and the plot come from :mod:`darkknowledge.analysis`; this module only reads the
flags, checks them (naming the flag) and prints.
"""

from __future__ import annotations

import argparse
import math

from ..analysis.plots import check_plot_path, plot_gradient_norm_sweep
from ..analysis.signal_gap import (
    default_sweep_temperatures,
    format_table,
    gradient_norm_sweep,
    signal_gap,
)

DEFAULT_PLOT_PATH = "signal-gap.png"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--classes", type=int, default=1000, help="number of classes N (default: 1000)"
    )
    parser.add_argument(
        "--temperatures",
        type=float,
        nargs="+",
        default=[1.0, 5.0],
        metavar="T",
        help="temperatures (default: 1 5)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="random seed of the logits (default: 0)"
    )
    parser.add_argument("--batch-size", type=int, default=16, help="rows of logits (default: 16)")
    parser.add_argument(
        "--points",
        type=int,
        default=41,
        help="temperatures from 1 to 100 in the plot (default: 41)",
    )
    parser.add_argument(
        "--plot",
        nargs="?",
        const=DEFAULT_PLOT_PATH,
        default=None,
        metavar="PATH",
        help=f"also plot gradient norm vs T from 1 to 100 (.png, .pdf or .svg; default PATH: {DEFAULT_PLOT_PATH})",
    )


def run(args: argparse.Namespace) -> int:
    # Checked here to name the flags; the analysis functions name their arguments.
    if args.classes < 2:
        raise ValueError(f"--classes must be >= 2, got {args.classes}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.points < 2:
        raise ValueError(f"--points must be >= 2, got {args.points}")
    bad = [t for t in args.temperatures if not (math.isfinite(t) and t > 0)]
    if bad:
        raise ValueError(f"--temperatures must all be finite and > 0, got {bad[0]:g}")
    if args.plot is not None:
        check_plot_path(args.plot, "--plot")

    gaps = signal_gap(args.classes, args.temperatures, args.seed, batch_size=args.batch_size)
    print(format_table(gaps, classes=args.classes, batch_size=args.batch_size, seed=args.seed))
    if args.plot is not None:
        temperatures = default_sweep_temperatures(args.points)
        sweep = gradient_norm_sweep(
            temperatures, args.classes, args.seed, batch_size=args.batch_size
        )
        plot_gradient_norm_sweep(sweep, args.plot, classes=args.classes)
        print(f"\nplot written to {args.plot}")
    return 0
