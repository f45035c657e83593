"""Every example in docs/speculative.md runs as written, with the output it shows; the package
loads lazily."""

from __future__ import annotations

import doctest
import subprocess
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "speculative.md"


def test_docs_speculative_examples_run_as_written():
    result = doctest.testfile(
        str(DOC), module_relative=False, optionflags=doctest.ELLIPSIS, raise_on_error=False
    )
    assert result.attempted > 20
    assert result.failed == 0


def test_docs_speculative_loads_lazily():
    """`import darkknowledge` neither imports dk.speculative nor transformers; first access does."""
    code = (
        "import sys, darkknowledge as dk\n"
        "assert 'darkknowledge.speculative' not in sys.modules\n"
        "assert 'transformers' not in sys.modules\n"
        "assert callable(dk.speculative.generate)\n"
        "assert 'darkknowledge.speculative' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
