"""Fuzzing: the config loader and the image-folder reader answer any input with a result or a GraftkdError.

Anything else (KeyError, TypeError, PIL's own exceptions, ...) would reach the user as a traceback.
"""
from __future__ import annotations

import io
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from graftkd.bench import GridConfig, load_grid
from graftkd.data.readers import load_image_folder
from graftkd.errors import GraftkdError
from graftkd.schema import from_mapping

VALID = {
    "name": "fuzz",
    "data": "digits",
    "teacher": {"train": {"arch": "digits_cnn", "epochs": 1}},
    "student": "digits_cnn_half",
    "methods": {"graft": {}, "kd": {"temperature": 2.0}},
    "shots": [1, 5],
    "seeds": [0, 1],
    "curves": {"methods": ["graft"], "shots": 5, "seed": 0, "eval_every": 2},
}
KEYS = [*VALID, "preset", "variation", "augment", "padding", "flip", "mixup", "inherit", "block_epochs",
        "net_epochs", "block_lr", "net_lr", "baseline_lr", "precision", "title", "threads"]

scalars = st.none() | st.booleans() | st.integers(-3, 10**6) | st.floats(allow_nan=True) | st.text(max_size=12)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.text(max_size=8) | st.integers(), inner, max_size=4), max_leaves=12)


@pytest.fixture(autouse=True)
def _subnormals_allowed():
    """Runs seeded earlier in this process flush denormals (a CPU speed setting); hypothesis needs them."""
    import torch

    torch.set_flush_denormal(False)
    yield


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _load(raw) -> None:
    try:
        config = GridConfig.from_dict(raw, "fuzz.yaml")
    except GraftkdError as exc:
        message = str(exc)
        assert message.startswith("fuzz.yaml: ") and "\n" not in message, message
        return
    assert isinstance(config.shots, list) and all(isinstance(k, int) and k > 0 for k in config.shots)
    assert isinstance(config.methods, dict) and config.methods


def test_the_valid_config_loads() -> None:
    config = GridConfig.from_dict(dict(VALID), "fuzz.yaml")
    assert config.shots == [1, 5] and config.teacher["train"]["arch"] == "digits_cnn"


@FUZZ
@given(key=st.sampled_from(KEYS), value=values)
def test_one_key_set_to_anything(key, value) -> None:
    _load({**VALID, key: value})


@FUZZ
@given(raw=st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8), values, max_size=10) | values)
def test_any_mapping_or_value(raw) -> None:
    _load(raw)


@FUZZ
@given(text=st.text(max_size=200))
def test_any_yaml_text(text) -> None:
    directory = Path(tempfile.mkdtemp())
    try:
        path = directory / "grid.yaml"
        path.write_text(text, encoding="utf-8")
        try:
            load_grid(path)
        except GraftkdError as exc:
            assert "\n" not in str(exc)
    finally:
        shutil.rmtree(directory)


@FUZZ
@given(value=values)
def test_nested_schema_paths_are_named(value) -> None:
    from graftkd.bench import CurveSpec

    try:
        spec = from_mapping(CurveSpec, {"methods": ["graft"], "shots": value}, "x.yaml", prefix="curves.")
    except GraftkdError as exc:
        assert "curves." in str(exc)
    else:
        assert isinstance(spec.shots, int) and not isinstance(spec.shots, bool)


def test_yaml_dump_of_the_valid_config_round_trips(tmp_path) -> None:
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(VALID))
    assert load_grid(path).curves == VALID["curves"]


# ------------------------------------------------------------------------------------ image folders
def _png(seed: int, fmt: str) -> bytes:
    array = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


damage = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0.0, 0.99)),
    st.tuples(st.just("flip"), st.integers(0, 10**6)),
    st.tuples(st.just("garbage"), st.binary(max_size=64)),
    st.tuples(st.just("none"), st.just(0)),
)


def _damaged(data: bytes, how) -> bytes:
    kind, arg = how
    if kind == "truncate":
        return data[: int(len(data) * arg)]
    if kind == "flip":
        position = arg % len(data)
        return data[:position] + bytes([data[position] ^ 0xFF]) + data[position + 1:]
    if kind == "garbage":
        return arg
    return data


@FUZZ
@given(files=st.lists(st.tuples(st.sampled_from(["a", "b"]), st.sampled_from(["PNG", "JPEG", "BMP"]), damage),
                      min_size=1, max_size=6),
       policy=st.sampled_from(["error", "skip"]))
def test_image_folder_reader_reports_bad_files_by_path(files, policy) -> None:
    root = Path(tempfile.mkdtemp())
    try:
        damaged = set()
        for index, (cls, fmt, how) in enumerate(files):
            path = root / cls / f"img{index}.{fmt.lower()}"
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(_damaged(_png(index, fmt), how))
            if how[0] != "none":
                damaged.add(f"{cls}/{path.name}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                images = load_image_folder(root, on_bad_image=policy)
            except GraftkdError as exc:
                message = str(exc)
                assert "\n" not in message
                if "cannot decode" in message or "unreadable" in message:
                    assert any(name in message for name in damaged), message
                return
        assert images.images.dtype.is_floating_point is False
        # a flipped header byte can make a valid image of another size; only a kept damaged file may do that
        assert images.images.shape[1:] == (3, 8, 8) or damaged - set(images.skipped)
        assert set(images.skipped) <= damaged  # only damaged files are ever skipped...
        assert len(images) + len(images.skipped) == len(files)  # ...and every file is accounted for
        if policy == "error":
            assert not images.skipped
    finally:
        shutil.rmtree(root)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_a_truncated_file_is_named_in_the_error(tmp_path, fmt) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "ok.png").write_bytes(_png(0, "PNG"))
    bad = tmp_path / "a" / f"cut.{fmt.lower()}"
    bad.write_bytes(_png(1, fmt)[:40])
    with pytest.raises(GraftkdError, match=f"a/cut.{fmt.lower()}"):
        load_image_folder(tmp_path)


def test_a_size_mismatch_names_the_odd_file_even_when_it_sorts_first(tmp_path) -> None:
    (tmp_path / "a").mkdir()
    for index in range(3):
        (tmp_path / "a" / f"good{index}.png").write_bytes(_png(index, "PNG"))
    big = np.zeros((16, 8, 3), dtype=np.uint8)
    Image.fromarray(big).save(tmp_path / "a" / "aaa_odd.png")
    with pytest.raises(GraftkdError, match=r"1 of 4 images differ from the common size 8x8 \(a/aaa_odd.png is 8x16\)"):
        load_image_folder(tmp_path)
