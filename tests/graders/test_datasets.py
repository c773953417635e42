"""Tests for graders.datasets: CIFAR-10 reading (fake layout), selection, formats, downloads."""

from __future__ import annotations

import csv
import io
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from graders.datasets import (
    CIFAR10_CLASSES,
    SYNTHETIC_CLASSES,
    EvalSet,
    find_cifar10,
    load_cifar10,
    load_eval_set,
    make_synthetic,
    save_eval_set,
    select_balanced,
    write_npz_download,
    write_png_zip,
)

# --- A fake cifar-10-batches-py -------------------------------------------------------------------


_PurePythonPickler: Any = pickle._Pickler


class _Python2StylePickler(_PurePythonPickler):
    """Writes bytes and str as Python 2's cPickle wrote str (BINSTRING), like the real files."""

    dispatch = _PurePythonPickler.dispatch.copy()

    def _save_py2_string(self, obj: bytes | str) -> None:
        raw = obj.encode("ascii") if isinstance(obj, str) else obj
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_string
    dispatch[str] = _save_py2_string


def _python2_style_dumps(obj: Any) -> bytes:
    buffer = io.BytesIO()
    _Python2StylePickler(buffer, protocol=2).dump(obj)
    # The real files were written by numpy 1.x, whose arrays pickle via numpy.core.
    return buffer.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def _fake_batch(count: int, seed: int, batch_label: bytes) -> dict[bytes, Any]:
    rng = np.random.default_rng(seed)
    return {
        b"batch_label": batch_label,
        b"labels": [int(v) for v in rng.integers(0, 10, size=count)],
        b"data": rng.integers(0, 256, size=(count, 3072), dtype=np.uint8),
        b"filenames": [f"img_{seed}_{i}.png".encode() for i in range(count)],
    }


def _make_fake_cifar(parent: Path, dumps: Any = _python2_style_dumps) -> dict[str, dict]:
    """Write a small cifar-10-batches-py under ``parent``; returns the batches by file name."""
    folder = parent / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = {
        f"data_batch_{i}": _fake_batch(20, i, f"training batch {i} of 5".encode())
        for i in range(1, 6)
    }
    batches["test_batch"] = _fake_batch(80, 99, b"testing batch 1 of 1")
    for name, batch in batches.items():
        (folder / name).write_bytes(dumps(batch))
    meta = {
        b"label_names": [name.encode() for name in CIFAR10_CLASSES],
        b"num_cases_per_batch": 20,
        b"num_vis": 3072,
    }
    (folder / "batches.meta").write_bytes(dumps(meta))
    return batches


def _expected_images(batch: dict[bytes, Any]) -> np.ndarray:
    return batch[b"data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


@pytest.mark.parametrize(
    "dumps",
    [
        _python2_style_dumps,
        lambda obj: pickle.dumps(obj, protocol=2),
        lambda obj: pickle.dumps(obj, protocol=4),
        lambda obj: pickle.dumps(obj, protocol=5),
    ],
    ids=["python2-style", "protocol2", "protocol4", "protocol5"],
)
def test_load_cifar10_test_split_is_hwc_uint8(tmp_path: Path, dumps: Any) -> None:
    batches = _make_fake_cifar(tmp_path, dumps)
    images, labels = load_cifar10(tmp_path, "test")
    assert images.dtype == np.uint8 and images.shape == (80, 32, 32, 3)
    assert labels.dtype == np.int64
    np.testing.assert_array_equal(images, _expected_images(batches["test_batch"]))
    np.testing.assert_array_equal(labels, batches["test_batch"][b"labels"])


def test_load_cifar10_accepts_the_batches_folder_itself(tmp_path: Path) -> None:
    batches = _make_fake_cifar(tmp_path)
    images, _ = load_cifar10(tmp_path / "cifar-10-batches-py")
    np.testing.assert_array_equal(images, _expected_images(batches["test_batch"]))


def test_load_cifar10_train_split_concatenates_the_five_batches_in_order(tmp_path: Path) -> None:
    batches = _make_fake_cifar(tmp_path)
    images, labels = load_cifar10(tmp_path, "train")
    names = [f"data_batch_{i}" for i in range(1, 6)]
    np.testing.assert_array_equal(
        images, np.concatenate([_expected_images(batches[n]) for n in names])
    )
    np.testing.assert_array_equal(labels, sum((batches[n][b"labels"] for n in names), []))


def test_load_cifar10_names_a_missing_batch(tmp_path: Path) -> None:
    _make_fake_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        load_cifar10(tmp_path, "train")


def test_load_cifar10_without_data_raises_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        load_cifar10(tmp_path)


def test_load_cifar10_rejects_an_unknown_split(tmp_path: Path) -> None:
    _make_fake_cifar(tmp_path)
    with pytest.raises(ValueError, match="split"):
        load_cifar10(tmp_path, "validation")


def test_load_cifar10_rejects_other_class_names(tmp_path: Path) -> None:
    _make_fake_cifar(tmp_path)
    meta = {b"label_names": [b"apple", b"aquarium_fish"] + [b"x"] * 8}
    (tmp_path / "cifar-10-batches-py" / "batches.meta").write_bytes(_python2_style_dumps(meta))
    with pytest.raises(ValueError, match="batches.meta"):
        load_cifar10(tmp_path)


def test_load_cifar10_rejects_a_batch_with_wrong_row_length(tmp_path: Path) -> None:
    _make_fake_cifar(tmp_path)
    bad = {b"data": np.zeros((4, 100), dtype=np.uint8), b"labels": [0, 1, 2, 3]}
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(_python2_style_dumps(bad))
    with pytest.raises(ValueError, match="test_batch"):
        load_cifar10(tmp_path)


class _WritesMarker:
    """Unpickling this runs code: it creates the file ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


def test_a_pickle_that_runs_code_is_refused_and_does_not_run(tmp_path: Path) -> None:
    _make_fake_cifar(tmp_path)
    marker = tmp_path / "pwned"
    payload = pickle.dumps({b"data": _WritesMarker(marker), b"labels": [0]}, protocol=2)
    pickle.loads(payload)  # the payload is live: a plain unpickler runs it
    assert marker.exists()
    marker.unlink()

    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(payload)
    with pytest.raises(ValueError, match="refus"):
        load_cifar10(tmp_path)
    assert not marker.exists()


def test_find_cifar10_returns_the_first_usable_candidate(tmp_path: Path) -> None:
    empty, missing, parent = tmp_path / "empty", tmp_path / "missing", tmp_path / "data"
    empty.mkdir()
    _make_fake_cifar(parent)
    assert find_cifar10([empty, missing, parent]) == parent / "cifar-10-batches-py"
    assert find_cifar10([missing, empty]) is None
    (parent / "cifar-10-batches-py" / "test_batch").unlink()
    assert find_cifar10([parent]) is None


# --- Balanced selection ---------------------------------------------------------------------------


def _indexed_pool(count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Images whose first two bytes encode their index, with random labels."""
    images = np.zeros((count, 32, 32, 3), dtype=np.uint8)
    images[:, 0, 0, 0] = np.arange(count) // 256
    images[:, 0, 0, 1] = np.arange(count) % 256
    labels = np.random.default_rng(seed).integers(0, 10, size=count)
    return images, labels


def _source_index(images: np.ndarray) -> np.ndarray:
    return images[:, 0, 0, 0].astype(np.int64) * 256 + images[:, 0, 0, 1]


def test_select_balanced_picks_the_same_number_of_each_class_in_order() -> None:
    images, labels = _indexed_pool(600)
    eval_set = select_balanced(images, labels, n=50, seed=0, source="fake")
    assert len(eval_set) == 50
    assert np.bincount(eval_set.labels, minlength=10).tolist() == [5] * 10
    picked = _source_index(eval_set.images)
    np.testing.assert_array_equal(labels[picked], eval_set.labels)  # images kept their labels
    order = np.lexsort((picked, eval_set.labels))
    np.testing.assert_array_equal(order, np.arange(50))  # by class, then by original index
    assert eval_set.class_names == CIFAR10_CLASSES
    assert eval_set.source == "fake" and eval_set.synthetic is False


def test_select_balanced_is_reproducible_for_a_seed_and_varies_across_seeds() -> None:
    images, labels = _indexed_pool(600)
    first = select_balanced(images, labels, n=100, seed=3)
    again = select_balanced(images.copy(), labels.copy(), n=100, seed=3)
    other = select_balanced(images, labels, n=100, seed=4)
    np.testing.assert_array_equal(first.images, again.images)
    np.testing.assert_array_equal(first.labels, again.labels)
    assert not np.array_equal(_source_index(first.images), _source_index(other.images))


@pytest.mark.parametrize("n", [0, -10, 15, 1001])
def test_select_balanced_rejects_bad_counts(n: int) -> None:
    images, labels = _indexed_pool(600)
    with pytest.raises(ValueError):
        select_balanced(images, labels, n=n, seed=0)


def test_select_balanced_rejects_a_class_with_too_few_images() -> None:
    images, labels = _indexed_pool(600)
    labels[labels == 7] = 6
    labels[:3] = 7
    with pytest.raises(ValueError, match="horse"):
        select_balanced(images, labels, n=40, seed=0)


# --- EvalSet and its on-disk format ---------------------------------------------------------------


def _small_eval_set(synthetic: bool = True) -> EvalSet:
    images, labels = make_synthetic(2, seed=5)
    return EvalSet(images, labels, SYNTHETIC_CLASSES, synthetic, "synthetic, seed 5")


def test_names_use_the_index_and_class_name() -> None:
    images = np.zeros((12, 32, 32, 3), dtype=np.uint8)
    labels = np.array([0, 1, 2, 3, 4, 5, 6, 3, 8, 9, 0, 1], dtype=np.int64)
    eval_set = EvalSet(images, labels, CIFAR10_CLASSES, False, "")
    assert eval_set.names[0] == "0000_airplane.png"
    assert eval_set.names[7] == "0007_cat.png"
    assert eval_set.names[11] == "0011_automobile.png"
    assert len(eval_set.names) == len(eval_set) == 12


def test_as_tensor_is_nchw_in_unit_range() -> None:
    eval_set = _small_eval_set()
    tensor = eval_set.as_tensor()
    assert tensor.dtype == torch.float32 and tensor.shape == (20, 3, 32, 32)
    expected = torch.from_numpy(eval_set.images).permute(0, 3, 1, 2).float() / 255
    torch.testing.assert_close(tensor, expected)


@pytest.mark.parametrize(
    "change",
    [
        {"images": np.zeros((2, 32, 32, 3), dtype=np.float32)},
        {"images": np.zeros((2, 3, 32, 32), dtype=np.uint8)},
        {"labels": np.array([0, 10], dtype=np.int64)},
        {"labels": np.array([0, -1], dtype=np.int64)},
        {"labels": np.array([0, 1], dtype=np.int32)},
        {"labels": np.array([0], dtype=np.int64)},
        {"class_names": ("a", "b/../c") + CIFAR10_CLASSES[2:]},
        {"class_names": ("cat",) * 10},
    ],
)
def test_eval_set_validates_its_fields(change: dict[str, Any]) -> None:
    fields: dict[str, Any] = {
        "images": np.zeros((2, 32, 32, 3), dtype=np.uint8),
        "labels": np.array([0, 9], dtype=np.int64),
        "class_names": CIFAR10_CLASSES,
        "synthetic": False,
        "source": "",
    }
    EvalSet(**fields)  # the unchanged fields are valid
    with pytest.raises(ValueError):
        EvalSet(**(fields | change))


def test_save_and_load_round_trip_without_pickle(tmp_path: Path) -> None:
    eval_set = _small_eval_set()
    path = tmp_path / "sets" / "eval.npz"
    save_eval_set(eval_set, path)
    assert [p.name for p in path.parent.iterdir()] == ["eval.npz"]  # no temp file left behind
    with np.load(path, allow_pickle=False) as raw:
        assert sorted(raw.files) == ["class_names", "images", "labels", "source", "synthetic"]
        assert all(raw[key].dtype.kind != "O" for key in raw.files)
    loaded = load_eval_set(path)
    np.testing.assert_array_equal(loaded.images, eval_set.images)
    np.testing.assert_array_equal(loaded.labels, eval_set.labels)
    assert loaded.class_names == SYNTHETIC_CLASSES
    assert loaded.synthetic is True and loaded.source == "synthetic, seed 5"


def test_save_replaces_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "eval.npz"
    save_eval_set(_small_eval_set(synthetic=True), path)
    save_eval_set(_small_eval_set(synthetic=False), path)
    assert load_eval_set(path).synthetic is False


def test_load_refuses_an_object_array(tmp_path: Path) -> None:
    eval_set = _small_eval_set()
    path = tmp_path / "evil.npz"
    np.savez(
        path,
        images=eval_set.images,
        labels=eval_set.labels,
        class_names=np.array(list(eval_set.class_names), dtype=object),
        synthetic=np.array(True),
        source=np.array("x"),
    )
    with pytest.raises(ValueError, match="evil.npz"):
        load_eval_set(path)


def test_load_names_the_file_and_the_missing_arrays(tmp_path: Path) -> None:
    path = tmp_path / "partial.npz"
    np.savez(path, images=np.zeros((1, 32, 32, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"partial\.npz.*labels"):
        load_eval_set(path)


def test_load_rejects_a_file_that_is_not_npz(tmp_path: Path) -> None:
    path = tmp_path / "junk.npz"
    path.write_bytes(b"not a zip file at all")
    with pytest.raises(ValueError, match="junk.npz"):
        load_eval_set(path)


def test_load_rejects_invalid_contents_naming_the_file(tmp_path: Path) -> None:
    eval_set = _small_eval_set()
    path = tmp_path / "bad-labels.npz"
    np.savez(
        path,
        images=eval_set.images,
        labels=eval_set.labels + 10,
        class_names=np.array(eval_set.class_names),
        synthetic=np.array(True),
        source=np.array("x"),
    )
    with pytest.raises(ValueError, match=r"bad-labels\.npz.*labels"):
        load_eval_set(path)


# --- Synthetic data -------------------------------------------------------------------------------


def test_make_synthetic_is_deterministic_balanced_and_seed_dependent() -> None:
    images, labels = make_synthetic(30, seed=7)
    again_images, again_labels = make_synthetic(30, seed=7)
    other_images, _ = make_synthetic(30, seed=8)
    assert images.shape == (300, 32, 32, 3) and images.dtype == np.uint8
    assert labels.dtype == np.int64
    assert np.bincount(labels).tolist() == [30] * len(SYNTHETIC_CLASSES)
    np.testing.assert_array_equal(images, again_images)
    np.testing.assert_array_equal(labels, again_labels)
    assert not np.array_equal(images, other_images)
    assert len({image.tobytes() for image in images}) == 300  # no duplicates within a class


def test_make_synthetic_is_not_solved_by_mean_colour() -> None:
    """Colours are random per image, so class means of the pixels are nearly the same."""
    images, labels = make_synthetic(100, seed=0)
    means = np.stack([images[labels == c].mean(axis=(0, 1, 2)) for c in range(10)])
    assert np.ptp(means, axis=0).max() < 25


def test_make_synthetic_rejects_a_non_positive_count() -> None:
    with pytest.raises(ValueError):
        make_synthetic(0, seed=0)


# --- Downloads ------------------------------------------------------------------------------------


def test_png_zip_holds_the_exact_pixels_labels_and_a_readme() -> None:
    eval_set = _small_eval_set(synthetic=True)
    buffer = io.BytesIO()
    write_png_zip(eval_set, buffer)
    with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as archive:
        assert sorted(archive.namelist()) == sorted([*eval_set.names, "labels.csv", "README.txt"])
        for name, expected in zip(eval_set.names, eval_set.images, strict=True):
            assert archive.getinfo(name).compress_type == zipfile.ZIP_DEFLATED
            with Image.open(io.BytesIO(archive.read(name))) as image:
                assert image.format == "PNG" and image.mode == "RGB"
                np.testing.assert_array_equal(np.asarray(image), expected)
        rows = list(csv.DictReader(io.StringIO(archive.read("labels.csv").decode())))
        readme = archive.read("README.txt").decode()
    assert [row["file"] for row in rows] == eval_set.names
    assert [int(row["label"]) for row in rows] == eval_set.labels.tolist()
    assert [row["class_name"] for row in rows] == [
        SYNTHETIC_CLASSES[label] for label in eval_set.labels
    ]
    assert "SYNTHETIC" in readme and "NOT CIFAR-10" in readme
    assert "threat model" in readme and "exact pixel" in readme


def test_png_zip_readme_of_real_data_has_no_synthetic_warning() -> None:
    buffer = io.BytesIO()
    write_png_zip(_small_eval_set(synthetic=False), buffer)
    with zipfile.ZipFile(buffer) as archive:
        assert "SYNTHETIC" not in archive.read("README.txt").decode()


def test_png_zip_is_byte_for_byte_reproducible() -> None:
    first, second = io.BytesIO(), io.BytesIO()
    write_png_zip(_small_eval_set(), first)
    write_png_zip(_small_eval_set(), second)
    assert first.getvalue() == second.getvalue()


def test_npz_download_loads_without_pickle() -> None:
    eval_set = _small_eval_set()
    buffer = io.BytesIO()
    write_npz_download(eval_set, buffer)
    buffer.seek(0)
    with np.load(buffer, allow_pickle=False) as data:
        assert sorted(data.files) == ["class_names", "images", "labels", "names", "synthetic"]
        np.testing.assert_array_equal(data["images"], eval_set.images)
        np.testing.assert_array_equal(data["labels"], eval_set.labels)
        assert data["names"].tolist() == eval_set.names
        assert tuple(data["class_names"].tolist()) == SYNTHETIC_CLASSES
        assert bool(data["synthetic"]) is True
