"""Tests for graders.batch_formats: every accepted layout, and every hostile file we can build."""

from __future__ import annotations

import io
import json
import pickle
import stat
import struct
import warnings
import zipfile
import zlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from graders import batch_formats
from graders.batch_formats import (
    ACCEPTED_FORMATS,
    BatchFormat,
    BatchLimits,
    detect_format,
    read_batch,
)
from graders.errors import SubmissionRejected

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
N = 6
NAMES = [f"{i:04d}_{CLASSES[i % len(CLASSES)]}.png" for i in range(N)]
LIMITS = BatchLimits.for_batch(N)


def make_images(n: int = N, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


IMAGES = make_images()


def png_bytes(image: Image.Image | np.ndarray) -> bytes:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def raw_png(width: int, height: int, bit_depth: int, color_type: int, channels: int) -> bytes:
    """A PNG built by hand, for headers Pillow cannot write (16-bit RGB, huge sizes)."""
    row = b"\0" + bytes(width * channels * bit_depth // 8)
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(row * min(height, 32)))
        + png_chunk(b"IEND", b"")
    )


def zip_bytes(
    entries: Iterable[tuple[str | zipfile.ZipInfo, bytes]],
    compression: int = zipfile.ZIP_DEFLATED,
) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # zipfile warns on duplicate names
        with zipfile.ZipFile(buffer, "w", compression) as zf:
            for name, data in entries:
                zf.writestr(name, data)
    return buffer.getvalue()


def png_entries(images: np.ndarray = IMAGES, prefix: str = "") -> list[tuple[str, bytes]]:
    return [(prefix + name, png_bytes(image)) for name, image in zip(NAMES, images, strict=True)]


def npy_bytes(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


def read(
    tmp_path: Path,
    filename: str,
    content: bytes,
    names: list[str] = NAMES,
    limits: BatchLimits = LIMITS,
) -> np.ndarray:
    path = tmp_path / "upload.bin"  # the server's temp file; its name is not the student's
    path.write_bytes(content)
    return read_batch(path, filename, expected_names=names, limits=limits)


def rejected(tmp_path: Path, filename: str, content: bytes, **kwargs: object) -> SubmissionRejected:
    with pytest.raises(SubmissionRejected) as info:
        read(tmp_path, filename, content, **kwargs)  # type: ignore[arg-type]
    json.dumps(info.value.details)  # details must always be JSON-serialisable
    assert info.value.message.strip()
    return info.value


def central_directory_offsets(raw: bytes) -> tuple[list[int], list[int]]:
    """Offsets of every local header and central-directory record in a zip."""
    local = [i for i in range(len(raw)) if raw.startswith(b"PK\x03\x04", i)]
    central = [i for i in range(len(raw)) if raw.startswith(b"PK\x01\x02", i)]
    return local, central


def patch_u32(raw: bytearray, offset: int, value: int) -> None:
    raw[offset : offset + 4] = struct.pack("<I", value)


def to_chw_float(images: np.ndarray, dtype: type[np.floating]) -> np.ndarray:
    return (images.transpose(0, 3, 1, 2).astype(np.float64) / 255).astype(dtype)


# ---------------------------------------------------------------------------------------------
# detect_format


@pytest.mark.parametrize(
    ("filename", "head", "expected"),
    [
        ("batch.zip", b"PK\x03\x04rest", BatchFormat.ZIP_PNG),
        ("BATCH.ZIP", b"PK\x03\x04rest", BatchFormat.ZIP_PNG),
        ("batch.npz", b"PK\x03\x04rest", BatchFormat.NPZ),
        ("batch.npy", b"\x93NUMPY\x01\x00", BatchFormat.NPY),
        ("empty.zip", b"PK\x05\x06", BatchFormat.ZIP_PNG),
    ],
)
def test_detect_format_by_magic_and_extension(
    filename: str, head: bytes, expected: BatchFormat
) -> None:
    assert detect_format(filename, head) is expected


@pytest.mark.parametrize(
    ("filename", "head", "says"),
    [
        ("batch.zip", b"\x93NUMPY\x01\x00", "Rename it to *.npy"),
        ("batch.npz", b"\x93NUMPY\x01\x00", "Rename it to *.npy"),
        ("batch.npy", b"PK\x03\x04", "zip archive but its name ends in '.npy'"),
        ("batch", b"PK\x03\x04", "no extension"),
        ("0001_cat.png", b"\x89PNG\r\n\x1a\n", "Put all the PNG images of the batch into one .zip"),
        ("batch.zip", b"hello, this is text", "unknown format"),
        ("batch.npy", pickle.dumps([1, 2, 3]), "Python pickle"),
        ("photo.zip", b"\xff\xd8\xff\xe0", "JPEG"),
    ],
)
def test_detect_format_rejects_mismatch_and_unknown_with_415(
    filename: str, head: bytes, says: str
) -> None:
    with pytest.raises(SubmissionRejected) as info:
        detect_format(filename, head)
    err = info.value
    assert err.code == "unsupported_format"
    assert err.status == 415
    assert says in err.message
    assert ".zip" in err.message and ".npy" in err.message and ".npz" in err.message
    assert err.details["accepted"] == [".zip", ".npy", ".npz"]


def test_detect_format_empty_file_is_400() -> None:
    with pytest.raises(SubmissionRejected) as info:
        detect_format("batch.zip", b"")
    assert info.value.code == "empty_file"
    assert info.value.status == 400
    assert "batch.zip is empty" in info.value.message


def test_accepted_formats_table_matches_enum() -> None:
    assert [f["format"] for f in ACCEPTED_FORMATS] == [f.value for f in BatchFormat]
    assert batch_formats.__doc__ is not None and "np.rint(x * 255)" in batch_formats.__doc__


@pytest.mark.parametrize(
    ("filename", "content"),
    [
        ("batch.zip", b""),
        ("batch.npy", b""),
    ],
)
def test_read_batch_empty_file(tmp_path: Path, filename: str, content: bytes) -> None:
    err = rejected(tmp_path, filename, content)
    assert (err.code, err.status) == ("empty_file", 400)


@pytest.mark.parametrize("filename", ["batch.zip", "batch.npz", "batch.npy", "0000_airplane.png"])
def test_text_file_renamed_is_unsupported(tmp_path: Path, filename: str) -> None:
    err = rejected(tmp_path, filename, b"these are my adversarial images\n")
    assert (err.code, err.status) == ("unsupported_format", 415)
    assert filename in err.message


# ---------------------------------------------------------------------------------------------
# BatchLimits


def test_limits_for_batch_are_documented_values() -> None:
    limits = BatchLimits.for_batch(500)
    assert limits.max_zip_entries == 2 * 500 + 16
    assert limits.max_uncompressed_bytes == 500 * 32 * 1024 + 1024 * 1024
    assert limits.max_png_bytes == 64 * 1024
    # The largest legitimate payload (float64 CHW) fits.
    assert limits.max_uncompressed_bytes > 500 * 3 * 32 * 32 * 8


@pytest.mark.parametrize("n", [0, -1, True, 2.5])
def test_limits_for_batch_refuses_bad_sizes(n: object) -> None:
    with pytest.raises(ValueError, match="n_images"):
        BatchLimits.for_batch(n)  # type: ignore[arg-type]


def test_limits_refuse_non_positive_fields() -> None:
    with pytest.raises(ValueError, match="max_png_bytes"):
        BatchLimits(max_zip_entries=10, max_uncompressed_bytes=10, max_png_bytes=0)


def test_read_batch_refuses_bad_expected_names(tmp_path: Path) -> None:
    content = zip_bytes(png_entries())
    with pytest.raises(ValueError, match="empty"):
        read(tmp_path, "b.zip", content, names=[])
    with pytest.raises(ValueError, match="duplicates"):
        read(tmp_path, "b.zip", content, names=["a.png", "a.png"])


# ---------------------------------------------------------------------------------------------
# Zip of PNGs: happy paths


def assert_canonical(batch: np.ndarray, expected: np.ndarray = IMAGES) -> None:
    assert batch.dtype == np.uint8
    assert batch.shape == expected.shape
    assert batch.flags.c_contiguous
    np.testing.assert_array_equal(batch, expected)


def test_flat_zip_of_pngs(tmp_path: Path) -> None:
    assert_canonical(read(tmp_path, "batch.zip", zip_bytes(png_entries())))


def test_zip_order_follows_expected_names_not_archive_order(tmp_path: Path) -> None:
    entries = list(reversed(png_entries()))
    assert_canonical(read(tmp_path, "batch.zip", zip_bytes(entries, zipfile.ZIP_STORED)))


def test_zip_with_one_folder_and_macos_junk(tmp_path: Path) -> None:
    entries: list[tuple[str | zipfile.ZipInfo, bytes]] = [("adv/", b"")]
    entries += png_entries(prefix="adv/")
    entries += [
        ("__MACOSX/", b""),
        ("__MACOSX/adv/", b""),
        *[(f"__MACOSX/adv/._{name}", b"\0\x05\x16\x07" + bytes(100)) for name in NAMES],
        ("adv/.DS_Store", b"\0\0\0\1Bud1"),
        (".DS_Store", b"\0\0\0\1Bud1"),
        ("adv/._0000_airplane.png", b"appledouble"),
        ("adv/Thumbs.db", b"windows"),
    ]
    assert_canonical(read(tmp_path, "Archive.zip", zip_bytes(entries)))


def test_zip_with_dot_slash_prefix(tmp_path: Path) -> None:
    assert_canonical(read(tmp_path, "batch.zip", zip_bytes(png_entries(prefix="./"))))


def test_png_with_rgb_transparency_key_and_text_chunk_is_accepted(tmp_path: Path) -> None:
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("Software", "my attack")
    buffer = io.BytesIO()
    Image.fromarray(IMAGES[0]).save(buffer, format="PNG", pnginfo=info, transparency=(0, 0, 0))
    entries = png_entries()
    entries[0] = (NAMES[0], buffer.getvalue())
    assert_canonical(read(tmp_path, "batch.zip", zip_bytes(entries)))


# ---------------------------------------------------------------------------------------------
# Zip of PNGs: archive-level attacks


@pytest.mark.parametrize(
    "bad_name",
    ["../x.png", "adv/../../x.png", "/abs.png", "C:/x.png", "c:x.png", "adv\\0000_airplane.png"],
)
def test_unsafe_entry_names_are_rejected(tmp_path: Path, bad_name: str) -> None:
    err = rejected(tmp_path, "batch.zip", zip_bytes([*png_entries(), (bad_name, b"x")]))
    assert err.code == "unsafe_entry_name"
    assert err.details == {"entries": [bad_name], "entry_count": 1}
    assert bad_name in err.message
    assert "zip -r" in err.message


def test_nul_in_entry_name_is_rejected(tmp_path: Path) -> None:
    raw = zip_bytes([*png_entries(), ("evilXname.png", b"x")])
    raw = raw.replace(b"evilXname.png", b"evil\0name.png")  # zipfile cannot write a NUL itself
    err = rejected(tmp_path, "batch.zip", raw)
    assert err.code == "unsafe_entry_name"
    assert err.details["entries"] == ["evil\\x00name.png"]


def test_symlink_entry_is_rejected(tmp_path: Path) -> None:
    link = zipfile.ZipInfo(NAMES[0])
    link.create_system = 3
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    entries: list[tuple[str | zipfile.ZipInfo, bytes]] = [(link, b"/etc/passwd")]
    entries += png_entries()[1:]
    err = rejected(tmp_path, "batch.zip", zip_bytes(entries))
    assert err.code == "symlink_entry"
    assert err.details["entries"] == [NAMES[0]]
    assert NAMES[0] in err.message


def test_encrypted_entry_is_rejected(tmp_path: Path) -> None:
    raw = bytearray(zip_bytes(png_entries()))
    local, central = central_directory_offsets(bytes(raw))
    raw[local[2] + 6] |= 0x1  # general-purpose flag bit 0: encrypted
    raw[central[2] + 8] |= 0x1
    err = rejected(tmp_path, "batch.zip", bytes(raw))
    assert err.code == "encrypted_entry"
    assert err.details["entries"] == [NAMES[2]]
    assert "without a password" in err.message


def test_bzip2_compression_is_rejected(tmp_path: Path) -> None:
    err = rejected(tmp_path, "batch.zip", zip_bytes(png_entries(), zipfile.ZIP_BZIP2))
    assert err.code == "unsupported_compression"
    assert err.details["entry_count"] == N


def test_nested_zip_is_rejected(tmp_path: Path) -> None:
    inner = zip_bytes(png_entries())
    err = rejected(tmp_path, "batch.zip", zip_bytes([("adv/images.zip", inner)]))
    assert err.code == "nested_archive"
    assert err.details["entries"] == ["adv/images.zip"]


def test_zip_disguised_as_png_is_not_a_png(tmp_path: Path) -> None:
    entries = png_entries()
    entries[3] = (NAMES[3], zip_bytes(png_entries()))
    err = rejected(tmp_path, "batch.zip", zip_bytes(entries))
    assert err.code == "not_a_png"
    assert NAMES[3] in err.message


@pytest.mark.parametrize("second", ["0001_automobile.png", "./0001_automobile.png"])
def test_duplicate_entries_are_rejected(tmp_path: Path, second: str) -> None:
    entries = [*png_entries(), (second, png_bytes(IMAGES[0]))]
    err = rejected(tmp_path, "batch.zip", zip_bytes(entries))
    assert err.code == "duplicate_entry"
    assert err.details["entries"] == ["0001_automobile.png"]


def test_too_many_entries(tmp_path: Path) -> None:
    limits = BatchLimits(max_zip_entries=N + 1, max_uncompressed_bytes=10**7)
    entries = [*png_entries(), ("a/", b""), ("b/", b"")]
    err = rejected(tmp_path, "batch.zip", zip_bytes(entries), limits=limits)
    assert err.code == "too_many_entries"
    assert err.details == {"entries": N + 2, "max_entries": N + 1}


def test_entry_count_is_checked_before_zipfile_parses_the_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = zip_bytes([(f"{i}.png", b"") for i in range(50)], zipfile.ZIP_STORED)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("zipfile.ZipFile must not be reached")

    monkeypatch.setattr(batch_formats.zipfile, "ZipFile", refuse)
    err = rejected(tmp_path, "batch.zip", raw)
    assert err.code == "too_many_entries"
    assert err.details["entries"] == 50


def test_zip64_entry_count_is_checked_before_parsing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = zip_bytes(png_entries(), zipfile.ZIP_STORED)
    eocd = raw.rfind(b"PK\x05\x06")
    _, _, _, _, _, cd_size, cd_offset, _ = struct.unpack_from("<4s4H2LH", raw, eocd)
    record = struct.pack(
        "<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, 10**6, 10**6, cd_size, cd_offset
    )
    locator = struct.pack("<4sLQL", b"PK\x06\x07", 0, eocd, 1)
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, cd_size, cd_offset, 0)
    monkeypatch.setattr(batch_formats.zipfile, "ZipFile", None)
    err = rejected(tmp_path, "batch.zip", raw[:eocd] + record + locator + end)
    assert err.code == "too_many_entries"
    assert err.details["entries"] == 10**6


def test_zip64_record_is_checked_even_when_classic_record_looks_small(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = zip_bytes(png_entries(), zipfile.ZIP_STORED)
    eocd = raw.rfind(b"PK\x05\x06")
    _, _, _, _, count, cd_size, cd_offset, _ = struct.unpack_from("<4s4H2LH", raw, eocd)
    huge = 10**9
    record = struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, 5, 5, huge, cd_offset)
    locator = struct.pack("<4sLQL", b"PK\x06\x07", 0, 0, 1)  # points elsewhere on purpose
    end = raw[eocd:]  # the classic record still says N entries, a small index
    assert count == N
    monkeypatch.setattr(batch_formats.zipfile, "ZipFile", None)
    err = rejected(tmp_path, "batch.zip", raw[:eocd] + record + locator + end)
    assert err.code == "too_many_entries"
    assert err.details["index_bytes"] == huge


def test_oversized_index_is_rejected(tmp_path: Path) -> None:
    limits = BatchLimits(max_zip_entries=2, max_uncompressed_bytes=10**7)
    entries = [("a" * 1500 + ".png", b""), ("b" * 1500 + ".png", b"")]
    err = rejected(tmp_path, "batch.zip", zip_bytes(entries), limits=limits)
    assert err.code == "too_many_entries"
    assert err.details["max_index_bytes"] == 2048


def test_declared_uncompressed_size_over_limit_is_a_bomb(tmp_path: Path) -> None:
    bomb = bytes(20 * 1024 * 1024)  # 20 MiB of zeros, ~20 KiB compressed
    raw = zip_bytes([*png_entries(), ("adv/padding.bin", bomb)])
    assert len(raw) < 100 * 1024
    err = rejected(tmp_path, "batch.zip", raw)
    assert err.code == "archive_too_large"
    assert err.details["max_uncompressed_bytes"] == LIMITS.max_uncompressed_bytes
    assert err.details["uncompressed_bytes"] > 20 * 1024 * 1024


def test_bomb_whose_header_lies_is_never_expanded(tmp_path: Path) -> None:
    bomb = bytes(50 * 1024 * 1024)
    entries = png_entries()
    entries[0] = (NAMES[0], bomb)
    raw = bytearray(zip_bytes(entries))
    local, central = central_directory_offsets(bytes(raw))
    patch_u32(raw, local[0] + 22, 1000)  # uncompressed size in the local header
    patch_u32(raw, central[0] + 24, 1000)  # ... and in the central directory
    with zipfile.ZipFile(io.BytesIO(bytes(raw))) as zf:
        assert zf.infolist()[0].file_size == 1000  # the lie is what zipfile sees
    err = rejected(tmp_path, "batch.zip", bytes(raw))
    # zipfile stops at the declared size, so the CRC no longer matches: never 50 MiB in memory.
    assert err.code == "corrupt_archive"
    assert NAMES[0] in err.message


def test_png_entry_declaring_more_than_png_limit(tmp_path: Path) -> None:
    entries = png_entries()
    entries[1] = (NAMES[1], png_bytes(IMAGES[1]) + bytes(100 * 1024))  # trailing padding
    err = rejected(tmp_path, "batch.zip", zip_bytes(entries))
    assert err.code == "file_too_large"
    assert err.details == {"entry": NAMES[1], "max_bytes": 64 * 1024}


def test_corrupt_archive(tmp_path: Path) -> None:
    raw = zip_bytes(png_entries())
    err = rejected(tmp_path, "batch.zip", raw[: len(raw) // 2])
    assert err.code == "corrupt_archive"
    assert "Create it again" in err.message


def test_corrupt_entry_data_names_the_entry(tmp_path: Path) -> None:
    raw = bytearray(zip_bytes(png_entries(), zipfile.ZIP_STORED))
    local, _ = central_directory_offsets(bytes(raw))
    raw[local[4] + 30 + len(NAMES[4]) + 100] ^= 0xFF  # flip a byte of the stored PNG
    err = rejected(tmp_path, "batch.zip", bytes(raw))
    assert err.code == "corrupt_archive"
    assert err.details == {"entry": NAMES[4]}


# ---------------------------------------------------------------------------------------------
# Zip of PNGs: names


def test_missing_images_are_listed_with_count(tmp_path: Path) -> None:
    err = rejected(tmp_path, "batch.zip", zip_bytes(png_entries()[:2]))
    assert err.code == "missing_images"
    assert err.details["missing"] == NAMES[2:]
    assert err.details["missing_count"] == N - 2
    assert f"missing {N - 2} of the {N} images" in err.message
    assert NAMES[2] in err.message


def test_missing_list_is_capped_at_twenty(tmp_path: Path) -> None:
    names = [NAMES[0], *[f"{i:04d}_cat.png" for i in range(1, 31)]]
    err = rejected(tmp_path, "batch.zip", zip_bytes(png_entries()[:1]), names=names)
    assert err.code == "missing_images"
    assert err.details["missing"] == names[1:21]
    assert err.details["missing_count"] == 30
    assert "and 25 more" in err.message


def test_empty_zip_is_missing_everything(tmp_path: Path) -> None:
    err = rejected(tmp_path, "batch.zip", zip_bytes([]))
    assert err.code == "missing_images"
    assert err.details["missing_count"] == N


def test_extra_file_is_unexpected(tmp_path: Path) -> None:
    err = rejected(tmp_path, "batch.zip", zip_bytes([*png_entries(), ("notes.txt", b"hi")]))
    assert err.code == "unexpected_files"
    assert err.details["unexpected"] == ["notes.txt"]
    assert err.details["missing_count"] == 0
    assert "notes.txt" in err.message


def test_renamed_images_are_unexpected_and_missing(tmp_path: Path) -> None:
    entries = [(f"img_{i}.png", png_bytes(image)) for i, image in enumerate(IMAGES)]
    err = rejected(tmp_path, "batch.zip", zip_bytes(entries))
    assert err.code == "unexpected_files"
    assert err.details["unexpected_count"] == N
    assert err.details["missing_count"] == N
    assert "img_0.png" in err.message
    assert NAMES[0] in err.message  # shows the expected naming


def test_two_folders_are_not_one_common_folder(tmp_path: Path) -> None:
    entries = png_entries(prefix="a/")[:3] + png_entries(prefix="b/")[3:]
    err = rejected(tmp_path, "batch.zip", zip_bytes(entries))
    assert err.code == "unexpected_files"
    assert "a/0000_airplane.png" in err.details["unexpected"]
    assert "one single folder" in err.message


def test_zip_of_npy_files_suggests_npz(tmp_path: Path) -> None:
    raw = zip_bytes([("images.npy", npy_bytes(IMAGES))])
    err = rejected(tmp_path, "batch.zip", raw)
    assert (err.code, err.status) == ("unsupported_format", 415)
    assert ".npz" in err.message


# ---------------------------------------------------------------------------------------------
# Zip of PNGs: individual PNGs


def replace_png(tmp_path: Path, index: int, data: bytes) -> SubmissionRejected:
    entries = png_entries()
    entries[index] = (NAMES[index], data)
    return rejected(tmp_path, "batch.zip", zip_bytes(entries))


@pytest.mark.parametrize(
    ("image", "says"),
    [
        (Image.new("RGBA", (32, 32)), "8-bit RGBA."),
        (Image.new("P", (32, 32)), "palette."),
        (Image.new("L", (32, 32)), "8-bit grayscale."),
        (Image.new("LA", (32, 32)), "8-bit grayscale with alpha."),
        (Image.new("I;16", (32, 32)), "16-bit grayscale."),
        (Image.new("1", (32, 32)), "1-bit grayscale."),
    ],
)
def test_png_modes_other_than_8bit_rgb(tmp_path: Path, image: Image.Image, says: str) -> None:
    err = replace_png(tmp_path, 2, png_bytes(image))
    assert err.code == "wrong_image_mode"
    assert NAMES[2] in err.message and says in err.message
    assert "8-bit RGB PNG without alpha" in err.message


def test_16bit_rgb_png_is_rejected_even_though_pillow_would_read_it(tmp_path: Path) -> None:
    data = raw_png(32, 32, 16, 2, 3)
    assert Image.open(io.BytesIO(data)).mode == "RGB"  # Pillow would silently drop 8 bits
    err = replace_png(tmp_path, 0, data)
    assert err.code == "wrong_image_mode"
    assert err.details == {"entry": NAMES[0], "bit_depth": 16, "color_type": "RGB"}


@pytest.mark.parametrize("size", [(31, 32), (64, 64), (32, 1)])
def test_wrong_png_size(tmp_path: Path, size: tuple[int, int]) -> None:
    err = replace_png(tmp_path, 1, png_bytes(Image.new("RGB", size)))
    assert err.code == "wrong_image_size"
    assert (err.details["width"], err.details["height"]) == size
    assert f"{size[0]} x {size[1]} pixels" in err.message


def test_decompression_bomb_header_is_rejected_before_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = bytearray(png_bytes(IMAGES[0]))
    data[16:24] = struct.pack(">II", 50000, 50000)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("Pillow must not be reached")

    monkeypatch.setattr(batch_formats.Image, "open", refuse)
    err = replace_png(tmp_path, 0, bytes(data))
    assert err.code == "wrong_image_size"
    assert err.details == {"entry": NAMES[0], "width": 50000, "height": 50000}


def test_truncated_png_names_the_file(tmp_path: Path) -> None:
    data = png_bytes(IMAGES[5])
    err = replace_png(tmp_path, 5, data[: len(data) // 2])
    assert err.code == "corrupt_png"
    assert NAMES[5] in err.message
    assert err.details["entry"] == NAMES[5]


def test_png_with_bad_crc_is_corrupt(tmp_path: Path) -> None:
    data = bytearray(png_bytes(IMAGES[0]))
    data[29] ^= 0xFF  # the IHDR CRC
    err = replace_png(tmp_path, 0, bytes(data))
    assert err.code == "corrupt_png"


def test_png_signature_only_is_corrupt(tmp_path: Path) -> None:
    err = replace_png(tmp_path, 0, b"\x89PNG\r\n\x1a\n")
    assert err.code == "corrupt_png"


def test_text_file_named_png_inside_zip(tmp_path: Path) -> None:
    err = replace_png(tmp_path, 4, b"not an image at all")
    assert err.code == "not_a_png"
    assert err.details == {"entry": NAMES[4]}
    assert "renaming" in err.message


# ---------------------------------------------------------------------------------------------
# NumPy: happy paths


def test_uint8_hwc_npy(tmp_path: Path) -> None:
    assert_canonical(read(tmp_path, "batch.npy", npy_bytes(IMAGES)))


def test_fortran_ordered_npy_comes_back_c_contiguous(tmp_path: Path) -> None:
    assert_canonical(read(tmp_path, "batch.npy", npy_bytes(np.asfortranarray(IMAGES))))


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_float_chw_npy_round_trips_exactly(tmp_path: Path, dtype: type[np.floating]) -> None:
    assert_canonical(read(tmp_path, "batch.npy", npy_bytes(to_chw_float(IMAGES, dtype))))


def test_big_endian_float_is_accepted(tmp_path: Path) -> None:
    array = to_chw_float(IMAGES, np.float32).astype(">f4")
    assert_canonical(read(tmp_path, "batch.npy", npy_bytes(array)))


def test_float_perturbation_of_exactly_eps_stays_eps(tmp_path: Path) -> None:
    clean = np.full((N, 32, 32, 3), 100, dtype=np.uint8)
    adv = np.clip(to_chw_float(clean, np.float32) + np.float32(8 / 255), 0, 1)
    batch = read(tmp_path, "batch.npy", npy_bytes(adv.astype(np.float32)))
    assert (batch.astype(int) - 100 == 8).all()


def test_npz_with_images_key_and_other_arrays(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, labels=np.arange(N), images=IMAGES, extra=np.zeros(3))
    assert_canonical(read(tmp_path, "batch.npz", buffer.getvalue()))


def test_npz_single_array_any_key(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, to_chw_float(IMAGES, np.float32))  # stored as arr_0
    assert_canonical(read(tmp_path, "batch.npz", buffer.getvalue()))


# ---------------------------------------------------------------------------------------------
# NumPy: rejections


class WritesMarker:
    """Unpickling this calls open(path, 'w'): the marker file proves code ran."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (self.path, "w"))


def test_object_npy_is_rejected_and_never_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = np.empty(N, dtype=object)
    payload[:] = [WritesMarker(marker) for _ in range(N)]
    content = npy_bytes(payload, allow_pickle=True)
    err = rejected(tmp_path, "batch.npy", content)
    assert err.code == "object_array"
    assert "never loaded" in err.message
    assert not marker.exists()
    # The payload is live: loading it the unsafe way does create the marker.
    np.load(io.BytesIO(content), allow_pickle=True)
    assert marker.exists()


def test_object_array_inside_npz_is_rejected(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = np.array([WritesMarker(marker), None], dtype=object)
    buffer = io.BytesIO()
    np.savez(buffer, images=payload)
    err = rejected(tmp_path, "batch.npz", buffer.getvalue())
    assert err.code == "object_array"
    assert not marker.exists()


def test_pickle_disguised_as_npy_is_never_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    err = rejected(tmp_path, "batch.npy", pickle.dumps(WritesMarker(marker)))
    assert (err.code, err.status) == ("unsupported_format", 415)
    assert "pickle" in err.message
    assert not marker.exists()


def npy_header_only(descr: str, shape: tuple[int, ...]) -> bytes:
    buffer = io.BytesIO()
    header = {"descr": descr, "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue() + bytes(64)


@pytest.mark.parametrize(
    ("descr", "shape", "code"),
    [
        ("|u1", (10**9, 32, 32, 3), "wrong_count"),
        ("<f4", (10**9, 3, 32, 32), "wrong_count"),
        ("|u1", (N, 32, 32, 3 * 10**9), "wrong_shape"),
    ],
)
def test_huge_header_is_rejected_without_allocating(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, descr: str, shape: tuple[int, ...], code: str
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("np.load must not be reached")

    monkeypatch.setattr(batch_formats.np, "load", refuse)
    err = rejected(tmp_path, "batch.npy", npy_header_only(descr, shape))
    assert err.code == code
    assert err.details["shape"] == list(shape)


def test_npy_header_v2_is_read(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    header = {"descr": "|u1", "fortran_order": False, "shape": (N, 32, 32, 3)}
    np.lib.format.write_array_header_2_0(buffer, header)
    assert_canonical(read(tmp_path, "batch.npy", buffer.getvalue() + IMAGES.tobytes()))


def test_truncated_npy_data(tmp_path: Path) -> None:
    content = npy_bytes(IMAGES)
    err = rejected(tmp_path, "batch.npy", content[:-100])
    assert err.code == "corrupt_array"
    assert "np.load" in err.message


def test_garbled_npy_header(tmp_path: Path) -> None:
    err = rejected(tmp_path, "batch.npy", b"\x93NUMPY\x01\x00\x10\x00{'descr': evil()}\n")
    assert err.code == "corrupt_array"


def test_wrong_image_count(tmp_path: Path) -> None:
    err = rejected(tmp_path, "batch.npy", npy_bytes(IMAGES[:4]))
    assert err.code == "wrong_count"
    assert f"holds 4 images but this batch has {N}" in err.message
    assert err.details["expected_count"] == N


@pytest.mark.parametrize(
    "array",
    [
        np.zeros((N, 32, 32), np.uint8),
        np.zeros((N, 32, 32, 4), np.uint8),
        np.zeros((N * 32 * 32 * 3,), np.uint8),
        np.zeros((N, 3, 32, 32, 1), np.float32),
    ],
)
def test_wrong_shape_names_both_layouts(tmp_path: Path, array: np.ndarray) -> None:
    err = rejected(tmp_path, "batch.npy", npy_bytes(array))
    assert err.code == "wrong_shape"
    assert f"({N}, 32, 32, 3)" in err.message and f"({N}, 3, 32, 32)" in err.message


@pytest.mark.parametrize("dtype", [np.int64, np.int8, np.uint16, np.bool_, np.complex64])
def test_other_dtypes_are_rejected(tmp_path: Path, dtype: type) -> None:
    err = rejected(tmp_path, "batch.npy", npy_bytes(np.zeros((N, 32, 32, 3), dtype)))
    assert err.code == "wrong_dtype"
    assert str(np.dtype(dtype)) in err.message
    assert "uint8" in err.message and "float32" in err.message


def test_uint8_in_chw_is_wrong_layout(tmp_path: Path) -> None:
    err = rejected(tmp_path, "batch.npy", npy_bytes(IMAGES.transpose(0, 3, 1, 2).copy()))
    assert err.code == "wrong_layout"
    assert "uint8 arrays must be HWC" in err.message
    assert "transpose(0, 2, 3, 1)" in err.message


def test_float_in_hwc_is_wrong_layout(tmp_path: Path) -> None:
    err = rejected(tmp_path, "batch.npy", npy_bytes(IMAGES.astype(np.float32) / 255))
    assert err.code == "wrong_layout"
    assert "float arrays must be CHW" in err.message
    assert "transpose(0, 3, 1, 2)" in err.message


def test_nan_and_inf_are_counted(tmp_path: Path) -> None:
    array = to_chw_float(IMAGES, np.float32)
    array[2, 0, 0, 0] = np.nan
    array[2, 1, 0, 0] = np.nan
    array[4, 0, 5, 5] = np.inf
    err = rejected(tmp_path, "batch.npy", npy_bytes(array))
    assert err.code == "non_finite_values"
    assert err.details == {"non_finite_count": 3, "nan_count": 2, "first_image": 2}
    assert "3 non-finite values (2 NaN, 1 infinite)" in err.message


def test_values_outside_unit_interval_report_min_and_max(tmp_path: Path) -> None:
    array = to_chw_float(IMAGES, np.float32)
    array[0, 0, 0, 0] = -0.25
    array[1, 0, 0, 0] = 1.5
    err = rejected(tmp_path, "batch.npy", npy_bytes(array))
    assert err.code == "values_out_of_range"
    assert err.details == {"min": -0.25, "max": 1.5, "out_of_range_count": 2}
    assert "min -0.25, max 1.5" in err.message


def test_float_on_0_255_scale_gets_a_hint(tmp_path: Path) -> None:
    array = IMAGES.transpose(0, 3, 1, 2).astype(np.float32)
    err = rejected(tmp_path, "batch.npy", npy_bytes(array))
    assert err.code == "values_out_of_range"
    assert "divide by 255" in err.message


def test_npz_with_several_keys_and_no_images(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, adv=IMAGES, clean=IMAGES)
    err = rejected(tmp_path, "batch.npz", buffer.getvalue())
    assert err.code == "unexpected_npz_keys"
    assert sorted(err.details["keys"]) == ["adv", "clean"]
    assert "'adv'" in err.message or "adv" in err.message
    assert "np.savez(path, images=x)" in err.message


def test_npz_holding_pngs_suggests_zip(tmp_path: Path) -> None:
    err = rejected(tmp_path, "batch.npz", zip_bytes(png_entries()))
    assert (err.code, err.status) == ("unsupported_format", 415)
    assert "*.zip" in err.message


def test_npz_member_with_wrong_shape_names_the_key(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, images=IMAGES[:, :16])
    err = rejected(tmp_path, "batch.npz", buffer.getvalue())
    assert err.code == "wrong_shape"
    assert "'images' in the .npz" in err.message


def test_npz_member_that_is_not_npy_inside(tmp_path: Path) -> None:
    err = rejected(tmp_path, "batch.npz", zip_bytes([("images.npy", b"PK\x03\x04 not npy")]))
    assert err.code == "corrupt_array"


# ---------------------------------------------------------------------------------------------
# Properties


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


uint8_batches = hnp.arrays(np.uint8, (2, 32, 32, 3))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(images=uint8_batches, dtype=st.sampled_from([np.float16, np.float32, np.float64]))
def test_float_round_trip_of_uint8_is_exact(
    scratch: Path, images: np.ndarray, dtype: type[np.floating]
) -> None:
    batch = read(
        scratch,
        "batch.npy",
        npy_bytes(to_chw_float(images, dtype)),
        names=NAMES[:2],
        limits=BatchLimits.for_batch(2),
    )
    np.testing.assert_array_equal(batch, images)


def valid_uploads() -> list[tuple[str, bytes]]:
    npz = io.BytesIO()
    np.savez_compressed(npz, images=IMAGES[:2])
    return [
        ("batch.zip", zip_bytes(png_entries(IMAGES)[:2])),
        ("batch.zip", zip_bytes(png_entries(IMAGES)[:2], zipfile.ZIP_STORED)),
        ("batch.npy", npy_bytes(IMAGES[:2])),
        ("batch.npy", npy_bytes(to_chw_float(IMAGES[:2], np.float32))),
        ("batch.npz", npz.getvalue()),
    ]


VALID_UPLOADS = valid_uploads()


def check_never_crashes(scratch: Path, filename: str, content: bytes) -> None:
    try:
        batch = read(scratch, filename, content, names=NAMES[:2], limits=BatchLimits.for_batch(2))
    except SubmissionRejected as err:
        json.dumps(err.details)
        assert err.code and err.message
    else:
        assert batch.shape == (2, 32, 32, 3) and batch.dtype == np.uint8


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    prefix=st.sampled_from([b"", b"PK\x03\x04", b"PK\x05\x06", b"\x93NUMPY", b"\x89PNG\r\n\x1a\n"]),
    body=st.binary(max_size=512),
    filename=st.sampled_from(["batch.zip", "batch.npy", "batch.npz", "x.png"]),
)
def test_random_bytes_only_raise_submission_rejected(
    scratch: Path, prefix: bytes, body: bytes, filename: str
) -> None:
    check_never_crashes(scratch, filename, prefix + body)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    which=st.integers(0, len(VALID_UPLOADS) - 1),
    flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), min_size=1, max_size=4),
    cut=st.one_of(st.none(), st.integers(0, 10**6)),
)
def test_mutated_valid_uploads_only_raise_submission_rejected(
    scratch: Path,
    which: int,
    flips: list[tuple[int, int]],
    cut: int | None,
) -> None:
    filename, content = VALID_UPLOADS[which]
    raw = bytearray(content)
    for position, mask in flips:
        raw[position % len(raw)] ^= mask
    if cut is not None:
        raw = raw[: cut % (len(raw) + 1)]
    check_never_crashes(scratch, filename, bytes(raw))


def test_zip_made_from_the_extracted_clean_download_is_accepted(tmp_path: Path) -> None:
    """A student who perturbs the extracted download in place and zips the folder keeps
    README.txt and labels.csv in the archive; those are ignored, the images are read."""
    from graders.datasets import SYNTHETIC_CLASSES, EvalSet, make_synthetic, write_png_zip

    images, labels = make_synthetic(1, seed=0)
    eval_set = EvalSet(images, labels, SYNTHETIC_CLASSES, True, "test")
    path = tmp_path / "clean.zip"
    with path.open("wb") as handle:
        write_png_zip(eval_set, handle)
    batch = read_batch(
        path,
        "clean.zip",
        expected_names=eval_set.names,
        limits=BatchLimits.for_batch(len(eval_set)),
    )
    np.testing.assert_array_equal(batch, images)
