"""Write the bad-input tables of docs/reliability.md from the suite's own cases.

    .venv/bin/python tests/reliability/make_table.py          # rewrite the tables
    .venv/bin/python tests/reliability/make_table.py --check  # exit 1 if they are stale

Each table sits between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->`` markers; everything
else in the page is left as it is. ``test_reliability_doc.py`` runs the check.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import sys
import warnings
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from catalogue import all_cases, run_case
from config_walk import code_fields, field_rows

DOC = Path(__file__).resolve().parents[2] / "docs" / "reliability.md"


def cell(text: str) -> str:
    """Table-cell text: pipes escaped, line breaks as <br>."""
    return text.replace("|", "\\|").replace("\n", "<br>")


def shown(value) -> str:
    if isinstance(value, float) and value != value:
        return "`.nan`"
    return f"`{value!r}`" if isinstance(value, str) else f"`{value}`"


def config_fields_table() -> str:
    rows = [
        "| field | wrong type | its error | out of range | its error |",
        "| --- | --- | --- | --- | --- |",
    ]
    for field, wrong, out in field_rows():
        parts = [f"`{field}`"]
        for found in (wrong, out):
            parts += [shown(found.value), cell(found.errors[0])] if found else ["", ""]
        rows.append("| " + " | ".join(parts) + " |")
    return "\n".join(rows)


def outcomes() -> list[tuple]:
    return [(case, run_case(case)) for case in all_cases()]


def bad_inputs_table(results) -> str:
    rows = [
        "| # | area | bad input | met by | answer | message |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for number, (case, outcome) in enumerate(results, 1):
        rows.append(
            f"| {number} | {case.area} | {cell(case.what)} | `{case.via}` | {outcome.kind} | "
            f"{cell(outcome.message)} |"
        )
    return "\n".join(rows)


def trust_table(results) -> str:
    rows = [
        "| where a path is accepted | what was planted | answer | code ran |",
        "| --- | --- | --- | --- |",
    ]
    for case, outcome in results:
        if case.trust:
            ran = "**yes**" if outcome.marker else "no"
            rows.append(
                f"| `{case.via}` | {cell(case.what)} | {outcome.kind}: {cell(outcome.message)} | {ran} |"
            )
    return "\n".join(rows)


def summary(results) -> str:
    areas = Counter(case.area for case, _ in results)
    trusted = sum(case.trust for case, _ in results)
    fields = field_rows()
    tried = sum((wrong is not None) + (out is not None) for _, wrong, out in fields)
    return (
        f"{len(results)} bad inputs in the table ("
        + ", ".join(f"{count} {area}" for area, count in areas.items())
        + f"), {trusted} of them malicious pickles or YAML tags; and {tried} wrong values "
        f"for the {len(fields)} config fields below, each also run through `dk validate` and "
        "`dk distill` by the suite."
    )


def blocks(results: list[tuple] | None = None) -> dict[str, str]:
    """Every generated block, from ``(case, outcome)`` pairs (run here when not given)."""
    results = outcomes() if results is None else results
    return {
        "summary": summary(results),
        "bad-inputs": bad_inputs_table(results),
        "config-fields": config_fields_table(),
        "trust": trust_table(results),
        "code-fields": ", ".join(f"`{field.replace('.0.', '.N.')}`" for field in code_fields()),
    }


def render(text: str, tables: dict[str, str]) -> str:
    for name, table in tables.items():
        pattern = re.compile(
            rf"(<!-- {name}:begin -->)\n.*?([ \t]*)(<!-- {name}:end -->)", re.DOTALL
        )
        match = pattern.search(text)
        if match is None:
            raise ValueError(f"{DOC} has no <!-- {name}:begin --> ... <!-- {name}:end --> block")
        indent = match.group(2)  # a block inside a list item keeps the item's indentation
        body = "".join(f"{indent}{line}\n" for line in table.splitlines())
        text = (
            text[: match.start()]
            + f"{match.group(1)}\n{body}{indent}{match.group(3)}"
            + text[match.end() :]
        )
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the doc is stale")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    current = DOC.read_text(encoding="utf-8")
    noise = io.StringIO()  # what the cases print (a Trainer's metrics, progress bars, warnings)
    quiet = contextlib.redirect_stdout(noise), contextlib.redirect_stderr(noise)
    with quiet[0], quiet[1], warnings.catch_warnings():
        warnings.simplefilter("ignore")
        updated = render(current, blocks())
    if args.check:
        if updated != current:
            print(f"{DOC} is stale: run python tests/reliability/make_table.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(updated, encoding="utf-8")
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
