"""Real CIFAR-10 from ../shared/data (skipped when that folder is absent)."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from graftkd.data import FewShotManifest, load_dataset, make_manifest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CIFAR10 = SHARED_DATA / "cifar10.tar.gz"
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

pytestmark = [
    pytest.mark.shared,
    pytest.mark.skipif(not CIFAR10.is_file(), reason=f"shared data not available ({CIFAR10})"),
]


@pytest.fixture(scope="module")
def cache_env(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GRAFTKD_CACHE", str(tmp_path_factory.mktemp("cache")))
        mp.setenv("GRAFTKD_DATA", str(SHARED_DATA))
        yield


def test_cifar10_test_split_and_cache(cache_env):
    t0 = time.perf_counter()
    ds = load_dataset(str(CIFAR10), "test")  # decodes only the test members
    first = time.perf_counter() - t0
    assert len(ds) == 10000 and ds.image_shape == (3, 32, 32) and ds.images.dtype == torch.uint8
    assert ds.classes == CIFAR10_CLASSES == sorted(ds.classes)
    assert ds.class_counts() == [1000] * 10
    assert ds.dataset == "cifar10"
    assert ds.paths[0] == "airplane/0000.webp" and ds.paths[-1] == "truck/0999.webp"
    mean = ds.images.float().div(255).mean(dim=(0, 2, 3))
    assert torch.allclose(mean, torch.tensor([0.4942, 0.4851, 0.4504]), atol=2e-3)

    t0 = time.perf_counter()
    again = load_dataset("cifar10", "test")  # named lookup via GRAFTKD_DATA, served from the cache
    second = time.perf_counter() - t0
    assert again.name == "cifar10/test"
    assert torch.equal(again.images, ds.images) and torch.equal(again.labels, ds.labels)
    assert second <= first


def test_cifar10_fewshot_manifest(cache_env, tmp_path):
    m = make_manifest("cifar10", "test", k=10, seed=0)
    assert len(m.indices) == 100 and m.source_sha256 is not None
    m.save(tmp_path / "m.json")
    ds = FewShotManifest.load(tmp_path / "m.json").materialize()
    assert len(ds) == 100 and ds.labels is None and ds.image_shape == (3, 32, 32)
    labels = FewShotManifest.load(tmp_path / "m.json").materialize_with_labels().labels
    assert torch.bincount(labels).tolist() == [10] * 10
