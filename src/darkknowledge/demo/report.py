"""The demo's printed table, results JSON and report.md (written atomically)."""

from __future__ import annotations

import json
import os
from typing import Any

from .._files import write_text
from .classifier import METHODS, _arch


def _write(path: str, text: str) -> str:
    return str(write_text(path, text))


def write_json(path: str, data: Any) -> str:
    return _write(path, json.dumps(data, indent=2) + "\n")


def classifier_table(results: dict[str, Any]) -> str:
    """The comparison as a Markdown table (printed and written to report.md)."""
    settings = results["settings"]
    seeds = len(settings["seeds"])
    teacher = results["teacher"]
    rows = [
        f"| method | test accuracy (mean ± std, {seeds} seed{'s' if seeds > 1 else ''}) | gap closed | wall time |",
        "| --- | --- | --- | --- |",
        f"| teacher MLP {_arch(tuple(settings['teacher_hidden']))} ({teacher['parameters']:,} params) "
        f"| {teacher['accuracy']:.4f} | | {teacher['seconds']:.1f} s |",
    ]
    for method, label in METHODS.items():
        summary = results["methods"][method]
        gap = summary["gap_closed"]
        gap_text = (
            "0 % (baseline)"
            if method == "labels"
            else ("n/a" if gap is None else f"{100 * gap:.0f} %")
        )
        rows.append(
            f"| {label} | {summary['accuracy_mean']:.4f} ± {summary['accuracy_std']:.4f} | {gap_text} "
            f"| {summary['seconds']:.1f} s |"
        )
    return "\n".join(rows)


def classifier_report(results: dict[str, Any], plots: dict[str, str], output_dir: str) -> str:
    """report.md next to the plots; returns its path."""
    s = results["settings"]
    first = results["runs"]["kd"][0]
    text = f"""# darkknowledge demo: distilling a digits classifier

Student MLP {_arch(tuple(s["student_hidden"]))} ({results["student_parameters"]:,} parameters); the
labelled part is {100 * s["labelled_fraction"]:g} % of the training split ({first["labelled"]} images, stratified,
redrawn per seed); the KD students also get the teacher's soft targets (T = {s["temperature"]:g},
alpha = {s["alpha"]:g}) on all {first["transfer"]} training images. Same optimizer (AdamW, lr
{s["learning_rate"]:g}), batch {s["batch_size"]}, {s["student_steps"]} steps for every student.
Gap closed = (acc_method - acc_labels) / (acc_teacher - acc_labels).

{classifier_table(results)}

Total wall time: {results["seconds"]:.1f} s.

![learning curves](learning_curves.png)

![gradient balance](gradient_balance.png)

![temperature](temperature.png)
"""
    del plots  # the images sit next to report.md under fixed names
    return _write(os.path.join(output_dir, "report.md"), text)


def omit_table(results: dict[str, Any]) -> str:
    c = results["omit_class"]
    rows = [
        f"| model | test accuracy | accuracy on class {c} |",
        "| --- | --- | --- |",
        f"| teacher (saw class {c}) | {results['teacher']['overall']:.4f} | {results['teacher']['class']:.4f} |",
        f"| student, before bias correction | {results['before']['overall']:.4f} | {results['before']['class']:.4f} |",
        f"| student, after bias correction (+{results['bias_delta_mean']:.2f}) "
        f"| {results['after']['overall']:.4f} | {results['after']['class']:.4f} |",
    ]
    return "\n".join(rows)


def omit_report(results: dict[str, Any], output_dir: str) -> str:
    c = results["omit_class"]
    seeds = len(results["runs"])
    text = f"""# darkknowledge demo: the omitted class (Hinton et al., 2015, section 3)

The teacher saw every class; the student was distilled on a transfer set of
{results["transfer_size"]} training images with no example of class {c}. The bias of output {c}
was then raised by the smallest amount that makes the student predict class {c} for 1/10 of
{results["validation_size"]} held-out training inputs (no labels used, test split untouched).
Means over {seeds} seed(s).

{omit_table(results)}

Total wall time: {results["seconds"]:.1f} s.
"""
    return _write(os.path.join(output_dir, "report.md"), text)
