"""Every Python example of docs/training.md runs as written (in a temporary folder)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

# Tiny models on a shared 2-core machine: intra-op threads only spin and wait.
pytestmark = pytest.mark.usefixtures("one_thread")

DOC = Path(__file__).parents[2] / "docs" / "training.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


@pytest.mark.parametrize("number", range(len(BLOCKS)))
def test_training_docs_example_runs(number, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the examples write runs/...
    exec(compile(BLOCKS[number], f"docs/training.md[{number}]", "exec"), {})


def test_training_docs_has_examples():
    assert len(BLOCKS) >= 2
