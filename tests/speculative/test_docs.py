"""Every example in docs/speculative.md runs as written, with the output it shows."""

from __future__ import annotations

import doctest
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "speculative.md"


def test_docs_speculative_examples_run_as_written():
    result = doctest.testfile(
        str(DOC), module_relative=False, optionflags=doctest.ELLIPSIS, raise_on_error=False
    )
    assert result.attempted > 20
    assert result.failed == 0
