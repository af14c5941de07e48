"""Tests for graftkd.data: readers, cache, few-shot sampling, manifests, augmentation, normalisation."""
from __future__ import annotations

import io
import json
import os
import pickle
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from graftkd.data import (
    DATASET_STATS,
    Augment,
    FewShotManifest,
    ImageSet,
    Normalizer,
    apply_crop_flip,
    crop_flip_params,
    default_augment,
    load_cifar_python,
    load_dataset,
    load_digits,
    load_image_archive,
    load_image_files,
    load_image_folder,
    load_unlabeled_folder,
    make_manifest,
    make_unlabeled_manifest,
    random_crop_flip,
    sample_few_shot,
    stats_for,
)
from graftkd.errors import GraftkdError


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Never touch the user's cache or data folders from tests."""
    monkeypatch.setenv("GRAFTKD_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("GRAFTKD_DATA", raising=False)


# ------------------------------------------------------------------------------------ helpers
def _pixel(class_index: int, i: int, h: int = 6, w: int = 5) -> np.ndarray:
    """A distinctive RGB image identifying (class, index)."""
    rng = np.random.default_rng(1000 * class_index + i)
    arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    arr[0, 0] = (class_index, i, 7)
    return arr


def _save(arr: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(arr)
    if path.suffix == ".webp":
        im.save(path, lossless=True, quality=100)
    else:
        im.save(path)


# classes created in non-alphabetical order; expected order: ant, cat, dog
CLASSES = {"dog": 3, "ant": 2, "cat": 4}


def _make_split(root: Path, split: str = "train") -> dict[str, list[np.ndarray]]:
    made: dict[str, list[np.ndarray]] = {}
    for ci, cls in enumerate(sorted(CLASSES)):
        made[cls] = []
        for i in range(CLASSES[cls]):
            arr = _pixel(ci, i)
            ext = ".png" if i % 2 == 0 else ".webp"
            _save(arr, root / split / cls / f"{i:04d}{ext}")
            made[cls].append(arr)
    (root / split / "ant" / "notes.txt").write_text("not an image")
    return made


@pytest.fixture
def image_tree(tmp_path) -> Path:
    root = tmp_path / "tree"
    _make_split(root, "train")
    _make_split(root, "test")
    return root


def _tar(src: Path, dest: Path, mode: str = "w:gz") -> Path:
    with tarfile.open(dest, mode) as tf:
        for p in sorted(src.rglob("*")):
            tf.add(p, arcname=p.relative_to(src).as_posix(), recursive=False)
    return dest


def _expected_images() -> torch.Tensor:
    arrs = [_pixel(ci, i) for ci, cls in enumerate(sorted(CLASSES)) for i in range(CLASSES[cls])]
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()


# ------------------------------------------------------------------------------------ ImageSet
def test_imageset_basics():
    images = torch.arange(4 * 3 * 2 * 2, dtype=torch.uint8).reshape(4, 3, 2, 2)
    ds = ImageSet(images, torch.tensor([0, 1, 1, 2]), ["a", "b", "c"], "toy")
    assert len(ds) == 4 and ds.num_classes == 3 and ds.image_shape == (3, 2, 2)
    sub = ds.subset([2, 0])
    assert torch.equal(sub.images, images[[2, 0]]) and sub.labels.tolist() == [1, 0]
    assert sub.images.is_contiguous()
    unl = ds.drop_labels()
    assert unl.labels is None and torch.equal(unl.images, images) and ds.labels is not None
    assert ImageSet(images, None, [], "u").num_classes == 0
    assert ImageSet(images, torch.tensor([0, 4, 1, 1]), [], "n").num_classes == 5
    with pytest.raises(GraftkdError, match="out of range"):
        ds.subset([4])
    with pytest.raises(GraftkdError, match="uint8"):
        ImageSet(images.float(), None, [], "bad")
    with pytest.raises(GraftkdError, match="labels must have shape"):
        ImageSet(images, torch.tensor([0, 1]), [], "bad")


# ------------------------------------------------------------------------------------ folders / archives
def test_image_folder_order_and_content(image_tree):
    ds = load_image_folder(image_tree, "train")
    assert ds.classes == ["ant", "cat", "dog"]
    assert ds.class_counts() == [2, 4, 3]
    assert ds.images.dtype == torch.uint8 and ds.images.shape == (9, 3, 6, 5) and ds.images.is_contiguous()
    assert torch.equal(ds.images, _expected_images())  # PNG and lossless WebP decode exactly
    assert ds.labels.tolist() == [0, 0, 1, 1, 1, 1, 2, 2, 2]
    assert ds.paths[:3] == ["ant/0000.png", "ant/0001.webp", "cat/0000.png"]
    gray = load_image_folder(image_tree, "test", grayscale=True)
    assert gray.images.shape == (9, 1, 6, 5)


@pytest.mark.parametrize("mode,suffix", [("w:gz", ".tar.gz"), ("w", ".tar")])
def test_archive_matches_folder(image_tree, tmp_path, mode, suffix):
    archive = _tar(image_tree, tmp_path / f"imgs{suffix}", mode)
    folder = load_image_folder(image_tree, "test")
    arch = load_image_archive(archive, "test")
    assert arch.classes == folder.classes
    assert torch.equal(arch.images, folder.images) and torch.equal(arch.labels, folder.labels)
    assert arch.paths == folder.paths
    with pytest.raises(GraftkdError, match="no images under val/"):
        load_image_archive(archive, "val")


def test_archive_skips_hidden_and_unsafe_members(image_tree, tmp_path):
    archive = tmp_path / "x.tar.gz"
    _tar(image_tree, archive)
    extra = io.BytesIO()
    _pixel_img = Image.fromarray(_pixel(0, 0))
    _pixel_img.save(extra, format="PNG")
    with tarfile.open(archive, "r:gz") as src, tarfile.open(tmp_path / "y.tar.gz", "w:gz") as dst:
        for m in src.getmembers():
            dst.addfile(m, src.extractfile(m) if m.isfile() else None)
        for name in ["test/ant/._0000.png", "__MACOSX/test/ant/0000.png", "test/../test/ant/evil.png"]:
            info = tarfile.TarInfo(name)
            info.size = len(extra.getvalue())
            dst.addfile(info, io.BytesIO(extra.getvalue()))
    ds = load_image_archive(tmp_path / "y.tar.gz", "test")
    assert len(ds) == 9 and ds.classes == ["ant", "cat", "dog"]


def test_damaged_archive_and_workers(image_tree, tmp_path):
    archive = _tar(image_tree, tmp_path / "a.tar.gz")
    with_workers = load_image_archive(archive, "train", workers=1)
    assert torch.equal(with_workers.images, load_image_archive(archive, "train").images)
    data = archive.read_bytes()
    (tmp_path / "cut.tar.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(GraftkdError, match="cut.tar.gz.*damaged"):
        load_image_archive(tmp_path / "cut.tar.gz", "train")


def test_unequal_sizes_error_names_file(image_tree):
    _save(_pixel(1, 99, h=7, w=9), image_tree / "train" / "dog" / "zz_big.png")
    with pytest.raises(GraftkdError) as err:
        load_image_folder(image_tree, "train")
    msg = str(err.value)
    assert "dog/zz_big.png" in msg and "9x7" in msg and "5x6" in msg and "resize your images to one size" in msg


def test_folder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(GraftkdError, match=r"no images found in .*empty \(looked for \*\.png"):
        load_unlabeled_folder(tmp_path / "empty")
    with pytest.raises(GraftkdError, match="no class folders"):
        load_image_folder(tmp_path / "empty")
    (tmp_path / "empty" / "cls").mkdir()
    with pytest.raises(GraftkdError, match="has no images"):
        load_image_folder(tmp_path / "empty")
    with pytest.raises(GraftkdError, match="no split folder 'test'"):
        load_image_folder(tmp_path / "empty", "test")
    with pytest.raises(GraftkdError, match="not found"):
        load_unlabeled_folder(tmp_path / "missing")


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_truncated_image_error_and_skip(tmp_path):
    root = tmp_path / "unl"
    for i in range(4):
        _save(_pixel(0, i, h=16, w=16), root / f"sub{i % 2}" / f"img{i}.png")
    _truncate(root / "sub1" / "img3.png")
    with pytest.raises(GraftkdError, match=r"sub1/img3\.png.*on_bad_image='skip'"):
        load_unlabeled_folder(root)
    with pytest.warns(UserWarning, match="skipped 1 unreadable image"):
        ds = load_unlabeled_folder(root, on_bad_image="skip")
    assert len(ds) == 3 and ds.num_skipped == 1 and ds.skipped == ["sub1/img3.png"]
    assert ds.labels is None and ds.paths == ["sub0/img0.png", "sub0/img2.png", "sub1/img1.png"]
    with pytest.raises(GraftkdError, match="on_bad_image"):
        load_unlabeled_folder(root, on_bad_image="ignore")


def test_garbage_file_with_image_extension(tmp_path):
    root = tmp_path / "g"
    _save(_pixel(0, 0), root / "a.png")
    (root / "b.jpg").write_bytes(b"this is not a jpeg")
    with pytest.raises(GraftkdError, match="b.jpg"):
        load_unlabeled_folder(root)


def test_misnamed_image_still_decodes(tmp_path):
    root = tmp_path / "m"
    arr = _pixel(0, 0)
    Image.fromarray(arr).save(root.mkdir() or root / "a.jpg", format="PNG")  # PNG content, .jpg name
    ds = load_unlabeled_folder(root)
    assert torch.equal(ds.images[0], torch.from_numpy(arr).permute(2, 0, 1))


def test_image_modes_convert_to_rgb(tmp_path):
    root = tmp_path / "modes"
    root.mkdir()
    Image.new("L", (4, 4), 200).save(root / "a.png")
    Image.new("RGBA", (4, 4), (10, 20, 30, 0)).save(root / "b.png")
    Image.new("P", (4, 4), 3).save(root / "c.bmp")
    ds = load_unlabeled_folder(root)
    assert ds.images.shape == (3, 3, 4, 4)
    assert ds.images[0].flatten().unique().tolist() == [200]
    assert ds.images[1, :, 0, 0].tolist() == [10, 20, 30]


def test_load_image_files_refuses_escaping_paths(tmp_path):
    root = tmp_path / "r"
    _save(_pixel(0, 0), root / "a.png")
    _save(_pixel(0, 1), tmp_path / "outside.png")
    for bad in ["../outside.png", str(tmp_path / "outside.png"), "a\\..\\b.png"]:
        with pytest.raises(GraftkdError):
            load_image_files(root, [bad])
    os.symlink(tmp_path / "outside.png", root / "link.png")
    with pytest.raises(GraftkdError, match="outside"):
        load_image_files(root, ["link.png"])


def test_load_dataset_folder_cache(image_tree, tmp_path):
    a = load_dataset(str(image_tree), "train")
    files = list((tmp_path / "cache" / "datasets").glob("*.pt"))
    assert len(files) == 1
    b = load_dataset(str(image_tree), "train")
    assert torch.equal(a.images, b.images) and a.classes == b.classes and a.paths == b.paths
    # a changed file changes the key: the new content is decoded
    _save(_pixel(5, 5), image_tree / "train" / "cat" / "0000.png")
    c = load_dataset(str(image_tree), "train")
    assert not torch.equal(c.images, a.images)
    assert len(list((tmp_path / "cache" / "datasets").glob("*.pt"))) == 2
    # a corrupt cache file costs a warning and a fresh decode
    for f in (tmp_path / "cache" / "datasets").glob("*.pt"):
        f.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="cache"):
        d = load_dataset(str(image_tree), "train")
    assert torch.equal(d.images, c.images)


def test_load_dataset_archive_cache(image_tree, tmp_path):
    archive = _tar(image_tree, tmp_path / "set.tar.gz")
    a = load_dataset(str(archive), "train")
    assert a.name.endswith("set.tar.gz/train") and a.classes == ["ant", "cat", "dog"]
    b = load_dataset(str(archive), "train")
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert len(list((tmp_path / "cache" / "datasets").glob("set.tar.gz-train-*.pt"))) == 1


def test_load_dataset_errors(tmp_path):
    with pytest.raises(GraftkdError, match="not one of digits, cifar10, cifar100"):
        load_dataset(str(tmp_path / "nope"), "train")
    with pytest.raises(GraftkdError, match="GRAFTKD_DATA"):
        load_dataset("cifar10", "test", data_root=tmp_path)
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(GraftkdError, match="not a .tar"):
        load_dataset(str(tmp_path / "f.txt"), "train")
    with pytest.raises(GraftkdError, match="split"):
        load_dataset("digits", "val")


def test_named_archive_lookup(image_tree, tmp_path, monkeypatch):
    # a 3-class archive named cifar10.tar.gz is found under GRAFTKD_DATA but rejected by class count
    data = tmp_path / "data"
    data.mkdir()
    _tar(image_tree, data / "cifar10.tar.gz")
    monkeypatch.setenv("GRAFTKD_DATA", str(data))
    with pytest.raises(GraftkdError, match="holds 3 classes"):
        load_dataset("cifar10", "test")


# ------------------------------------------------------------------------------------ CIFAR python format
def _write_cifar10_python(root: Path, n_per_batch: int = 6) -> tuple[np.ndarray, np.ndarray]:
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names, "num_cases_per_batch": n_per_batch}, f, protocol=2)
    rng = np.random.default_rng(0)
    all_data, all_labels = [], []
    for member in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n_per_batch).tolist()
        with open(d / member, "wb") as f:
            pickle.dump({"data": data, "labels": labels, "batch_label": member}, f, protocol=2)
        if member != "test_batch":
            all_data.append(data)
            all_labels.extend(labels)
    return np.concatenate(all_data), np.array(all_labels)


def test_cifar_python_format(tmp_path):
    data, labels = _write_cifar10_python(tmp_path)
    ds = load_cifar_python(tmp_path, "cifar10", "train")
    assert len(ds) == 30 and ds.classes[0] == "airplane" and ds.name == "cifar10/train"
    order = np.argsort(labels, kind="stable")  # canonical class-major order
    assert ds.labels.tolist() == labels[order].tolist()
    assert torch.equal(ds.images, torch.from_numpy(data[order].reshape(-1, 3, 32, 32)))
    official = load_cifar_python(tmp_path / "cifar-10-batches-py", "cifar10", "train", class_major=False)
    assert official.labels.tolist() == labels.tolist()
    # the official archive is read without extracting; load_dataset recognises both forms
    arc = _tar(tmp_path, tmp_path / "cifar-10-python.tar.gz")
    from_tar = load_cifar_python(arc, "cifar10", "test")
    assert len(from_tar) == 6
    via_spec = load_dataset("cifar10", "train", data_root=tmp_path)
    assert torch.equal(via_spec.images, ds.images)


def test_cifar_python_refuses_code_pickles(tmp_path):
    _write_cifar10_python(tmp_path)

    class Evil:
        def __reduce__(self):
            return (os.getcwd, ())

    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({"data": Evil()}, f, protocol=2)
    with pytest.raises(GraftkdError, match="refusing to load posix.getcwd|refusing to load"):
        load_cifar_python(tmp_path, "cifar10", "test")


def test_download_cifar_verifies_checksum(tmp_path, monkeypatch):
    import hashlib

    from graftkd.data import download_cifar
    from graftkd.data.readers import cifar as readers

    src = tmp_path / "src"
    _write_cifar10_python(src)
    payload = _tar(src, tmp_path / "payload.tar.gz").read_bytes()
    opened = []

    def fake_urlopen(url, timeout=None):
        opened.append(url)
        return io.BytesIO(payload)

    monkeypatch.setattr(readers.urllib.request, "urlopen", fake_urlopen)
    monkeypatch.setitem(readers.CIFAR_INFO["cifar10"], "md5", "0" * 32)
    with pytest.raises(GraftkdError, match="corrupt"):
        download_cifar(tmp_path / "dl", "cifar10")
    assert not (tmp_path / "dl" / "cifar-10-python.tar.gz").exists()
    monkeypatch.setitem(readers.CIFAR_INFO["cifar10"], "md5", hashlib.md5(payload).hexdigest())
    path = download_cifar(tmp_path / "dl", "cifar10")
    assert path.read_bytes() == payload and opened[0].startswith("https://www.cs.toronto.edu/")
    assert download_cifar(tmp_path / "dl", "cifar10") == path and len(opened) == 2  # reused, not fetched
    assert len(load_dataset("cifar10", "test", data_root=tmp_path / "dl")) == 6


# ------------------------------------------------------------------------------------ digits
def test_digits_split():
    tr, te = load_digits("train"), load_digits("test")
    assert len(tr) + len(te) == 1797
    assert tr.images.shape[1:] == (1, 8, 8) and tr.images.dtype == torch.uint8
    assert int(tr.images.max()) == 255 and int(tr.images.min()) == 0
    assert tr.classes == [str(i) for i in range(10)]
    frac = torch.tensor(tr.class_counts()) / (torch.tensor(tr.class_counts()) + torch.tensor(te.class_counts()))
    assert torch.all((frac - 0.7).abs() < 0.01)  # stratified
    assert torch.equal(load_digits("train").images, tr.images)  # deterministic
    other = load_digits("train", seed=1)
    assert len(other) == len(tr) and not torch.equal(other.images, tr.images)
    # train and test are disjoint: no train image (with label) appears in test more often than duplicates allow
    tr_keys = {(bytes(x.numpy()), int(y)) for x, y in zip(tr.images, tr.labels)}
    te_keys = [(bytes(x.numpy()), int(y)) for x, y in zip(te.images, te.labels)]
    assert sum(k in tr_keys for k in te_keys) < 5


# ------------------------------------------------------------------------------------ few-shot
def _labels(counts):
    return torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])[torch.randperm(sum(counts), generator=torch.Generator().manual_seed(3))]


def test_few_shot_exact_k_and_disjoint():
    labels = _labels([20, 15, 30, 12])
    subsets = [sample_few_shot(labels, 4, seed=7, subset=s) for s in range(3)]
    for idx in subsets:
        assert len(idx) == 16 and len(set(idx)) == 16 and idx == sorted(idx)
        assert torch.bincount(labels[idx], minlength=4).tolist() == [4, 4, 4, 4]
    assert not set(subsets[0]) & set(subsets[1]) and not set(subsets[1]) & set(subsets[2])
    assert not set(subsets[0]) & set(subsets[2])
    assert sample_few_shot(labels, 4, seed=7) == subsets[0]
    assert sample_few_shot(labels, 4, seed=8) != subsets[0]


@settings(max_examples=30, deadline=None)
@given(
    counts=st.lists(st.integers(1, 12), min_size=1, max_size=6),
    k=st.integers(1, 4),
    seed=st.integers(0, 2**31),
)
def test_few_shot_property(counts, k, seed):
    labels = _labels(counts)
    ok = [s for s in range(3) if k * (s + 1) <= min(counts)]
    seen: set[int] = set()
    for s in ok:
        idx = sample_few_shot(labels, k, seed, s)
        assert torch.bincount(labels[idx], minlength=len(counts)).tolist() == [k] * len(counts)
        assert not seen & set(idx)
        seen |= set(idx)
    if len(ok) < 3:
        with pytest.raises(GraftkdError, match="largest K that works"):
            sample_few_shot(labels, k, seed, len(ok))


def test_few_shot_errors():
    labels = _labels([10, 3, 8])
    with pytest.raises(GraftkdError) as err:
        sample_few_shot(labels, 5, 0, classes=["cat", "dog", "emu"])
    msg = str(err.value)
    assert "'dog'" in msg and "index 1" in msg and "only 3" in msg and "largest K that works is 3" in msg
    with pytest.raises(GraftkdError, match="largest K that works is 1"):
        sample_few_shot(labels, 2, 0, subset=1)
    for bad in (0, -1, True, 2.0):
        with pytest.raises(GraftkdError, match="K must be at least 1"):
            sample_few_shot(labels, bad, 0)
    with pytest.raises(GraftkdError, match="class #3.*has only 0|#3"):
        sample_few_shot(labels, 1, 0, num_classes=4)
    assert len(sample_few_shot(labels, np.int64(2), np.int64(1))) == 6


# ------------------------------------------------------------------------------------ manifests
def test_manifest_round_trip_digits(tmp_path):
    m = make_manifest("digits", "train", k=3, seed=5, subset=1)
    assert len(m.indices) == 30 and m.num_classes == 10 and m.source_size == len(load_digits("train"))
    assert m.created_by.startswith("graftkd ")
    path = m.save(tmp_path / "fs.json")
    data = json.loads(path.read_text())
    assert data["format"] == "graftkd-fewshot/1" and data["indices"] == m.indices and data["paths"] is None
    loaded = FewShotManifest.load(path)
    assert loaded == m
    ds = loaded.materialize()
    assert ds.labels is None and len(ds) == 30
    full = load_digits("train")
    assert torch.equal(ds.images, full.images[m.indices])
    labeled = loaded.materialize_with_labels()
    assert torch.bincount(labeled.labels).tolist() == [3] * 10
    other = make_manifest("digits", "train", k=3, seed=5, subset=0)
    assert not set(other.indices) & set(m.indices)


def _bad(tmp_path, data, name="bad.json"):
    p = tmp_path / name
    p.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return p


def test_manifest_malformed(tmp_path):
    good = make_manifest("digits", "test", k=1, seed=0).to_dict()
    cases = {
        "missing": ({k: v for k, v in good.items() if k != "seed"}, "'seed' is missing"),
        "wrong_type": ({**good, "k": "5"}, "'k' must be an integer"),
        "bool": ({**good, "seed": True}, "'seed' must be an integer"),
        "neg_index": ({**good, "indices": [1, -2]}, r"'indices'\[1\]"),
        "dup": ({**good, "indices": [1, 1]}, "twice"),
        "both": ({**good, "paths": ["a.png"]}, "exactly one"),
        "sha": ({**good, "source_sha256": "xyz"}, "source_sha256"),
        "escape": ({**good, "indices": None, "paths": ["ok.png", "../x.png"]}, r"'paths'\[1\].*escapes"),
        "absolute": ({**good, "indices": None, "paths": ["/etc/passwd"]}, r"'paths'\[0\]"),
        "windows": ({**good, "indices": None, "paths": ["C:/x.png"]}, r"'paths'\[0\]"),
        "format": ({**good, "format": "graftkd-fewshot/99"}, "upgrade graftkd"),
        "not_object": ([1, 2], "JSON object"),
        "not_json": ("{oops", "not valid JSON"),
    }
    for name, (data, pattern) in cases.items():
        p = _bad(tmp_path, data, f"{name}.json")
        with pytest.raises(GraftkdError, match=pattern) as err:
            FewShotManifest.load(p)
        assert str(p) in str(err.value), name
    with pytest.raises(GraftkdError, match="not found"):
        FewShotManifest.load(tmp_path / "absent.json")
    with pytest.warns(UserWarning, match="unknown manifest field"):
        FewShotManifest.load(_bad(tmp_path, {**good, "extra": 1}))


def test_manifest_out_of_range_index(tmp_path):
    m = make_manifest("digits", "test", k=1, seed=0)
    m.source_size = None
    m.indices = [0, 100000]
    with pytest.raises(GraftkdError, match="out of range"):
        m.materialize()


def test_manifest_archive_sha_and_relocation(image_tree, tmp_path):
    archive = _tar(image_tree, tmp_path / "set.tar.gz")
    m = make_manifest(str(archive), "train", k=2, seed=0)
    assert m.source_sha256 is not None and len(m.indices) == 6
    m.save(tmp_path / "m.json")
    ds = FewShotManifest.load(tmp_path / "m.json").materialize()
    assert len(ds) == 6 and ds.labels is None
    # moved data: found via data_root by file name
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    archive.rename(moved / "set.tar.gz")
    with pytest.raises(GraftkdError, match="data_root"):
        FewShotManifest.load(tmp_path / "m.json").materialize()
    again = FewShotManifest.load(tmp_path / "m.json").materialize(data_root=moved)
    assert torch.equal(again.images, ds.images)
    # different content under the same name: refused
    (moved / "set.tar.gz").unlink()
    _save(_pixel(9, 9), image_tree / "train" / "ant" / "0000.png")
    _tar(image_tree, moved / "set.tar.gz")
    with pytest.raises(GraftkdError, match="sha256"):
        FewShotManifest.load(tmp_path / "m.json").materialize(data_root=moved)


def test_unlabeled_manifest(tmp_path):
    root = tmp_path / "pool"
    for i in range(10):
        _save(_pixel(0, i), root / ("a" if i < 5 else "b") / f"{i}.webp")
    m0 = make_unlabeled_manifest(root, n=4, seed=1, subset=0)
    m1 = make_unlabeled_manifest(root, n=4, seed=1, subset=1)
    assert m0.indices is None and len(m0.paths) == 4 and not set(m0.paths) & set(m1.paths)
    assert m0.num_classes == 0 and m0.k == 4
    m0.save(tmp_path / "u.json")
    ds = FewShotManifest.load(tmp_path / "u.json").materialize()
    assert ds.labels is None and ds.paths == m0.paths and len(ds) == 4
    with pytest.raises(GraftkdError, match="unlabeled"):
        m0.materialize_with_labels()
    with pytest.raises(GraftkdError, match="largest count"):
        make_unlabeled_manifest(root, n=4, seed=1, subset=2)
    all_images = make_unlabeled_manifest(root)
    assert len(all_images.paths) == 10 and all_images.paths == sorted(all_images.paths)


# ------------------------------------------------------------------------------------ augmentation
def _reference_crop_flip(x, oy, ox, flips, padding):
    n, c, h, w = x.shape
    padded = torch.zeros((n, c, h + 2 * padding, w + 2 * padding), dtype=x.dtype)
    padded[:, :, padding : padding + h, padding : padding + w] = x
    out = torch.empty_like(x)
    for i in range(n):
        crop = padded[i, :, oy[i] : oy[i] + h, ox[i] : ox[i] + w]
        out[i] = crop.flip(-1) if flips[i] else crop
    return out


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
@pytest.mark.parametrize("padding", [0, 1, 4])
def test_crop_flip_matches_reference(dtype, padding):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, 256, (16, 3, 8, 6), generator=g).to(dtype)
    out = random_crop_flip(x, padding=padding, flip=True, generator=torch.Generator().manual_seed(11))
    oy, ox, flips = crop_flip_params(16, padding, True, torch.Generator().manual_seed(11))
    assert out.dtype == dtype and out.shape == x.shape and out.device == x.device
    assert torch.equal(out, _reference_crop_flip(x, oy, ox, flips, padding))
    assert torch.equal(apply_crop_flip(x, oy, ox, flips, padding), out)


def test_crop_flip_properties():
    x = torch.rand(512, 3, 8, 8)
    a = random_crop_flip(x, 2, True, torch.Generator().manual_seed(1))
    b = random_crop_flip(x, 2, True, torch.Generator().manual_seed(1))
    c = random_crop_flip(x, 2, True, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    flipped = random_crop_flip(x, 0, True, torch.Generator().manual_seed(3))
    is_flip = (flipped == x.flip(-1)).flatten(1).all(1)
    is_same = (flipped == x).flatten(1).all(1)
    assert torch.all(is_flip ^ is_same)
    assert 0.4 < is_flip.float().mean().item() < 0.6
    # offsets cover the whole range and zero padding shows up
    oy, ox, _ = crop_flip_params(2000, 4, False, torch.Generator().manual_seed(0))
    assert set(oy.tolist()) == set(range(9)) and set(ox.tolist()) == set(range(9))
    assert random_crop_flip(x, 0, False) is x
    assert Augment(0, False).is_identity and Augment(0, False).apply(x) is x
    out = Augment(4, True)(x.to(torch.uint8), torch.Generator().manual_seed(0))
    assert out.dtype == torch.uint8
    empty = random_crop_flip(x[:0], 4, True)
    assert empty.shape == (0, 3, 8, 8)
    with pytest.raises(GraftkdError, match="padding"):
        random_crop_flip(x, -1)
    with pytest.raises(GraftkdError, match=r"\(N, C, H, W\)"):
        random_crop_flip(x[0])


def test_crop_flip_channels_last():
    x = torch.randint(0, 256, (8, 3, 6, 6), dtype=torch.uint8)
    xc = x.contiguous(memory_format=torch.channels_last)
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    out = random_crop_flip(xc, 2, True, g1)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, random_crop_flip(x, 2, True, g2))


def test_default_augment():
    assert default_augment("cifar10/train") == Augment(4, True)
    assert default_augment("digits") == Augment(1, False)
    assert default_augment(None, image_size=64) == Augment(8, True)


# ------------------------------------------------------------------------------------ normalisation
def test_normalizer_uint8_and_float_agree():
    x = torch.randint(0, 256, (4, 3, 5, 5), dtype=torch.uint8)
    norm = Normalizer.for_dataset("cifar10")
    a, b = norm(x), norm(x.float() / 255)
    assert a.dtype == torch.float32 and torch.allclose(a, b, atol=1e-6)
    mean, std = DATASET_STATS["cifar10"]
    ref = (x.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(a, ref, atol=1e-6)
    cl = norm(x.contiguous(memory_format=torch.channels_last))
    assert cl.is_contiguous(memory_format=torch.channels_last) and torch.allclose(cl, a)
    assert norm(x.half() / 255).dtype == torch.float16
    with pytest.raises(GraftkdError, match="channel"):
        Normalizer.for_dataset("digits")(x)
    assert stats_for("cifar100/test") == DATASET_STATS["cifar100"]
    assert DATASET_STATS["imagenet"] == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    with pytest.raises(GraftkdError, match="channel_stats"):
        stats_for("mnist")
    assert set(dict(norm.named_buffers())) == {"mean", "std"}


def test_no_model_imports():
    import graftkd.data as data_pkg

    src = Path(data_pkg.__file__).parent
    for f in src.glob("*.py"):
        text = f.read_text()
        assert "graftkd.models" not in text and "torchvision" not in text, f.name


def test_no_warnings_on_clean_load(image_tree):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_image_folder(image_tree, "train")
