import pytest


@pytest.fixture
def compile_cache(monkeypatch, tmp_path):
    """The compile cache on (tests/conftest.py turns it off for the rest of the suite), in a fresh
    folder; Dynamo's in-memory caches and fusecc's counters reset around the test."""
    import torch._dynamo

    from fusecc.compile_cache import counters

    monkeypatch.delenv("FUSECC_DISABLE_COMPILE_CACHE", raising=False)
    monkeypatch.setenv("FUSECC_CACHE_DIR", str(tmp_path / "cache"))
    torch._dynamo.reset()
    counters.clear()
    yield tmp_path / "cache"
    torch._dynamo.reset()
    counters.clear()
