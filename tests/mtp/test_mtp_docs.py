"""Every example in docs/mtp.md runs as written, with the output it shows; dk.mtp loads lazily."""

from __future__ import annotations

import subprocess
import sys

from doc_examples import assert_doctests_pass


def test_docs_mtp_examples_run_as_written():
    assert_doctests_pass("mtp.md", at_least=21)


def test_docs_mtp_loads_lazily():
    """`import darkknowledge` does not import dk.mtp; first access does."""
    code = (
        "import sys, darkknowledge as dk\n"
        "assert 'darkknowledge.mtp' not in sys.modules\n"
        "assert callable(dk.mtp.mtp_kd_loss)\n"
        "assert 'darkknowledge.mtp' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
