import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """The uninterrupted reference runs in the test's process and is compared byte for byte
    with what killed subprocesses (``OMP_NUM_THREADS=1``) wrote: same thread count."""
