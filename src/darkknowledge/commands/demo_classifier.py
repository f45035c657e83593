"""``dk demo`` / ``dk demo classifier``: distil a digits classifier and write a report folder;
``--omit-class C`` runs Hinton's omitted-class experiment instead."""

from __future__ import annotations

import argparse
import os
from dataclasses import replace

from ._flags import (
    add_output_dir_argument,
    add_threads_argument,
    check_at_least_one,
    torch_threads,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_output_dir_argument(parser, "default: reports/demo, or reports/demo-omit-C")
    parser.add_argument(
        "--quick", action="store_true", help="a tiny setting that runs in seconds (for tests)"
    )
    parser.add_argument(
        "--seeds", type=int, default=None, help="number of student seeds (default: 3; quick: 1)"
    )
    parser.add_argument(
        "--omit-class",
        type=int,
        default=None,
        metavar="C",
        help="Hinton's omitted-class experiment",
    )
    add_threads_argument(parser, default=1, says="1 is fastest for these tiny models")


def run(args: argparse.Namespace) -> int:
    check_at_least_one({"--threads": args.threads, "--seeds": args.seeds})
    with torch_threads(args.threads):  # tiny matrices: more threads only add contention
        return _classifier(args)


def _classifier(args: argparse.Namespace) -> int:
    from ..demo.classifier import METHODS, QUICK, DemoSettings, run_classifier_demo
    from ..demo.plots import make_plots
    from ..demo.report import (
        classifier_report,
        classifier_table,
        omit_report,
        omit_table,
        write_json,
    )

    settings = QUICK if args.quick else DemoSettings()
    if args.seeds is not None:
        settings = replace(settings, seeds=tuple(range(args.seeds)))
    if args.omit_class is not None:
        from ..demo.omit import run_omit_class

        output = args.output_dir or f"reports/demo-omit-{args.omit_class}"
        results = run_omit_class(args.omit_class, settings)
        write_json(os.path.join(output, "results.json"), results)
        report = omit_report(results, output)
        print(f"\n{omit_table(results)}\n\ntotal {results['seconds']:.1f} s; report: {report}")
        return 0
    output = args.output_dir or "reports/demo"
    results = run_classifier_demo(settings)
    plots = make_plots(results, METHODS, output)
    write_json(os.path.join(output, "results.json"), results)
    report = classifier_report(results, plots, output)
    print(f"\n{classifier_table(results)}\n\ntotal {results['seconds']:.1f} s; report: {report}")
    return 0
