"""Shared test settings: skip tests that need ../shared when it is absent."""
from __future__ import annotations

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
