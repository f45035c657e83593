"""Every example in docs/cache.md runs as written, with the output it shows."""

from __future__ import annotations

from doc_examples import assert_doctests_pass


def test_docs_cache_examples_run_as_written():
    assert_doctests_pass("cache.md", at_least=11)
