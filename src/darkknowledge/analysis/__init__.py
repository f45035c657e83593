"""Analyses of the distillation objective.

- :func:`signal_gap` and :func:`gradient_norm_sweep`: the soft loss's gradient vs temperature,
  with and without the T^2 factor (``dk signal-gap``).

Plotting lives in :mod:`darkknowledge.analysis.plots`, which imports matplotlib only when called.
"""

from .signal_gap import GradientNormSweep, SignalGap, gradient_norm_sweep, signal_gap

__all__ = ["GradientNormSweep", "SignalGap", "gradient_norm_sweep", "signal_gap"]
