"""Shared test settings: skip tests that need ../shared when it is absent."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def pytest_collection_modifyitems(config, items):
    if (SHARED / "data").is_dir() and (SHARED / "teachers").is_dir():
        return
    skip = pytest.mark.skip(reason=f"{SHARED} (real data and teachers) is not present on this machine")
    for item in items:
        if "shared" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tests run tiny tensors: one intra-op thread is faster and immune to CPU contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True, scope="session")
def _own_cache(tmp_path_factory):
    """Tests, and the commands they start as subprocesses, keep their timed fastest settings and synthetic images in
    a cache of the test session's own, never the user's; decoded datasets are shared with the user's cache (a
    deterministic decode, tens of seconds each for CIFAR)."""
    from graftkd.data.cache import cache_dir

    user = cache_dir()
    own = tmp_path_factory.mktemp("graftkd-cache")
    try:
        (user / "datasets").mkdir(parents=True, exist_ok=True)
        (own / "datasets").symlink_to(user / "datasets", target_is_directory=True)
    except OSError:  # a read-only home: the session decodes into its own cache
        pass
    before = os.environ.get("GRAFTKD_CACHE")
    os.environ["GRAFTKD_CACHE"] = str(own)
    yield own
    if before is None:
        os.environ.pop("GRAFTKD_CACHE", None)
    else:
        os.environ["GRAFTKD_CACHE"] = before


@pytest.fixture(autouse=True)
def _no_synthetic_cache(monkeypatch):
    """Tests make their synthetic images and keep none between runs, unless a test points the cache somewhere."""
    import graftkd.refine

    monkeypatch.setattr(graftkd.refine, "synth_cache_dir", lambda: None)


@pytest.fixture
def stop_after_saves(monkeypatch):
    """``stop_after_saves(n)``: the shared loop raises KeyboardInterrupt right after its n-th checkpoint, as a
    Ctrl-C would land there; ``stop_after_saves(None)`` puts the loop back."""
    from graftkd.engine import loop

    original = loop._save

    def arm(n):
        if n is None:
            monkeypatch.setattr(loop, "_save", original)
            return
        saves = {"n": 0}

        def save_then_stop(*args, **kw):
            original(*args, **kw)
            saves["n"] += 1
            if saves["n"] == n:
                raise KeyboardInterrupt

        monkeypatch.setattr(loop, "_save", save_then_stop)

    return arm
