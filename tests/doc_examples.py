"""Running the examples of a page in docs/ as written: its doctest-style ``>>>`` examples with
the output they show, or its ```` ```python ```` blocks."""

from __future__ import annotations

import doctest
import re
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"


def assert_doctests_pass(page: str, *, at_least: int) -> None:
    """Every ``>>>`` example of ``docs/<page>`` gives the output shown (``...`` matches
    anything), and there are at least ``at_least`` of them."""
    result = doctest.testfile(
        str(DOCS / page), module_relative=False, optionflags=doctest.ELLIPSIS,
        raise_on_error=False,
    )  # fmt: skip
    assert result.attempted >= at_least, (page, result.attempted)
    assert result.failed == 0, page


def python_blocks(page: str, fence: str = "python") -> list[str]:
    """The ```` ```python ```` blocks of ``docs/<page>``, in order (``fence="py"``: the
    ```` ```py ```` blocks, whole scripts that run under a launcher, never in this process)."""
    return re.findall(rf"```{fence}\n(.*?)```", (DOCS / page).read_text(), flags=re.S)


def run_block(page: str, number: int) -> None:
    """Execute block ``number`` of ``docs/<page>`` in a namespace of its own."""
    exec(compile(python_blocks(page)[number], f"docs/{page}[{number}]", "exec"), {})
