"""Uploaded files: streamed to disk under a size cap and hashed on the way."""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from server.errors import UploadTooLarge

CHUNK_BYTES = 1024 * 1024


@dataclass(frozen=True)
class StoredUpload:
    path: Path
    file_name: str
    size: int
    sha256: str


def receive_upload(
    source: BinaryIO, *, file_name: str, limit: int, directory: Path
) -> StoredUpload:
    """Copy ``source`` to a temporary file in ``directory``; refuse more than ``limit`` bytes."""
    directory.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    size = 0
    handle, name = tempfile.mkstemp(dir=directory, prefix="upload-", suffix=".part")
    try:
        with os.fdopen(handle, "wb") as out:
            while chunk := source.read(CHUNK_BYTES):
                size += len(chunk)
                if size > limit:
                    raise UploadTooLarge(
                        f"The file is larger than this phase's limit of {limit / 2**20:.1f} MiB. "
                        "Upload the batch compressed (zip of PNGs or .npz) or check you are "
                        "uploading the right file.",
                        {"limit_bytes": limit},
                    )
                digest.update(chunk)
                out.write(chunk)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    return StoredUpload(Path(name), file_name, size, digest.hexdigest())
