"""Every example in docs/speculative.md runs as written, with the output it shows; the package
loads lazily."""

from __future__ import annotations

import subprocess
import sys

from doc_examples import assert_doctests_pass


def test_docs_speculative_examples_run_as_written():
    assert_doctests_pass("speculative.md", at_least=21)


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
