"""Fixtures of the causal-LM tests."""

from __future__ import annotations

import pytest
from tiny_models import tiny_gpt2


@pytest.fixture
def make_gpt2():
    return tiny_gpt2
