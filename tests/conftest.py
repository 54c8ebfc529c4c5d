"""Checks shared by every test that builds an `llm` fixture, and a cache directory of the repo's own."""

import os
from pathlib import Path

import jax
import pytest

# Eight CPU devices, before any test starts the backend, so tensor- and data-parallel tests have a mesh to
# split over; every other test uses the first, as a one-device machine would.
jax.config.update("jax_num_cpu_devices", 8)

# Tests write their compiled programs and converted weights under the repo's ignored .cache/, not the user's
# cache directory (a caller's own JAXPAGE_CACHE_DIR wins).
os.environ.setdefault("JAXPAGE_CACHE_DIR", str(Path(__file__).resolve().parent.parent / ".cache"))


@pytest.fixture(autouse=True)
def pool_returns_to_full(request):
    """After every test the pool holds exactly the free pages it started with."""
    yield
    if "llm" in request.fixturenames:
        engine = request.getfixturevalue("llm").engine
        assert not engine.has_unfinished_requests()
        assert engine.pool.num_free_pages == engine.pool.num_usable_pages
