"""Builders of hostile upload files: pickles that would run code, zip bombs, unsafe archive
entries, decompression bombs, truncated and polyglot files, arrays of the wrong kind.

Every builder takes a :class:`Target` (the clean images the upload pretends to perturb, and the
marker file a pickle payload would create) and returns the bytes to upload.
"""

from __future__ import annotations

import io
import pickle
import stat
import struct
import zipfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save as safetensors_save


@dataclass(frozen=True)
class Target:
    names: list[str]
    images: np.ndarray
    marker: Path
    """A file that exists only if some payload was unpickled (code ran)."""


class WritesMarker:
    """Unpickling this calls ``open(marker, "w")``: the file proves that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (self.marker, "w"))


# --- Generic pieces ---------------------------------------------------------------------------


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def npy(array: np.ndarray, *, allow_pickle: bool = False) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


def npz(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()


def zipped(entries: Iterable[tuple[str | zipfile.ZipInfo, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries:
            archive.writestr(name, data)
    return buffer.getvalue()


def png_entries(t: Target, prefix: str = "") -> list[tuple[str | zipfile.ZipInfo, bytes]]:
    return [(prefix + name, png(image)) for name, image in zip(t.names, t.images, strict=True)]


def chw_floats(images: np.ndarray, dtype: type[np.floating] = np.float32) -> np.ndarray:
    return (images.transpose(0, 3, 1, 2).astype(np.float64) / 255).astype(dtype)


def torch_bytes(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _patch_u32(raw: bytearray, offset: int, value: int) -> None:
    raw[offset : offset + 4] = struct.pack("<I", value)


def declare_sizes(content: bytes, entry: int, size: int) -> bytes:
    """``content`` with the uncompressed size of its ``entry``-th member rewritten to ``size``
    in both the local header and the central directory (the data stays as it is)."""
    raw = bytearray(content)
    local = [i for i in range(len(raw)) if raw.startswith(b"PK\x03\x04", i)]
    central = [i for i in range(len(raw)) if raw.startswith(b"PK\x01\x02", i)]
    _patch_u32(raw, local[entry] + 22, size)
    _patch_u32(raw, central[entry] + 24, size)
    return bytes(raw)


# --- Pickles ----------------------------------------------------------------------------------


def object_npy(t: Target) -> bytes:
    payload = np.empty(len(t.names), dtype=object)
    payload[:] = [WritesMarker(t.marker) for _ in t.names]
    return npy(payload, allow_pickle=True)


def object_npz(t: Target) -> bytes:
    payload = np.array([WritesMarker(t.marker), None], dtype=object)
    buffer = io.BytesIO()
    np.savez(buffer, images=payload)
    return buffer.getvalue()


def raw_pickle(t: Target) -> bytes:
    return pickle.dumps({"images": WritesMarker(t.marker)})


def torch_pickle(t: Target) -> bytes:
    """``torch.save`` of an object whose ``__reduce__`` runs code: a zip holding data.pkl."""
    return torch_bytes({"linear.weight": WritesMarker(t.marker)})


def zip_with_pickle_as_png(t: Target) -> bytes:
    entries = png_entries(t)
    entries[0] = (t.names[0], pickle.dumps(WritesMarker(t.marker)))
    return zipped(entries)


def zip_with_pickle_file(t: Target) -> bytes:
    return zipped([*png_entries(t), ("payload.pkl", pickle.dumps(WritesMarker(t.marker)))])


# --- Zip bombs and unsafe entries -------------------------------------------------------------

GIB = 1024**3


def zip_declaring_1gib(t: Target) -> bytes:
    """An image entry whose headers declare 1 GiB (its data is 8 MiB of zeros)."""
    entries = png_entries(t)
    entries[0] = (t.names[0], bytes(8 * 1024 * 1024))
    return declare_sizes(zipped(entries), 0, GIB)


def zip_bomb_honest(t: Target) -> bytes:
    """64 MiB of zeros, honestly declared, compressed to about 64 KiB."""
    return zipped([*png_entries(t), ("padding.bin", bytes(64 * 1024 * 1024))])


def zip_bomb_lying(t: Target) -> bytes:
    """An image entry that inflates to 64 MiB while its headers declare 2 KiB."""
    entries = png_entries(t)
    entries[0] = (t.names[0], bytes(64 * 1024 * 1024))
    return declare_sizes(zipped(entries), 0, 2048)


def zip_many_entries(t: Target) -> bytes:
    return zipped([*png_entries(t), *((f"junk/{i:05d}.txt", b"") for i in range(5000))])


def zip_deeply_nested(t: Target) -> bytes:
    return zipped(png_entries(t, prefix="d/" * 300))


def zip_of_zips(t: Target) -> bytes:
    inner = zipped(png_entries(t))
    for _ in range(3):
        inner = zipped([("batch.zip", inner)])
    return inner


def zip_entry_named(bad: str) -> object:
    def build(t: Target) -> bytes:
        entries = png_entries(t)
        entries[0] = (bad + t.names[0], entries[0][1])
        return zipped(entries)

    return build


def zip_with_symlink(t: Target) -> bytes:
    entries = png_entries(t)
    link = zipfile.ZipInfo(t.names[0])
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    entries[0] = (link, b"/etc/passwd")
    return zipped(entries)


# --- Images -----------------------------------------------------------------------------------


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb() -> bytes:
    """An 8-bit RGB PNG declaring 20000 x 20000 pixels (1.2 GB decoded), a few hundred bytes."""
    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    rows = zlib.compress((b"\0" + bytes(20000 * 3)) * 4)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", rows)
        + _png_chunk(b"IEND", b"")
    )


def zip_with_png_bomb(t: Target) -> bytes:
    entries = png_entries(t)
    entries[0] = (t.names[0], png_bomb())
    return zipped(entries)


def zip_with_truncated_png(t: Target) -> bytes:
    entries = png_entries(t)
    entries[0] = (t.names[0], entries[0][1][:60])
    return zipped(entries)


def truncated_zip(t: Target) -> bytes:
    content = zipped(png_entries(t))
    return content[: len(content) // 2]


def truncated_npy(t: Target) -> bytes:
    return npy(t.images)[:-1000]


def png_with_zip_appended(t: Target) -> bytes:
    """A polyglot: a valid PNG that is also a valid zip of the batch (the index sits at the end)."""
    return png(t.images[0]) + zipped(png_entries(t))


def png_renamed(t: Target) -> bytes:
    return png(t.images[0])


# --- Arrays -----------------------------------------------------------------------------------


def floats_out_of_range(t: Target) -> bytes:
    return npy(chw_floats(t.images, np.float64) * 255)


def as_dtype(dtype: type) -> object:
    def build(t: Target) -> bytes:
        return npy(t.images.astype(dtype))

    return build


def with_value(value: float) -> object:
    def build(t: Target) -> bytes:
        floats = chw_floats(t.images)
        floats[3, 1, 2, 3] = value
        return npy(floats)

    return build


def wrong_shape(t: Target) -> bytes:
    return npy(t.images[..., 0])


def wrong_count(t: Target) -> bytes:
    return npy(np.concatenate([t.images, t.images[:1]]))


def hwc_floats(t: Target) -> bytes:
    return npy(t.images.astype(np.float32) / 255)


def valid_npy(t: Target) -> bytes:
    return npy(t.images)


def npz_with_pickle_and_images(t: Target) -> bytes:
    """An npz whose ``images`` is fine but which also carries a pickled array."""
    payload = np.array([WritesMarker(t.marker)], dtype=object)
    buffer = io.BytesIO()
    np.savez(buffer, images=payload, extra=t.images)
    return buffer.getvalue()


# --- Checkpoints ------------------------------------------------------------------------------


def state_with(state: dict[str, torch.Tensor], **changes: torch.Tensor) -> dict[str, torch.Tensor]:
    return {**state, **changes}


def safetensors_bytes(state: dict[str, torch.Tensor]) -> bytes:
    return safetensors_save({k: v.contiguous() for k, v in state.items()})


def torch_zip_with_deflated_storage(state: dict[str, torch.Tensor], inflated: int) -> bytes:
    """``torch.save(state)`` rewritten so the first tensor's storage is a deflated entry of
    ``inflated`` zero bytes: a zip bomb in .pt clothing (torch.save itself never compresses)."""
    original = zipfile.ZipFile(io.BytesIO(torch_bytes(state)))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as rebuilt:
        for info in original.infolist():
            data = original.read(info)
            if info.filename.endswith("/data/0"):
                rebuilt.writestr(info.filename, bytes(inflated), zipfile.ZIP_DEFLATED)
            else:
                rebuilt.writestr(info, data)
    return out.getvalue()


def torch_zip_declaring(state: dict[str, torch.Tensor], size: int) -> bytes:
    """``torch.save(state)`` whose first storage record declares ``size`` bytes (stored)."""
    content = torch_bytes(state)
    names = [info.filename for info in zipfile.ZipFile(io.BytesIO(content)).infolist()]
    return declare_sizes(
        content, next(i for i, n in enumerate(names) if n.endswith("/data/0")), size
    )


def safetensors_huge_header() -> bytes:
    return struct.pack("<Q", 2**60) + b"{}"
