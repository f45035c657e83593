"""Every example in docs/cache.md runs as written, with the output it shows."""

from __future__ import annotations

import doctest
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "cache.md"


def test_docs_cache_examples_run_as_written():
    result = doctest.testfile(
        str(DOC), module_relative=False, optionflags=doctest.ELLIPSIS, raise_on_error=False
    )
    assert result.attempted > 10
    assert result.failed == 0
