"""Every example in docs/mtp.md runs as written, with the output it shows; dk.mtp loads lazily."""

from __future__ import annotations

import doctest
import subprocess
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "mtp.md"


def test_docs_mtp_examples_run_as_written():
    result = doctest.testfile(
        str(DOC), module_relative=False, optionflags=doctest.ELLIPSIS, raise_on_error=False
    )
    assert result.attempted > 20
    assert result.failed == 0


def test_docs_mtp_loads_lazily():
    """`import darkknowledge` does not import dk.mtp; first access does."""
    code = (
        "import sys, darkknowledge as dk\n"
        "assert 'darkknowledge.mtp' not in sys.modules\n"
        "assert callable(dk.mtp.mtp_kd_loss)\n"
        "assert 'darkknowledge.mtp' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
