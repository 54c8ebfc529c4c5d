"""Checks shared by every test that builds an `llm` fixture."""

import pytest


@pytest.fixture(autouse=True)
def pool_returns_to_full(request):
    """After every test the pool holds exactly the free pages it started with."""
    yield
    if "llm" in request.fixturenames:
        engine = request.getfixturevalue("llm").engine
        assert not engine.has_unfinished_requests()
        assert engine.pool.num_free_pages == engine.pool.num_usable_pages
