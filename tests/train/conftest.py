import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models on a shared 2-core machine: intra-op threads only spin and wait."""
