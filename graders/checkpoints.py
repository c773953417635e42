"""Reading, checking and writing weight files without ever unpickling arbitrary objects.

Also owns the sha256 checks that pin hidden artifacts to the files an assignment spec names.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import uuid
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from graders.architectures import Normalized
from graders.errors import ArtifactError

SAFETENSORS_SUFFIX = ".safetensors"
TORCH_SUFFIXES = (".pt", ".pth", ".bin")
_WRAPPER_KEYS = ("state_dict", "model")
_CHUNK_BYTES = 1 << 20
_SHOWN = 5
_REASON_CHARS = 200
_SHA256 = re.compile(r"[0-9a-f]{64}")
_ZIP_MAGIC = b"PK\x03\x04"


def _reason(exc: BaseException) -> str:
    """One short line on why a file failed to parse, without torch's advice to unpickle it."""
    text = str(exc)
    unsafe = re.search(r"GLOBAL ([\w.]+)", text)
    if unsafe is not None:
        return (
            f"it contains a pickled Python object ({unsafe.group(1)}), not only tensors; "
            "refusing to unpickle it"
        )
    if isinstance(exc, pickle.UnpicklingError):
        operand = re.search(r"Unsupported operand \d+", text)
        detail = operand.group(0) if operand else "unsupported pickle content"
        return f"not a tensor-only torch checkpoint ({detail})"
    first_line = text.strip().splitlines()[0] if text.strip() else "no details"
    reason = f"{type(exc).__name__}: {first_line}"
    if len(reason) > _REASON_CHARS:
        reason = reason[: _REASON_CHARS - 3] + "..."
    return reason


def _is_tensor_dict(obj: object) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(key, str) for key in obj)
        and all(isinstance(value, torch.Tensor) for value in obj.values())
    )


def _describe(obj: object) -> str:
    """What a loaded object is, in words a TA or student can act on."""
    if isinstance(obj, torch.Tensor):
        return f"a single tensor of shape {tuple(obj.shape)}"
    if not isinstance(obj, Mapping):
        return f"a {type(obj).__name__}"
    if len(obj) == 0:
        return "an empty dict"
    wrappers = [key for key in _WRAPPER_KEYS if key in obj]
    if len(wrappers) > 1:
        return "a dict with both 'state_dict' and 'model' keys"
    if wrappers:
        return f"a dict whose {wrappers[0]!r} entry is {_describe(obj[wrappers[0]])}"
    odd_keys = [key for key in obj if not isinstance(key, str)]
    if odd_keys:
        return f"a dict with non-string keys such as {odd_keys[0]!r}"
    odd = [
        f"{key!r} ({type(value).__name__})"
        for key, value in obj.items()
        if not isinstance(value, torch.Tensor)
    ]
    return f"a dict with non-tensor values at {', '.join(odd[:_SHOWN])}"


def _as_state_dict(obj: object, name: str) -> dict[str, torch.Tensor]:
    if _is_tensor_dict(obj):
        return dict(obj)  # type: ignore[call-overload]
    if isinstance(obj, Mapping):
        wrappers = [key for key in _WRAPPER_KEYS if key in obj]
        if len(wrappers) == 1 and _is_tensor_dict(obj[wrappers[0]]):
            return dict(obj[wrappers[0]])
    raise ArtifactError(
        f"{name}: expected a state_dict (a dict of name -> tensor, optionally under a "
        f"'state_dict' or 'model' key); found {_describe(obj)}"
    )


def _check_torch_archive(path: Path) -> None:
    """Refuse a torch zip whose records could inflate past the file's own size.

    ``torch.save`` stores every record uncompressed, but torch's reader inflates a compressed
    record in full before checking its size: a rewritten .pt of a few MB could claim gigabytes.
    Legacy (pre-zip) files are left to ``torch.load``, whose allocations follow the file.
    """
    with path.open("rb") as handle:
        if handle.read(len(_ZIP_MAGIC)) != _ZIP_MAGIC:
            return
    try:
        with zipfile.ZipFile(path) as archive:
            records = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as exc:
        raise ArtifactError(
            f"{path.name}: could not read weights: not a readable zip archive ({_reason(exc)})"
        ) from None
    compressed = [r.filename for r in records if r.compress_type != zipfile.ZIP_STORED]
    if compressed:
        raise ArtifactError(
            f"{path.name}: could not read weights: {len(compressed)} compressed record(s) "
            f"({_listed(compressed)}); torch.save never compresses, so the file was rewritten, "
            "and it is not inflated (save it again with torch.save)"
        )
    declared, size = sum(r.file_size for r in records), path.stat().st_size
    if declared > size:
        raise ArtifactError(
            f"{path.name}: could not read weights: its records declare {declared} bytes, more "
            f"than the file's own {size} (save it again with torch.save)"
        )


def read_state_dict(path: Path, *, suffix: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors in a ``.safetensors`` or ``.pt``/``.pth``/``.bin`` file, on the CPU.

    Torch files are read with ``weights_only=True`` only, so a file holding pickled code is
    refused rather than run, and a torch zip with compressed records is refused before it is
    inflated. Accepted content: a dict of name -> tensor, or a dict whose single ``"state_dict"``
    or ``"model"`` entry is one (other entries such as ``epoch`` are ignored).
    Anything else, an unknown extension or a file that fails to parse raises ``ArtifactError``.
    ``suffix`` overrides the file's own (for uploads stored under a temporary name).
    """
    path = Path(path)
    suffix = (suffix or path.suffix).lower()
    if suffix not in (SAFETENSORS_SUFFIX, *TORCH_SUFFIXES):
        accepted = ", ".join((SAFETENSORS_SUFFIX, *TORCH_SUFFIXES))
        raise ArtifactError(f"{path.name}: unknown weight file type {suffix!r}; use {accepted}")
    if not path.is_file():
        raise ArtifactError(f"{path.name}: file not found")
    try:
        if suffix == SAFETENSORS_SUFFIX:
            loaded: object = load_file(str(path), device="cpu")
        else:
            _check_torch_archive(path)
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except ArtifactError:
        raise
    except Exception as exc:
        raise ArtifactError(f"{path.name}: could not read weights: {_reason(exc)}") from None
    return _as_state_dict(loaded, path.name)


def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN])
    return shown if len(keys) <= _SHOWN else f"{shown}, ... ({len(keys) - _SHOWN} more)"


def _prefix_hint(unexpected: list[str], expected: Mapping[str, torch.Tensor]) -> str:
    """Spot the usual cause of all keys mismatching: a wrapper prefix such as ``module.``."""
    prefixes = {key.split(".", 1)[0] for key in unexpected}
    if len(prefixes) != 1 or not all("." in key for key in unexpected):
        return ""
    if all(key.split(".", 1)[1] in expected for key in unexpected):
        return f" (checkpoint keys carry an extra {prefixes.pop() + '.'!r} prefix; strip it)"
    return ""


def _kind(tensor: torch.Tensor) -> str:
    """What a tensor's values mean, whatever their width: float16 weights load into float32."""
    if tensor.dtype == torch.bool:
        return "bool"
    if tensor.is_complex():
        return "complex"
    return "float" if tensor.is_floating_point() else "int"


def _dtype(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def _key_problems(
    expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]
) -> list[str]:
    # torch fills in a missing BatchNorm ``num_batches_tracked`` itself (older checkpoints).
    missing = [
        key for key in expected if key not in state and not key.endswith("num_batches_tracked")
    ]
    unexpected = [key for key in state if key not in expected]
    mismatched = [
        f"{key} (checkpoint {tuple(state[key].shape)}, model {tuple(expected[key].shape)})"
        for key in expected
        if key in state and state[key].shape != expected[key].shape
    ]
    wrong_kind = [
        f"{key} (checkpoint {_dtype(state[key])}, model {_dtype(expected[key])})"
        for key in expected
        if key in state and _kind(state[key]) != _kind(expected[key])
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_listed(missing)}")
    if unexpected:
        hint = _prefix_hint(unexpected, expected)
        problems.append(f"{len(unexpected)} unexpected key(s): {_listed(unexpected)}{hint}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): {_listed(mismatched)}")
    if wrong_kind:
        problems.append(f"{len(wrong_kind)} dtype mismatch(es): {_listed(wrong_kind)}")
    return problems


def load_weights(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load ``state`` into ``model`` (into ``model.net`` for a ``Normalized``), strictly.

    Every key must match in name, shape and kind of dtype (float, int, bool or complex; the width
    may differ) and every floating tensor must be finite; otherwise ``ArtifactError`` says which
    keys are wrong and the model is left untouched. There is no lenient fallback: a partially
    loaded model would be graded with random weights.
    """
    target = model.net if isinstance(model, Normalized) else model
    expected = target.state_dict()
    problems = _key_problems(expected, state)
    if problems:
        raise ArtifactError("state_dict does not match the architecture: " + "; ".join(problems))
    for key, tensor in state.items():
        if (tensor.is_floating_point() or tensor.is_complex()) and not bool(
            torch.isfinite(tensor).all()
        ):
            raise ArtifactError(f"state_dict entry {key!r} contains NaN or infinite values")
    try:
        target.load_state_dict(dict(state), strict=True)
    except RuntimeError as exc:
        raise ArtifactError(f"state_dict could not be loaded: {_reason(exc)}") from None


def write_safetensors(model: nn.Module, path: Path) -> None:
    """Save ``model``'s state_dict (``model.net``'s for a ``Normalized``) as safetensors.

    Tensors are copied to contiguous CPU memory (so channels_last models save fine), and the
    file is written next to ``path`` and renamed, so readers never see a half-written file.
    """
    path = Path(path)
    if path.suffix.lower() != SAFETENSORS_SUFFIX:
        raise ValueError(f"{path.name}: a safetensors file must end in {SAFETENSORS_SUFFIX}")
    target = model.net if isinstance(model, Normalized) else model
    tensors = {
        key: value.detach().cpu().clone(memory_format=torch.contiguous_format)
        for key, value in target.state_dict().items()
    }
    partial = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        save_file(tensors, str(partial), metadata={"format": "pt"})
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks so large checkpoints never sit in memory."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while chunk := handle.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(path: Path, expected: str) -> None:
    """Raise ``ArtifactError`` unless ``path`` exists and hashes to the pinned ``expected``."""
    path = Path(path)
    pinned = expected.strip().lower()
    if not _SHA256.fullmatch(pinned):
        raise ValueError(f"expected sha256 must be 64 hex characters, got {expected!r}")
    if not path.is_file():
        raise ArtifactError(
            f"{path.name}: file not found (the assignment spec pins sha256 {pinned})"
        )
    found = sha256_file(path)
    if found != pinned:
        raise ArtifactError(
            f"{path.name}: sha256 mismatch: expected {pinned}, found {found}; the file changed "
            "since the assignment spec pinned it (restore the original file or update the pin)"
        )
