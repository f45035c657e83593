"""Fixtures shared by every test folder."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_thread():
    """Run the test on one intra-op thread, as the subprocesses the tests start are
    (``OMP_NUM_THREADS=1``): a matmul split over two threads rounds differently, so a run in the
    test's own process is bitwise-comparable with one in a subprocess only on the same count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def make_gpt2():
    """``tiny_gpt2(seed, **config)``: a GPT-2 of a few thousand parameters (tests/llm)."""
    from tiny_models import tiny_gpt2  # tests/llm, on sys.path for the tests beside it

    return tiny_gpt2
