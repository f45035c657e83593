"""Every Python example of docs/on-policy.md runs as written (in a temporary folder)."""

from __future__ import annotations

import pytest

from doc_examples import python_blocks, run_block

BLOCKS = python_blocks("on-policy.md")


@pytest.mark.parametrize("number", range(len(BLOCKS)))
def test_on_policy_docs_example_runs(number, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_block("on-policy.md", number)


def test_on_policy_docs_have_an_example():
    assert len(BLOCKS) >= 1
