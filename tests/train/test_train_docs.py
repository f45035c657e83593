"""Every Python example of docs/training.md runs as written (in a temporary folder)."""

from __future__ import annotations

import pytest

from doc_examples import python_blocks, run_block

# Tiny models on a shared 2-core machine: intra-op threads only spin and wait.
pytestmark = pytest.mark.usefixtures("one_thread")

BLOCKS = python_blocks("training.md")


@pytest.mark.parametrize("number", range(len(BLOCKS)))
def test_training_docs_example_runs(number, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the examples write runs/...
    run_block("training.md", number)


def test_training_docs_has_examples():
    assert len(BLOCKS) >= 2
