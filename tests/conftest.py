"""Every test runs against a private cache folder, never the user's."""

from __future__ import annotations

import os

import pytest

# Tests must never reach a model hub; every model they use is local or built in the test.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    cache_dir = tmp_path_factory.mktemp("asectl-cache")
    monkeypatch.setenv("ASECTL_CACHE_DIR", str(cache_dir))
    return cache_dir


@pytest.fixture
def cache(_isolated_cache):
    from asectl.cache import Cache

    return Cache(_isolated_cache)


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory):
    """10 generated cards (2 per class), seed 0: shared read-only by tests that only read it."""
    from asectl.synth import generate

    out = tmp_path_factory.mktemp("ds") / "small"
    generate(out, seed=0, counts="2,2,2,2,2")
    return out


@pytest.fixture
def one_torch_thread():
    """Tiny models on a shared 2-core machine: intra-op threads only add contention."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
