"""Every Python example of docs/on-policy.md runs as written (in a temporary folder)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOC = Path(__file__).parents[2] / "docs" / "on-policy.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


@pytest.mark.parametrize("number", range(len(BLOCKS)))
def test_on_policy_docs_example_runs(number, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(BLOCKS[number], f"docs/on-policy.md[{number}]", "exec"), {})


def test_on_policy_docs_have_an_example():
    assert len(BLOCKS) >= 1
