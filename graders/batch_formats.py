"""Parsing of an uploaded attack batch (zip of PNGs, .npy, .npz) into the canonical uint8
N x 32 x 32 x 3 array the grader scores, rejecting anything malformed or hostile on the way.

Accepted formats (``ACCEPTED_FORMATS`` below is this table as data; the README links here):

======  ==================================  =====================================================
Format  File                                Content
======  ==================================  =====================================================
zip     ``batch.zip``                       One PNG per clean image, named exactly as in the
                                            clean download (``0007_cat.png``), 32 x 32, 8-bit
                                            RGB without alpha. Files may sit at the top level or
                                            inside one single folder; macOS/Windows junk
                                            (``__MACOSX/``, ``.DS_Store``, ``._*``,
                                            ``Thumbs.db``) is ignored, and so are the
                                            download's README.txt and labels.csv. Deflate or
                                            no compression.
npy     ``batch.npy`` (``np.save``)         uint8, shape N x 32 x 32 x 3 (HWC), values 0-255;
                                            or float16/32/64, shape N x 3 x 32 x 32 (CHW),
                                            values in [0, 1]. Images in clean-download order.
npz     ``batch.npz`` (``np.savez``)        One array as in the npy row, under the key
                                            ``images`` or as the only array in the file.
======  ==================================  =====================================================

Floats are converted with ``np.rint(x * 255)``: rounding to the nearest 1/255 step, so a float
perturbation of exactly 8/255 stays 8 and the threat model is checked on exactly what is scored.
Pickled (object) arrays are never loaded.
"""

from __future__ import annotations

import io
import stat
import struct
import tokenize
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import IO, Any, NoReturn

import numpy as np
from PIL import Image

from graders.datasets import DOWNLOAD_EXTRA_FILES
from graders.errors import SubmissionRejected

IMAGE_SIDE = 32
HWC_SHAPE = (IMAGE_SIDE, IMAGE_SIDE, 3)
CHW_SHAPE = (3, IMAGE_SIDE, IMAGE_SIDE)
MAX_LISTED = 20
"""How many offending names a rejection lists; the total count is always given too."""

HEAD_BYTES = 8
"""How many leading bytes ``detect_format`` needs."""

ACCEPTED_FORMATS: tuple[dict[str, str], ...] = (
    {
        "format": "zip",
        "extension": ".zip",
        "content": "one 32 x 32 8-bit RGB PNG per image, named as in the clean download",
    },
    {
        "format": "npy",
        "extension": ".npy",
        "content": "uint8 N x 32 x 32 x 3 (0-255) or float N x 3 x 32 x 32 in [0, 1]",
    },
    {
        "format": "npz",
        "extension": ".npz",
        "content": "one array as for npy, under the key 'images' or alone in the file",
    },
)

_ACCEPTED_EXTENSIONS = tuple(entry["extension"] for entry in ACCEPTED_FORMATS)
_ACCEPTED_TEXT = (
    "Accepted uploads: a .zip of PNG images, or a NumPy array saved with np.save (.npy) "
    "or np.savez (.npz)."
)
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # an archive with entries, an empty archive
_NPY_MAGIC = b"\x93NUMPY"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

_JUNK_DIRS = frozenset({"__MACOSX"})
_JUNK_FILES = frozenset({".DS_Store", "Thumbs.db", "desktop.ini"})
_ARCHIVE_SUFFIXES = (".zip", ".npz", ".tar", ".gz", ".tgz", ".bz2", ".xz", ".7z", ".rar")
_ALLOWED_COMPRESSION = frozenset({zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED})

# End-of-central-directory records (APPNOTE 4.3.14-4.3.16), read before zipfile parses the index.
_EOCD = struct.Struct("<4s4H2LH")
_EOCD64_LOCATOR = struct.Struct("<4sLQL")
_EOCD64 = struct.Struct("<4sQ2H2L4Q")
_MAX_INDEX_BYTES_PER_ENTRY = 1024
"""Central-directory bytes allowed per entry: a real record is 46 bytes plus name and extras."""

_PNG_COLOR_TYPES = {0: "grayscale", 2: "RGB", 3: "palette", 4: "grayscale with alpha", 6: "RGBA"}

# Errors that the zip, numpy and Pillow readers raise on malformed input.
_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, OSError, EOFError)
_READ_ERRORS = (*_ZIP_ERRORS, ValueError, struct.error, NotImplementedError, RuntimeError)


class BatchFormat(StrEnum):
    """The container an attack batch arrives in."""

    ZIP_PNG = "zip"
    NPY = "npy"
    NPZ = "npz"


@dataclass(frozen=True)
class BatchLimits:
    """Resource caps applied while reading an upload, before anything is decoded in full.

    ``max_zip_entries`` bounds the archive index, ``max_uncompressed_bytes`` the bytes a zip (or
    npz) may expand to, in total, both as declared by its headers and as actually read, and
    ``max_png_bytes`` a single PNG entry. The upload's own size is capped by the server.
    """

    max_zip_entries: int
    max_uncompressed_bytes: int
    max_png_bytes: int = 64 * 1024

    def __post_init__(self) -> None:
        for name in ("max_zip_entries", "max_uncompressed_bytes", "max_png_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")

    @classmethod
    def for_batch(cls, n_images: int) -> BatchLimits:
        """Limits for a batch of ``n_images``, generous for every real tool, tight for bombs.

        - entries: ``2 * n + 16``. macOS "Compress" adds an ``__MACOSX/._name`` entry per file,
          plus a few folder entries and ``.DS_Store`` files.
        - uncompressed: ``32 KiB * n + 1 MiB``. The largest legitimate payload per image is a
          float64 CHW array (3 * 32 * 32 * 8 = 24 KiB); a 32 x 32 RGB PNG holds at most ~3 KiB
          of pixel data plus metadata, and a macOS ``._`` entry is ~4 KiB. 1 MiB covers the
          fixed overhead (npy headers, junk files, an embedded colour profile or two).
        - one PNG: 64 KiB, twenty times the pixel data, room for text and colour-profile chunks.
        """
        if isinstance(n_images, bool) or not isinstance(n_images, int) or n_images <= 0:
            raise ValueError(f"n_images must be a positive int, got {n_images!r}")
        return cls(
            max_zip_entries=2 * n_images + 16,
            max_uncompressed_bytes=32 * 1024 * n_images + 1024 * 1024,
        )


def detect_format(filename: str, head: bytes) -> BatchFormat:
    """Identify the upload's format from its first bytes, and insist the file name agrees.

    Magic bytes decide the container (zip or npy); the extension then tells a zip of PNGs from
    an npz. Anything else, or a name that contradicts the content, is refused (HTTP 415).
    """
    if not head:
        _reject(
            "empty_file",
            f"{_shown(filename)} is empty (0 bytes). Check that the file was written completely "
            "before uploading it again.",
            status=400,
        )
    suffix = Path(filename).suffix.lower()
    shown = _shown(filename)
    named = f"its name ends in '{_shown(suffix)}'" if suffix else "its name has no extension"
    if head.startswith(_ZIP_MAGIC):
        found = {".zip": BatchFormat.ZIP_PNG, ".npz": BatchFormat.NPZ}.get(suffix)
        message = (
            f"{shown} is a zip archive but {named}. Name a zip of PNG images *.zip and a file "
            "written by np.savez *.npz."
        )
    elif head.startswith(_NPY_MAGIC):
        found = BatchFormat.NPY if suffix == ".npy" else None
        message = f"{shown} is a NumPy array written by np.save but {named}. Rename it to *.npy."
    else:
        found = None
        message = f"{shown} is {_describe_unknown(head)}, which the grader does not read."
        if head.startswith(_PNG_SIGNATURE):
            message += " Put all the PNG images of the batch into one .zip and upload that."
    if found is not None:
        return found
    _reject(
        "unsupported_format",
        f"{message} {_ACCEPTED_TEXT}",
        {"filename": shown, "accepted": list(_ACCEPTED_EXTENSIONS)},
        status=415,
    )


def read_batch(
    path: Path,
    filename: str,
    *,
    expected_names: Sequence[str],
    limits: BatchLimits,
) -> np.ndarray:
    """Parse the upload at ``path`` into a C-contiguous uint8 N x 32 x 32 x 3 array.

    ``filename`` is the name the student uploaded (its extension must match the content),
    ``expected_names`` the clean set's image names, in the order the rows are returned. Any
    problem a student can fix raises ``SubmissionRejected``; nothing is extracted to disk.
    """
    names = [str(n) for n in expected_names]
    if not names:
        raise ValueError("expected_names is empty")
    if len(set(names)) != len(names):
        raise ValueError("expected_names contains duplicates")
    with path.open("rb") as f:
        fmt = detect_format(filename, f.read(HEAD_BYTES))
        f.seek(0)
        if fmt is BatchFormat.ZIP_PNG:
            batch = _read_png_zip(f, names, limits)
        elif fmt is BatchFormat.NPY:
            batch = _read_npy_file(f, len(names))
        else:
            batch = _read_npz(f, len(names), limits)
    return np.ascontiguousarray(batch, dtype=np.uint8)


# ---------------------------------------------------------------------------------------------
# Zip containers (shared by zip-of-PNGs and npz)


@dataclass(frozen=True)
class _Member:
    """A regular, non-junk file of an archive, with its name cleaned of a leading ``./``."""

    name: str
    info: zipfile.ZipInfo


def _open_zip(f: IO[bytes], limits: BatchLimits) -> zipfile.ZipFile:
    """Open an uploaded archive after checking its index is small enough to parse."""
    _check_index_size(f, limits)
    try:
        return zipfile.ZipFile(f)
    except (*_ZIP_ERRORS, ValueError, struct.error, NotImplementedError) as exc:
        _reject(
            "corrupt_archive",
            f"The zip archive cannot be read ({_reason(exc)}). Create it again with a standard "
            "tool (zip -r, Finder's Compress, Windows' Send to > Compressed folder, "
            "shutil.make_archive or np.savez) and upload the new file.",
            {"reason": _reason(exc)},
        )


def _check_index_size(f: IO[bytes], limits: BatchLimits) -> None:
    """Reject an archive whose index claims too many entries, before zipfile loads the index.

    zipfile reads the whole central directory into memory and builds one object per entry, so
    the entry count and index size are read from the end-of-central-directory record first.
    """
    f.seek(0, io.SEEK_END)
    size = f.tell()
    tail_start = max(0, size - (_EOCD.size + 0xFFFF))
    f.seek(tail_start)
    tail = f.read()
    # The record sits at the very end unless the archive has a comment (zipfile's own order).
    pos = len(tail) - _EOCD.size
    if not (pos >= 0 and tail[pos : pos + 4] == b"PK\x05\x06" and tail[-2:] == b"\0\0"):
        pos = tail.rfind(b"PK\x05\x06")
    if pos < 0 or pos + _EOCD.size > len(tail):
        return  # no readable record: zipfile reports the archive as corrupt
    _, _, _, _, entries, index_bytes, _, _ = _EOCD.unpack_from(tail, pos)
    # zipfile prefers a zip64 record whenever a locator precedes the record above, whatever the
    # classic record says; check every record it could pick and keep the largest claims.
    locator_at = tail_start + pos - _EOCD64_LOCATOR.size
    if locator_at >= 0:
        f.seek(locator_at)
        locator = f.read(_EOCD64_LOCATOR.size)
        if locator[:4] == b"PK\x06\x07":
            _, _, record_offset, _ = _EOCD64_LOCATOR.unpack(locator)
            claims = []
            for offset in {record_offset, locator_at - _EOCD64.size}:
                if offset < 0:
                    continue
                f.seek(offset)
                record = f.read(_EOCD64.size)
                if len(record) == _EOCD64.size and record[:4] == b"PK\x06\x06":
                    fields = _EOCD64.unpack(record)
                    claims.append((fields[7], fields[8]))
            if claims:
                entries = max(c[0] for c in claims)
                index_bytes = max(c[1] for c in claims)
    f.seek(0)
    _check_entry_count(entries, limits)
    max_index = limits.max_zip_entries * _MAX_INDEX_BYTES_PER_ENTRY
    if index_bytes > max_index:
        _reject(
            "too_many_entries",
            f"The zip's table of contents is {index_bytes} bytes, more than the {max_index} "
            f"bytes that {limits.max_zip_entries} files with ordinary names need. Zip only the "
            "image files, with the names from the clean download.",
            {"index_bytes": int(index_bytes), "max_index_bytes": max_index},
        )


def _check_entry_count(entries: int, limits: BatchLimits) -> None:
    if entries > limits.max_zip_entries:
        _reject(
            "too_many_entries",
            f"The zip holds {entries} entries, more than the {limits.max_zip_entries} allowed "
            "for this batch. Zip only the image files of the batch, nothing else.",
            {"entries": int(entries), "max_entries": limits.max_zip_entries},
        )


def _archive_members(zf: zipfile.ZipFile, limits: BatchLimits) -> list[_Member]:
    """Check every entry of an open archive; return its regular, non-junk files.

    Refuses unsafe names, symlinks, encryption, compression methods other than deflate/stored,
    duplicates, nested archives, and declared sizes over the limit (a zip bomb's first sign).
    """
    infos = zf.infolist()
    _check_entry_count(len(infos), limits)
    unsafe = [i.orig_filename for i in infos if _is_unsafe_name(i.orig_filename)]
    if unsafe:
        _reject(
            "unsafe_entry_name",
            f"The zip contains {len(unsafe)} entries with unsafe paths "
            f"({_listing(unsafe)}): absolute paths, '..', backslashes, drive letters or NUL "
            "characters are not allowed. Zip the image files (or the one folder holding them) "
            "from inside their parent folder, e.g. `cd parent && zip -r batch.zip images/`.",
            {"entries": _names_detail(unsafe), "entry_count": len(unsafe)},
        )
    links = [i.filename for i in infos if stat.S_ISLNK(i.external_attr >> 16)]
    if links:
        _reject(
            "symlink_entry",
            f"The zip contains symbolic links ({_listing(links)}). Zip the image files "
            "themselves: with the zip command, do not pass -y / --symlinks.",
            {"entries": _names_detail(links), "entry_count": len(links)},
        )
    encrypted = [i.filename for i in infos if i.flag_bits & 0x1]
    if encrypted:
        _reject(
            "encrypted_entry",
            f"The zip contains password-protected entries ({_listing(encrypted)}). Create the "
            "zip again without a password.",
            {"entries": _names_detail(encrypted), "entry_count": len(encrypted)},
        )
    odd_method = [i.filename for i in infos if i.compress_type not in _ALLOWED_COMPRESSION]
    if odd_method:
        _reject(
            "unsupported_compression",
            f"The zip uses a compression method other than deflate for {_listing(odd_method)}. "
            "Create it again with standard zip compression (zip -r, Finder, Windows Explorer, "
            "shutil.make_archive or np.savez_compressed all use it).",
            {"entries": _names_detail(odd_method), "entry_count": len(odd_method)},
        )
    declared = sum(i.file_size for i in infos)
    if declared > limits.max_uncompressed_bytes:
        _reject_too_large(declared, limits.max_uncompressed_bytes)
    members: list[_Member] = []
    seen: set[str] = set()
    duplicates: list[str] = []
    for info in infos:
        name = _strip_dot_prefix(info.filename)
        if info.is_dir() or _is_junk(name):
            continue
        if name in seen:
            duplicates.append(name)
        seen.add(name)
        members.append(_Member(name, info))
    if duplicates:
        _reject(
            "duplicate_entry",
            f"The zip contains the same file more than once ({_listing(duplicates)}). Create "
            "a fresh zip instead of adding to an old one, so each image appears once.",
            {"entries": _names_detail(duplicates), "entry_count": len(duplicates)},
        )
    nested = [m.name for m in members if m.name.lower().endswith(_ARCHIVE_SUFFIXES)]
    if nested:
        _reject(
            "nested_archive",
            f"The zip contains other archives ({_listing(nested)}). Upload one zip holding "
            "the PNG images directly, not a zip of zips.",
            {"entries": _names_detail(nested), "entry_count": len(nested)},
        )
    return members


class _ByteBudget:
    """Bytes an archive may still expand to; charged with what is actually decompressed."""

    def __init__(self, limits: BatchLimits) -> None:
        self.limit = limits.max_uncompressed_bytes
        self.used = 0

    def charge(self, n_bytes: int) -> None:
        self.used += n_bytes
        if self.used > self.limit:
            _reject_too_large(self.used, self.limit)


def _read_member(
    zf: zipfile.ZipFile, member: _Member, max_bytes: int, budget: _ByteBudget
) -> bytes:
    """Read one entry fully, never more than ``max_bytes``, charging it to ``budget``.

    Headers are not trusted: the read itself is bounded, whatever size the entry declares.
    """
    try:
        with zf.open(member.info) as fh:
            data = fh.read(max_bytes + 1)
    except _READ_ERRORS as exc:
        _reject(
            "corrupt_archive",
            f"{_shown(member.name)} in the zip cannot be read ({_reason(exc)}). Create the zip "
            "again with a standard tool and upload the new file.",
            {"entry": _shown(member.name)},
        )
    budget.charge(len(data))
    if len(data) > max_bytes:
        _reject(
            "file_too_large",
            f"{_shown(member.name)} expands to more than {max_bytes} bytes, far more than a "
            "32 x 32 image needs. Save the image again without extra metadata.",
            {"entry": _shown(member.name), "max_bytes": max_bytes},
        )
    return data


def _reject_too_large(total: int, limit: int) -> NoReturn:
    _reject(
        "archive_too_large",
        f"The zip expands to at least {total} bytes, more than the {limit} bytes this batch "
        "can need. Zip only the images of the batch, saved as plain 32 x 32 PNGs (or a single "
        "array).",
        {"uncompressed_bytes": int(total), "max_uncompressed_bytes": limit},
    )


def _is_unsafe_name(name: str) -> bool:
    """An entry name that would escape or confuse an extraction directory."""
    if not name or "\0" in name or "\\" in name or name.startswith("/"):
        return True
    if len(name) >= 2 and name[1] == ":" and name[0].isascii() and name[0].isalpha():
        return True
    return ".." in name.split("/")


def _strip_dot_prefix(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name


def _is_junk(name: str) -> bool:
    """Files that operating systems add to archives (Finder, Explorer), or the clean download's
    README.txt and labels.csv, which students may leave in the folder they zip."""
    parts = name.rstrip("/").split("/")
    base = parts[-1]
    return (
        parts[0] in _JUNK_DIRS
        or base in _JUNK_FILES
        or base in DOWNLOAD_EXTRA_FILES
        or base.startswith("._")
    )


# ---------------------------------------------------------------------------------------------
# Zip of PNGs


def _read_png_zip(f: IO[bytes], names: list[str], limits: BatchLimits) -> np.ndarray:
    with _open_zip(f, limits) as zf:
        members = _archive_members(zf, limits)
        if members and all(m.name.lower().endswith(".npy") for m in members):
            _reject(
                "unsupported_format",
                "This .zip holds .npy arrays, not PNG images. If it was written by np.savez, "
                "rename it to end in .npz; otherwise zip PNG images. " + _ACCEPTED_TEXT,
                {"accepted": list(_ACCEPTED_EXTENSIONS)},
                status=415,
            )
        by_name = _match_names(members, names)
        out = np.empty((len(names), *HWC_SHAPE), dtype=np.uint8)
        budget = _ByteBudget(limits)
        for row, name in enumerate(names):
            member = by_name[name]
            if member.info.file_size > limits.max_png_bytes:
                _reject(
                    "file_too_large",
                    f"{_shown(member.name)} declares {member.info.file_size} bytes, more than "
                    f"the {limits.max_png_bytes} allowed for one 32 x 32 PNG. Save the image "
                    "again without extra metadata.",
                    {"entry": _shown(member.name), "max_bytes": limits.max_png_bytes},
                )
            data = _read_member(zf, member, limits.max_png_bytes, budget)
            out[row] = _decode_png(data, member.name)
    return out


def _match_names(members: list[_Member], names: list[str]) -> dict[str, _Member]:
    """Map each expected image name to its entry, allowing one common top-level folder."""
    by_name = {m.name: m for m in members}
    parts = [m.name.split("/") for m in members]
    if parts and all(len(p) == 2 for p in parts) and len({p[0] for p in parts}) == 1:
        by_name = {p[1]: m for p, m in zip(parts, members, strict=True)}
    expected = set(names)
    unexpected = [m.name for key, m in by_name.items() if key not in expected]
    missing = [n for n in names if n not in by_name]
    details: dict[str, Any] = {
        "unexpected": _names_detail(unexpected),
        "unexpected_count": len(unexpected),
        "missing": _names_detail(missing),
        "missing_count": len(missing),
        "expected_count": len(names),
    }
    if unexpected:
        gap = f" and is missing {len(missing)} of the {len(names)} images" if missing else ""
        _reject(
            "unexpected_files",
            f"The zip contains {len(unexpected)} files that are not images of this batch "
            f"({_listing(unexpected)}){gap}. Name each PNG exactly as in the clean download "
            f"(e.g. {names[0]}), put them at the top level of the zip or inside one single "
            "folder, and include nothing else.",
            details,
        )
    if missing:
        _reject(
            "missing_images",
            f"The zip is missing {len(missing)} of the {len(names)} images "
            f"({_listing(missing)}). Upload every image from the clean download, including "
            "those your attack left unchanged, with its original name.",
            details,
        )
    return by_name


def _decode_png(data: bytes, name: str) -> np.ndarray:
    """Decode one PNG into uint8 32 x 32 x 3, checking its header before any pixel is decoded.

    The IHDR chunk is read directly, so a file declaring a huge size (a decompression bomb) or
    a 16-bit depth (which Pillow would silently reduce to 8 bits) is refused up front.
    """
    shown = _shown(name)
    if not data.startswith(_PNG_SIGNATURE):
        _reject(
            "not_a_png",
            f"{shown} is not a PNG file (it does not start with the PNG signature). Save each "
            "image with a PNG encoder, e.g. PIL.Image.fromarray(x).save(path), instead of "
            "renaming another format to .png.",
            {"entry": shown},
        )
    if len(data) < 33 or data[12:16] != b"IHDR":
        _reject_corrupt_png(shown, "its header chunk is missing")
    width, height, bit_depth, color_type = struct.unpack(">IIBB", data[16:26])
    if (width, height) != (IMAGE_SIDE, IMAGE_SIDE):
        _reject(
            "wrong_image_size",
            f"{shown} is {width} x {height} pixels; every image must be 32 x 32 like the clean "
            "download. Do not resize, crop or pad the images.",
            {"entry": shown, "width": width, "height": height},
        )
    if bit_depth != 8 or color_type != 2:
        kind = _PNG_COLOR_TYPES.get(color_type, f"colour type {color_type}")
        _reject(
            "wrong_image_mode",
            f"{shown} is stored as {bit_depth}-bit {kind}. Save it as an 8-bit RGB PNG without "
            "alpha, e.g. PIL.Image.fromarray(x).save(path) with x a uint8 32 x 32 x 3 array "
            "(or image.convert('RGB') first).",
            {"entry": shown, "bit_depth": bit_depth, "color_type": kind},
        )
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
            if image.size != (IMAGE_SIDE, IMAGE_SIDE) or image.mode != "RGB":
                _reject_corrupt_png(shown, f"it decodes as {image.mode} {image.size}")
            image.load()
            pixels = np.asarray(image, dtype=np.uint8)
    except SubmissionRejected:
        raise
    except (*_READ_ERRORS, SyntaxError, Image.DecompressionBombError) as exc:
        _reject_corrupt_png(shown, _reason(exc))
    if pixels.shape != HWC_SHAPE:
        _reject_corrupt_png(shown, f"it decodes to shape {pixels.shape}")
    return pixels


def _reject_corrupt_png(shown: str, reason: str) -> NoReturn:
    _reject(
        "corrupt_png",
        f"{shown} is truncated or corrupt ({reason}). Save the image again and check it opens "
        "in an image viewer before zipping.",
        {"entry": shown, "reason": reason},
    )


# ---------------------------------------------------------------------------------------------
# NumPy arrays


def _read_npy_file(f: IO[bytes], n_images: int) -> np.ndarray:
    _check_npy_header(f, "The .npy file", n_images)
    f.seek(0)
    return _load_array(f, "The .npy file")


def _read_npz(f: IO[bytes], n_images: int, limits: BatchLimits) -> np.ndarray:
    with _open_zip(f, limits) as zf:
        members = _archive_members(zf, limits)
        not_npy = [m.name for m in members if not m.name.endswith(".npy")]
        if not_npy:
            hint = (
                "A zip of PNG images must be named *.zip. "
                if all(n.lower().endswith(".png") for n in not_npy)
                else ""
            )
            _reject(
                "unsupported_format",
                f"This .npz holds files that are not .npy arrays ({_listing(not_npy)}). "
                f"{hint}Write the .npz with np.savez(path, images=x). {_ACCEPTED_TEXT}",
                {"entries": _names_detail(not_npy), "entry_count": len(not_npy)},
                status=415,
            )
        keys = {m.name[: -len(".npy")]: m for m in members}
        if "images" in keys:
            member = keys["images"]
        elif len(keys) == 1:
            member = next(iter(keys.values()))
        else:
            _reject(
                "unexpected_npz_keys",
                f"The .npz holds {len(keys)} arrays ({_listing(list(keys))}) and none is "
                "called 'images'. Save the batch with np.savez(path, images=x), or save it as "
                "the only array in the file.",
                {"keys": _names_detail(list(keys)), "key_count": len(keys)},
            )
        source = f"The array '{_shown(member.name[: -len('.npy')])}' in the .npz"
        try:
            with zf.open(member.info) as fh:
                _check_npy_header(fh, source, n_images)
            with zf.open(member.info) as fh:
                return _load_array(fh, source)
        except SubmissionRejected:
            raise
        except _READ_ERRORS as exc:
            _reject_corrupt_array(source, _reason(exc))


def _check_npy_header(fh: IO[bytes], source: str, n_images: int) -> None:
    """Validate an .npy header's dtype and shape before any array data is read or allocated."""
    try:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
        else:
            _reject_corrupt_array(source, f"unsupported .npy version {version[0]}.{version[1]}")
    except SubmissionRejected:
        raise
    except (*_READ_ERRORS, SyntaxError, tokenize.TokenError, RecursionError) as exc:
        # numpy parses the header with ast.literal_eval, falling back to tokenize.
        _reject_corrupt_array(source, _reason(exc))
    _check_array_spec(source, tuple(int(d) for d in shape), np.dtype(dtype), n_images)


def _check_array_spec(source: str, shape: tuple[int, ...], dtype: np.dtype, n: int) -> None:
    """Refuse any dtype/shape combination other than uint8 HWC or float CHW with N images."""
    layouts = (
        f"uint8 with shape ({n}, 32, 32, 3) (HWC, values 0-255) or float32 with shape "
        f"({n}, 3, 32, 32) (CHW, values in [0, 1])"
    )
    details: dict[str, Any] = {"shape": list(shape), "dtype": str(dtype), "expected_count": n}
    if dtype.hasobject:
        _reject(
            "object_array",
            f"{source} holds Python objects (dtype {dtype}), which would need unpickling and "
            f"are never loaded. Save a plain numeric array: {layouts}, e.g. "
            "np.save(path, np.asarray(images, dtype=np.uint8)).",
            details,
        )
    is_float = dtype.kind == "f" and dtype.itemsize in (2, 4, 8)
    if dtype != np.uint8 and not is_float:
        _reject(
            "wrong_dtype",
            f"{source} has dtype {dtype}, which is not accepted. Use {layouts}.",
            details,
        )
    if len(shape) != 4 or shape[1:] not in (HWC_SHAPE, CHW_SHAPE):
        _reject(
            "wrong_shape",
            f"{source} has shape {shape}. Use {layouts}.",
            details,
        )
    if shape[0] != n:
        _reject(
            "wrong_count",
            f"{source} holds {shape[0]} images but this batch has {n}. Submit exactly one "
            "perturbed image per clean image, in the clean download's order.",
            details,
        )
    if dtype == np.uint8 and shape[1:] == CHW_SHAPE:
        _reject(
            "wrong_layout",
            f"{source} is uint8 in CHW layout {shape}; uint8 arrays must be HWC "
            f"({n}, 32, 32, 3). Convert with x.transpose(0, 2, 3, 1), or send floats in [0, 1] "
            "in CHW layout instead.",
            details,
        )
    if is_float and shape[1:] == HWC_SHAPE:
        _reject(
            "wrong_layout",
            f"{source} is {dtype} in HWC layout {shape}; float arrays must be CHW "
            f"({n}, 3, 32, 32) like PyTorch tensors. Convert with x.transpose(0, 3, 1, 2), or "
            "send uint8 0-255 in HWC layout instead.",
            details,
        )


def _load_array(fh: IO[bytes], source: str) -> np.ndarray:
    """Load a header-checked .npy stream (never unpickling) and convert it to uint8 HWC."""
    try:
        array = np.load(fh, allow_pickle=False)
    except _READ_ERRORS as exc:
        _reject_corrupt_array(source, _reason(exc))
    if not isinstance(array, np.ndarray):
        _reject_corrupt_array(source, "it is not a single array")
    if array.dtype == np.uint8:
        return array
    return _floats_to_uint8(array, source)


def _floats_to_uint8(array: np.ndarray, source: str) -> np.ndarray:
    """Convert float CHW images in [0, 1] to uint8 HWC by ``np.rint(x * 255)``."""
    finite = np.isfinite(array)
    if not finite.all():
        bad = int(array.size - np.count_nonzero(finite))
        n_nan = int(np.count_nonzero(np.isnan(array)))
        first = int(np.flatnonzero(~finite.reshape(array.shape[0], -1).all(axis=1))[0])
        _reject(
            "non_finite_values",
            f"{source} contains {bad} non-finite values ({n_nan} NaN, {bad - n_nan} infinite), "
            f"the first in image {first}. Replace them (e.g. np.nan_to_num, then np.clip to "
            "[0, 1]) before saving.",
            {"non_finite_count": bad, "nan_count": n_nan, "first_image": first},
        )
    low, high = float(array.min()), float(array.max())
    if low < 0.0 or high > 1.0:
        outside = int(np.count_nonzero((array < 0.0) | (array > 1.0)))
        scale_hint = (
            " The values look like the 0-255 scale: divide by 255, or send uint8 HWC."
            if high > 1.0 and high <= 255.0
            else ""
        )
        _reject(
            "values_out_of_range",
            f"{source} has {outside} values outside [0, 1] (min {low:.6g}, max {high:.6g}). "
            f"Clip the adversarial images to [0, 1] before saving.{scale_hint}",
            {"min": low, "max": high, "out_of_range_count": outside},
        )
    out = np.empty((array.shape[0], *HWC_SHAPE), dtype=np.uint8)
    step = 1024  # bounds the float64 temporary to 24 MiB however large the batch
    for start in range(0, array.shape[0], step):
        chunk = array[start : start + step].astype(np.float64)
        out[start : start + step] = np.rint(chunk * 255.0).astype(np.uint8).transpose(0, 2, 3, 1)
    return out


def _reject_corrupt_array(source: str, reason: str) -> NoReturn:
    _reject(
        "corrupt_array",
        f"{source} cannot be read ({reason}). Save it again with np.save / np.savez and check "
        "that np.load(path) opens it before uploading.",
        {"reason": reason},
    )


# ---------------------------------------------------------------------------------------------
# Messages


def _reject(
    code: str,
    message: str,
    details: dict[str, Any] | None = None,
    *,
    status: int = 422,
) -> NoReturn:
    raise SubmissionRejected(code, message, details, status=status)


def _describe_unknown(head: bytes) -> str:
    """A student-readable guess at what an unsupported upload is."""
    if head.startswith(_PNG_SIGNATURE):
        return "a single PNG image"
    if head.startswith(b"\xff\xd8\xff"):
        return "a JPEG image"
    if head.startswith((b"\x1f\x8b", b"7z\xbc\xaf", b"Rar!")):
        return "a gzip/7z/rar archive"
    if head[:1] == b"\x80":
        return "a Python pickle (e.g. from torch.save or pickle.dump)"
    return "in an unknown format (its first bytes match neither zip nor .npy)"


def _shown(name: str, limit: int = 120) -> str:
    """A file name safe to echo back: control characters escaped, length bounded."""
    text = "".join(ch if ch.isprintable() else f"\\x{ord(ch):02x}" for ch in name[: limit + 1])
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _names_detail(names: Sequence[str]) -> list[str]:
    return [_shown(n) for n in names[:MAX_LISTED]]


def _listing(names: Sequence[str], limit: int = 5) -> str:
    """The first few names for a message; ``details`` carries up to ``MAX_LISTED``."""
    shown = ", ".join(_shown(n) for n in names[:limit])
    return shown if len(names) <= limit else f"{shown}, and {len(names) - limit} more"


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return _shown(text.splitlines()[0] if text.strip() else type(exc).__name__, 200)
