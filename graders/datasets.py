"""Evaluation sets: building them from CIFAR-10 or a synthetic stand-in, and their on-disk formats.

CIFAR-10 batches are read with a restricted unpickler that can only rebuild numpy arrays.
"""

from __future__ import annotations

import csv
import importlib
import io
import os
import pickle
import re
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from PIL import Image

CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)

SYNTHETIC_CLASSES: tuple[str, ...] = (
    "disc",
    "ring",
    "square",
    "triangle",
    "hstripes",
    "vstripes",
    "dstripes",
    "checkerboard",
    "cross",
    "dots",
)

IMAGE_SHAPE: tuple[int, int, int] = (32, 32, 3)
CIFAR10_FOLDER = "cifar-10-batches-py"

_CLASS_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
# Fixed timestamp for zip members so the same eval set always gives the same bytes.
_ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)
README_NAME = "README.txt"
LABELS_NAME = "labels.csv"
DOWNLOAD_EXTRA_FILES = frozenset({README_NAME, LABELS_NAME})
"""Files of the clean-image zip besides the images; uploads may contain them unchanged."""


class Cifar10Split(StrEnum):
    """The two splits shipped in ``cifar-10-batches-py``."""

    TRAIN = "train"
    TEST = "test"


_SPLIT_FILES: dict[Cifar10Split, tuple[str, ...]] = {
    Cifar10Split.TRAIN: tuple(f"data_batch_{i}" for i in range(1, 6)),
    Cifar10Split.TEST: ("test_batch",),
}


@dataclass(frozen=True, eq=False)
class EvalSet:
    """A fixed set of labelled 32x32 RGB images that submissions are evaluated on.

    ``images`` is uint8 N x 32 x 32 x 3 (HWC, the exact pixels students download), ``labels`` is
    int64 N with values indexing ``class_names``. ``synthetic`` marks procedural stand-in data that
    is not CIFAR-10; ``source`` says in words where the images came from.
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    synthetic: bool
    source: str

    def __post_init__(self) -> None:
        if not isinstance(self.images, np.ndarray) or not isinstance(self.labels, np.ndarray):
            raise ValueError("images and labels must be numpy arrays")
        if self.images.dtype != np.uint8:
            raise ValueError(f"images must be uint8, got {self.images.dtype}")
        if self.images.ndim != 4 or self.images.shape[1:] != IMAGE_SHAPE:
            raise ValueError(f"images must be N x 32 x 32 x 3, got {self.images.shape}")
        if len(self.images) == 0:
            raise ValueError("an eval set needs at least one image")
        if self.labels.dtype != np.int64:
            raise ValueError(f"labels must be int64, got {self.labels.dtype}")
        if self.labels.shape != (len(self.images),):
            raise ValueError(
                f"labels must have shape ({len(self.images)},), got {self.labels.shape}"
            )
        if not isinstance(self.class_names, tuple) or not self.class_names:
            raise ValueError("class_names must be a non-empty tuple of strings")
        for name in self.class_names:
            if not isinstance(name, str) or not _CLASS_NAME_RE.fullmatch(name):
                raise ValueError(
                    f"class name {name!r} must be letters, digits, '_' or '-' (used in file names)"
                )
        if len(set(self.class_names)) != len(self.class_names):
            raise ValueError(f"class_names has duplicates: {self.class_names}")
        low, high = int(self.labels.min()), int(self.labels.max())
        if low < 0 or high >= len(self.class_names):
            raise ValueError(
                f"labels must lie in [0, {len(self.class_names) - 1}], got [{low}, {high}]"
            )
        if not isinstance(self.synthetic, bool):
            raise ValueError("synthetic must be a bool")
        if not isinstance(self.source, str):
            raise ValueError("source must be a string")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def names(self) -> list[str]:
        """File names of the images in the downloads, e.g. ``0007_cat.png``, in index order."""
        return [
            f"{index:04d}_{self.class_names[label]}.png"
            for index, label in enumerate(self.labels.tolist())
        ]

    def as_tensor(self) -> torch.Tensor:
        """The images as a float32 N x 3 x 32 x 32 tensor in [0, 1], the models' input format."""
        return images_to_tensor(self.images)


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 N x H x W x C pixels as a float32 N x C x H x W tensor in [0, 1] (model input)."""
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"expected uint8 N x H x W x C images, got {images.dtype} {images.shape}")
    floats = images.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255.0)
    return torch.from_numpy(np.ascontiguousarray(floats))


def save_eval_set(eval_set: EvalSet, path: Path) -> None:
    """Write ``eval_set`` to ``path`` as a pickle-free ``.npz``, atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez_compressed(
                handle,
                images=eval_set.images,
                labels=eval_set.labels,
                class_names=np.array(eval_set.class_names, dtype=np.str_),
                synthetic=np.array(eval_set.synthetic, dtype=np.bool_),
                source=np.array(eval_set.source, dtype=np.str_),
            )
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_eval_set(path: Path) -> EvalSet:
    """Read an eval set written by :func:`save_eval_set`; never unpickles anything."""
    path = Path(path)
    keys = ("images", "labels", "class_names", "synthetic", "source")
    try:
        loaded = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise
    except (OSError, zipfile.BadZipFile, EOFError, ValueError) as exc:
        raise ValueError(f"eval set {path} is not a pickle-free .npz file: {exc}") from exc
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise ValueError(f"eval set {path} holds a single array, not an .npz archive")
    try:
        with loaded:
            arrays = {key: loaded[key] for key in keys if key in loaded.files}
    except (OSError, zipfile.BadZipFile, EOFError, ValueError) as exc:
        raise ValueError(f"eval set {path} cannot be read without pickle: {exc}") from exc
    missing = [key for key in keys if key not in arrays]
    if missing:
        raise ValueError(f"eval set {path} lacks the arrays {missing}")

    class_names, synthetic, source = (
        arrays["class_names"],
        arrays["synthetic"],
        arrays["source"],
    )
    if class_names.dtype.kind != "U" or class_names.ndim != 1:
        raise ValueError(f"eval set {path}: class_names must be a 1-D unicode array")
    if synthetic.dtype != np.bool_ or synthetic.ndim != 0:
        raise ValueError(f"eval set {path}: synthetic must be a boolean scalar array")
    if source.dtype.kind != "U" or source.ndim != 0:
        raise ValueError(f"eval set {path}: source must be a unicode scalar array")
    try:
        return EvalSet(
            images=arrays["images"],
            labels=arrays["labels"],
            class_names=tuple(str(name) for name in class_names),
            synthetic=bool(synthetic),
            source=str(source),
        )
    except ValueError as exc:
        raise ValueError(f"eval set {path} is invalid: {exc}") from exc


# --- CIFAR-10 -------------------------------------------------------------------------------------


def _numpy_attr(module_names: Sequence[str], name: str) -> Any:
    """The first ``module.name`` that imports, so numpy 1.x (``core``) and 2.x (``_core``) work."""
    for module_name in module_names:
        try:
            return getattr(importlib.import_module(module_name), name)
        except (ImportError, AttributeError):
            continue
    raise ImportError(f"none of {list(module_names)} provides {name}")


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """Stand-in for ``_codecs.encode`` as protocol-2 pickles use it for bytes; latin-1 only."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("only latin-1 encoding of text is allowed in CIFAR-10 files")
    return text.encode("latin1")


def _allowed_globals() -> dict[tuple[str, str], Callable[..., Any] | type]:
    reconstruct = _numpy_attr(("numpy._core.multiarray", "numpy.core.multiarray"), "_reconstruct")
    frombuffer = _numpy_attr(("numpy._core.numeric", "numpy.core.numeric"), "_frombuffer")
    allowed: dict[tuple[str, str], Callable[..., Any] | type] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{package}.numeric", "_frombuffer")] = frombuffer
    return allowed


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that can rebuild numpy arrays and plain containers, and nothing else."""

    _allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: only numpy arrays are allowed"
            ) from None


def _read_pickle(path: Path) -> Any:
    """Load one CIFAR-10 pickle (Python 2 era, hence ``encoding='bytes'``) without running code."""
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR-10 file {path} is missing")
    with path.open("rb") as handle:
        try:
            return _NumpyOnlyUnpickler(handle, encoding="bytes").load()
        except pickle.UnpicklingError as exc:
            raise ValueError(f"CIFAR-10 file {path} was refused: {exc}") from exc
        except Exception as exc:  # corrupt pickles raise many kinds of error
            raise ValueError(f"CIFAR-10 file {path} is not a readable pickle: {exc}") from exc


def _field(batch: dict[Any, Any], key: str) -> Any:
    """``batch[b"key"]`` as the original files have it, or ``batch["key"]`` for re-pickled ones."""
    if key.encode() in batch:
        return batch[key.encode()]
    if key in batch:
        return batch[key]
    raise KeyError(key)


def _resolve_cifar10_folder(root: Path) -> Path | None:
    """The ``cifar-10-batches-py`` folder at or directly under ``root``, if one looks right."""
    root = Path(root)
    for folder in (root / CIFAR10_FOLDER, root):
        if folder.is_dir() and any(
            (folder / name).is_file() for name in ("test_batch", "data_batch_1", "batches.meta")
        ):
            return folder
    return None


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    batch = _read_pickle(path)
    if not isinstance(batch, dict):
        raise ValueError(f"CIFAR-10 file {path} holds a {type(batch).__name__}, not a dict")
    try:
        data, labels = _field(batch, "data"), _field(batch, "labels")
    except KeyError as exc:
        raise ValueError(f"CIFAR-10 file {path} has no {exc.args[0]!r} entry") from None
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise ValueError(f"CIFAR-10 file {path}: 'data' must be a uint8 N x 3072 array")
    if data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"CIFAR-10 file {path}: 'data' rows have {data.shape[1]} values, not 3072")
    try:
        label_array = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"CIFAR-10 file {path}: 'labels' are not integers") from exc
    if label_array.shape != (len(data),):
        raise ValueError(f"CIFAR-10 file {path}: {label_array.size} labels for {len(data)} images")
    if label_array.size and (label_array.min() < 0 or label_array.max() >= len(CIFAR10_CLASSES)):
        raise ValueError(f"CIFAR-10 file {path}: labels must lie in [0, 9]")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), label_array


def _check_meta(folder: Path) -> None:
    """Refuse a folder whose ``batches.meta`` names other classes (CIFAR-100, a relabelled copy)."""
    meta_path = folder / "batches.meta"
    if not meta_path.is_file():
        return
    meta = _read_pickle(meta_path)
    try:
        raw_names = _field(meta, "label_names") if isinstance(meta, dict) else None
    except KeyError:
        raw_names = None
    if not isinstance(raw_names, list):
        raise ValueError(f"CIFAR-10 file {meta_path} has no list of 'label_names'")
    names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in raw_names)
    if names != CIFAR10_CLASSES:
        raise ValueError(f"CIFAR-10 file {meta_path} names classes {names}, not {CIFAR10_CLASSES}")


def load_cifar10(
    root: Path, split: Cifar10Split | str = Cifar10Split.TEST
) -> tuple[np.ndarray, np.ndarray]:
    """Read a CIFAR-10 split from the ``cifar-10-batches-py`` layout, safely.

    ``root`` is that folder or its parent. Returns uint8 N x 32 x 32 x 3 images (HWC) and int64
    labels. The pickles are read with an unpickler that only rebuilds numpy arrays, so a tampered
    file raises ValueError instead of running code.
    """
    try:
        split = Cifar10Split(split)
    except ValueError:
        raise ValueError(
            f"unknown CIFAR-10 split {split!r}; use one of {[s.value for s in Cifar10Split]}"
        ) from None
    folder = _resolve_cifar10_folder(Path(root))
    if folder is None:
        raise FileNotFoundError(
            f"no CIFAR-10 data at {root}: expected {Path(root) / CIFAR10_FOLDER} "
            f"or a folder holding test_batch / data_batch_1..5"
        )
    for name in _SPLIT_FILES[split]:
        if not (folder / name).is_file():
            raise FileNotFoundError(f"CIFAR-10 file {folder / name} is missing ({split} split)")
    _check_meta(folder)
    parts = [_read_batch(folder / name) for name in _SPLIT_FILES[split]]
    images = np.concatenate([part[0] for part in parts])
    labels = np.concatenate([part[1] for part in parts])
    return images, labels


def find_cifar10(candidates: Iterable[Path]) -> Path | None:
    """The ``cifar-10-batches-py`` folder of the first candidate holding one with a test split.

    Each candidate may be that folder or its parent; None when no candidate has the data.
    """
    for candidate in candidates:
        folder = _resolve_cifar10_folder(Path(candidate))
        if folder is not None and (folder / "test_batch").is_file():
            return folder
    return None


def select_balanced(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    n: int,
    seed: int,
    class_names: tuple[str, ...] = CIFAR10_CLASSES,
    synthetic: bool = False,
    source: str = "",
) -> EvalSet:
    """Pick ``n / len(class_names)`` images of each class at random, reproducibly.

    The result is ordered by class, then by original index, so the same data, ``n`` and ``seed``
    always give identical arrays on any platform.
    """
    num_classes = len(class_names)
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0 or n % num_classes:
        raise ValueError(f"n must be a positive multiple of {num_classes}, got {n!r}")
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) != len(images):
        raise ValueError(f"{len(labels)} labels for {len(images)} images")
    if labels.dtype.kind not in "iu":
        raise ValueError(f"labels must be integers, got {labels.dtype}")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes - 1}]")
    per_class = n // num_classes
    rng = np.random.default_rng(seed)
    chosen: list[np.ndarray] = []
    for label in range(num_classes):
        candidates = np.flatnonzero(labels == label)
        if len(candidates) < per_class:
            raise ValueError(
                f"class {class_names[label]!r} has {len(candidates)} images, {per_class} are needed"
            )
        picked = candidates[rng.permutation(len(candidates))[:per_class]]
        chosen.append(np.sort(picked))
    index = np.concatenate(chosen)
    return EvalSet(
        images=np.ascontiguousarray(images[index]),
        labels=labels[index].astype(np.int64),
        class_names=tuple(class_names),
        synthetic=synthetic,
        source=source,
    )


# --- Synthetic stand-in ---------------------------------------------------------------------------


def _synthetic_masks(label: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """Boolean count x 32 x 32 foreground masks for one class of :data:`SYNTHETIC_CLASSES`."""
    size = IMAGE_SHAPE[0]
    y = np.arange(size, dtype=np.int32).reshape(1, size, 1)
    x = np.arange(size, dtype=np.int32).reshape(1, 1, size)

    def draw(low: int, high: int) -> np.ndarray:
        """One integer in [low, high] per image, shaped to broadcast over the pixel grid."""
        return rng.integers(low, high + 1, size=count).reshape(count, 1, 1).astype(np.int32)

    def centre(margin: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A random centre keeping ``margin`` pixels inside the image on every side."""
        span = size - 2 * margin
        cy = margin + (rng.random(count).reshape(count, 1, 1) * span).astype(np.int32)
        cx = margin + (rng.random(count).reshape(count, 1, 1) * span).astype(np.int32)
        return cy, cx

    name = SYNTHETIC_CLASSES[label]
    if name == "disc":
        radius = draw(7, 12)
        cy, cx = centre(radius)
        return (y - cy) ** 2 + (x - cx) ** 2 <= radius**2 + radius
    if name == "ring":
        radius, width = draw(9, 13), draw(2, 4)
        cy, cx = centre(radius)
        d2 = (y - cy) ** 2 + (x - cx) ** 2
        inner = radius - width
        return (d2 <= radius**2 + radius) & (d2 > inner**2 + inner)
    if name == "square":
        half = draw(6, 11)
        cy, cx = centre(half + 1)
        return (np.abs(y - cy) <= half) & (np.abs(x - cx) <= half)
    if name == "triangle":
        half = draw(7, 12)
        cy, cx = centre(half + 1)
        up = np.where(rng.random(count) < 0.5, 1, -1).reshape(count, 1, 1).astype(np.int32)
        dy = (y - cy) * up
        return (np.abs(dy) <= half) & (2 * np.abs(x - cx) <= dy + half)
    if name == "cross":
        arm, thick = draw(7, 12), draw(1, 2)
        cy, cx = centre(arm + 1)
        dy, dx = np.abs(y - cy), np.abs(x - cx)
        return ((dx <= thick) & (dy <= arm)) | ((dy <= thick) & (dx <= arm))
    if name in ("hstripes", "vstripes", "dstripes"):
        period, phase = draw(4, 8), draw(0, 7)
        if name == "hstripes":
            coord = y + 0 * x
        elif name == "vstripes":
            coord = x + 0 * y
        else:
            sign = np.where(rng.random(count) < 0.5, 1, -1).reshape(count, 1, 1).astype(np.int32)
            coord = x + sign * y + size
        return (coord + phase) % period < period // 2
    if name == "checkerboard":
        cell, py, px = draw(3, 6), draw(0, 5), draw(0, 5)
        return ((y + py) // cell + (x + px) // cell) % 2 == 0
    if name == "dots":
        period, radius, py, px = draw(6, 9), draw(1, 2), draw(0, 8), draw(0, 8)
        dy = (y + py) % period - period // 2
        dx = (x + px) % period - period // 2
        return dy**2 + dx**2 <= radius**2
    raise ValueError(f"no drawing for synthetic class {label}")


def make_synthetic(n_per_class: int, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A procedural 10-class 32x32 RGB data set (:data:`SYNTHETIC_CLASSES`), NOT CIFAR-10.

    For offline demos and tests: each class is a shape or texture drawn at a random position and
    scale in random, well-contrasted colours with mild pixel noise, so a small CNN learns it in a
    few epochs while a linear model on raw pixels does clearly worse. The same ``seed`` gives
    identical arrays. Returns uint8 N x 32 x 32 x 3 images and int64 labels, shuffled.
    """
    if isinstance(n_per_class, bool) or not isinstance(n_per_class, int) or n_per_class <= 0:
        raise ValueError(f"n_per_class must be a positive integer, got {n_per_class!r}")
    rng = np.random.default_rng(seed)
    num_classes = len(SYNTHETIC_CLASSES)
    total = num_classes * n_per_class
    images = np.empty((total, *IMAGE_SHAPE), dtype=np.uint8)
    labels = np.repeat(np.arange(num_classes, dtype=np.int64), n_per_class)
    for label in range(num_classes):
        rows = slice(label * n_per_class, (label + 1) * n_per_class)
        mask = _synthetic_masks(label, n_per_class, rng)[..., None]
        background = rng.integers(0, 256, size=(n_per_class, 1, 1, 3), dtype=np.int32)
        # Every channel of the foreground differs from the background by at least 70 levels.
        offset = rng.integers(70, 187, size=(n_per_class, 1, 1, 3), dtype=np.int32)
        foreground = (background + offset) % 256
        noise = rng.integers(-12, 13, size=(n_per_class, *IMAGE_SHAPE), dtype=np.int32)
        pixels = np.where(mask, foreground, background) + noise
        images[rows] = np.clip(pixels, 0, 255).astype(np.uint8)
    order = rng.permutation(total)
    return np.ascontiguousarray(images[order]), labels[order]


# --- Downloads ------------------------------------------------------------------------------------


def _zip_info(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=_ZIP_DATE_TIME)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = 0o644 << 16
    return info


def _readme(eval_set: EvalSet) -> str:
    lines = [
        "Evaluation images",
        "=================",
        "",
        f"{len(eval_set)} RGB images, 32x32 pixels, 8 bits per channel, one PNG each.",
        "File names are <index>_<class name>.png; labels.csv lists file, label and class_name.",
        f"Classes (label = position): {', '.join(eval_set.class_names)}.",
        f"Source: {eval_set.source or 'not recorded'}.",
        "",
        "The threat model (perturbation budget) is checked against these exact pixel values:",
        "perturb these images, not a re-downloaded or re-encoded copy, and keep your outputs",
        "as lossless 8-bit images in the same order.",
    ]
    if eval_set.synthetic:
        lines += [
            "",
            "WARNING: these images are SYNTHETIC procedural shapes and textures, NOT CIFAR-10.",
            "They stand in for CIFAR-10 where the real data set is not available.",
        ]
    return "\n".join(lines) + "\n"


def write_png_zip(eval_set: EvalSet, fileobj: BinaryIO) -> None:
    """Write the eval set as a zip of lossless PNGs plus ``labels.csv`` and ``README.txt``.

    Member names are ``eval_set.names``; the archive bytes depend only on the eval set.
    """
    names = eval_set.names
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(["file", "label", "class_name"])
    for name, label in zip(names, eval_set.labels.tolist(), strict=True):
        writer.writerow([name, label, eval_set.class_names[label]])
    with zipfile.ZipFile(fileobj, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(_zip_info(README_NAME), _readme(eval_set))
        archive.writestr(_zip_info(LABELS_NAME), table.getvalue())
        for name, image in zip(names, eval_set.images, strict=True):
            buffer = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="PNG")
            archive.writestr(_zip_info(name), buffer.getvalue())


def write_npz_download(eval_set: EvalSet, fileobj: BinaryIO) -> None:
    """Write the eval set as a pickle-free ``.npz`` for students: images, labels and names."""
    np.savez_compressed(
        fileobj,
        images=eval_set.images,
        labels=eval_set.labels,
        names=np.array(eval_set.names, dtype=np.str_),
        class_names=np.array(eval_set.class_names, dtype=np.str_),
        synthetic=np.array(eval_set.synthetic, dtype=np.bool_),
    )
