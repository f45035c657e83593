"""The plain-text table of the demos' reports: one helper, so that every table lines up alike."""

from __future__ import annotations

from collections.abc import Sequence


def aligned_rows(rows: Sequence[Sequence[str]]) -> list[str]:
    """``rows`` (the header first) as lines of columns two spaces apart, the first column
    left-aligned and the others right-aligned, with a rule of dashes under the header.

    >>> print("\\n".join(aligned_rows([("model", "bits"), ("teacher", "1.5"), ("student", "12.25")])))
    model     bits
    -------  -----
    teacher    1.5
    student  12.25
    """
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    lines = [
        "  ".join(
            cell.ljust(width) if column == 0 else cell.rjust(width)
            for column, (cell, width) in enumerate(zip(row, widths))
        )
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return lines
