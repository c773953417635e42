"""Student-submitted defense checkpoints: the manifest (architecture and input normalization) and
the strict, pickle-free loading of the weights into a registry architecture."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from graders.architectures import CIFAR10_MEAN, CIFAR10_STD, Architecture, Normalized, build_model
from graders.checkpoints import SAFETENSORS_SUFFIX, TORCH_SUFFIXES, load_weights, read_state_dict
from graders.errors import ArtifactError, SubmissionRejected

MANIFEST_MAX_BYTES = 4096


class NormalizationName(StrEnum):
    """Named input normalizations: ``none`` feeds [0, 1] images as they are (most RobustBench
    models); ``cifar10`` subtracts the CIFAR-10 channel means and divides by the stds."""

    NONE = "none"
    CIFAR10 = "cifar10"


_NAMED: dict[NormalizationName, tuple[tuple[float, ...], tuple[float, ...]]] = {
    NormalizationName.NONE: ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    NormalizationName.CIFAR10: (tuple(CIFAR10_MEAN), tuple(CIFAR10_STD)),
}


class DefenseManifest(BaseModel):
    """What a defense upload declares besides its weights; stored with the submission."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    architecture: Architecture
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @field_validator("mean", "std")
    @classmethod
    def _finite(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if not all(math.isfinite(v) for v in value):
            raise ValueError("must be three finite numbers")
        return value

    @field_validator("std")
    @classmethod
    def _positive(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if not all(v > 0 for v in value):
            raise ValueError("std values must be > 0")
        return value


_Number = Annotated[float, Field(strict=True)]
"""A JSON number; ``true`` or ``"0.5"`` is not one."""


class _ManifestDocument(BaseModel):
    model_config = ConfigDict(extra="forbid")

    architecture: str
    normalization: str | None = None
    mean: list[_Number] | None = Field(default=None, min_length=3, max_length=3)
    std: list[_Number] | None = Field(default=None, min_length=3, max_length=3)


def _reject(message: str, **details: Any) -> SubmissionRejected:
    return SubmissionRejected("invalid_manifest", message, details or None)


def _numbers(text: str, field: str) -> list[float]:
    try:
        values = [float(part) for part in text.replace(";", ",").split(",") if part.strip()]
    except ValueError:
        raise _reject(f"{field} must be three comma-separated numbers, got {text!r}") from None
    if len(values) != 3:
        raise _reject(f"{field} must be three comma-separated numbers (R,G,B), got {text!r}")
    return values


def parse_manifest(
    *,
    architecture: str | None,
    normalization: str | None,
    mean: str | Sequence[float] | None = None,
    std: str | Sequence[float] | None = None,
    allowed: Sequence[Architecture],
) -> DefenseManifest:
    """The manifest from form fields (or a decoded JSON manifest), checked against the phase.

    Normalization is required, either by name (``none``, ``cifar10``) or as explicit ``mean``
    and ``std``: guessing it would silently grade a different model.
    """
    allowed_text = ", ".join(a.value for a in allowed)
    if not architecture:
        raise _reject(
            f"Say which architecture the checkpoint is for (field `architecture`); this phase "
            f"allows: {allowed_text}.",
            allowed=[a.value for a in allowed],
        )
    try:
        parsed = Architecture(architecture.strip().lower())
    except ValueError:
        raise SubmissionRejected(
            "architecture_not_allowed",
            f"Unknown architecture {architecture!r}; this phase allows: {allowed_text}.",
            {"allowed": [a.value for a in allowed]},
        ) from None
    if parsed not in allowed:
        raise SubmissionRejected(
            "architecture_not_allowed",
            f"Architecture {parsed.value!r} is not allowed in this phase; it allows: "
            f"{allowed_text}.",
            {"allowed": [a.value for a in allowed]},
        )
    explicit = mean is not None or std is not None
    names = ", ".join(n.value for n in NormalizationName)
    if normalization and explicit:
        raise _reject("Give either `normalization` or `mean` and `std`, not both.")
    if explicit:
        if mean is None or std is None:
            raise _reject("Give both `mean` and `std` (three numbers each, for R,G,B).")
        mean_values = _numbers(mean, "mean") if isinstance(mean, str) else list(mean)
        std_values = _numbers(std, "std") if isinstance(std, str) else list(std)
    elif normalization:
        try:
            name = NormalizationName(normalization.strip().lower())
        except ValueError:
            raise _reject(
                f"Unknown normalization {normalization!r}; use one of {names}, or give `mean` "
                "and `std` as three comma-separated numbers each."
            ) from None
        mean_values, std_values = (list(v) for v in _NAMED[name])
    else:
        raise _reject(
            f"Say how your model normalizes its [0, 1] input: `normalization` = {names} "
            "(none: the network takes [0, 1] images as they are), or `mean` and `std` as three "
            "comma-separated numbers each."
        )
    try:
        return DefenseManifest(
            architecture=parsed,
            mean=tuple(mean_values),  # type: ignore[arg-type]
            std=tuple(std_values),  # type: ignore[arg-type]
        )
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise _reject(f"Invalid normalization: {problems}.") from None


def parse_manifest_json(text: bytes, *, allowed: Sequence[Architecture]) -> DefenseManifest:
    """A JSON manifest such as ``{"architecture": "resnet20", "normalization": "cifar10"}``."""
    if len(text) > MANIFEST_MAX_BYTES:
        raise _reject(f"The manifest is over {MANIFEST_MAX_BYTES} bytes; it needs only a few keys.")
    try:
        decoded = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _reject(f"The manifest is not valid JSON: {exc}.") from None
    except RecursionError:
        raise _reject("The manifest is nested too deeply; it is one flat JSON object.") from None
    try:
        document = _ManifestDocument.model_validate(decoded)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise _reject(
            f"The manifest has problems: {problems}. Expected keys: architecture, and "
            "normalization or mean and std."
        ) from None
    return parse_manifest(
        architecture=document.architecture,
        normalization=document.normalization,
        mean=document.mean,
        std=document.std,
        allowed=allowed,
    )


def load_defense(
    path: Path, manifest: DefenseManifest, *, file_name: str | None = None
) -> Normalized:
    """The submitted model, weights loaded strictly, in eval mode, on the CPU.

    Only safetensors and ``torch.load(weights_only=True)`` are used; nothing is unpickled and no
    student code runs. Every problem becomes a ``SubmissionRejected`` naming it (missing and
    unexpected keys, both shapes of a mismatch, non-finite weights).
    """
    shown = file_name or Path(path).name
    suffix = Path(shown).suffix.lower()
    if suffix not in (SAFETENSORS_SUFFIX, *TORCH_SUFFIXES):
        accepted = ", ".join((SAFETENSORS_SUFFIX, *TORCH_SUFFIXES))
        raise SubmissionRejected(
            "unsupported_checkpoint",
            f"{shown}: a checkpoint must be a {accepted} file (a state_dict of tensors).",
            {"accepted": [SAFETENSORS_SUFFIX, *TORCH_SUFFIXES]},
        )
    if Path(path).stat().st_size == 0:
        raise SubmissionRejected(
            "empty_file",
            f"{shown} is empty (0 bytes). Check that the checkpoint was written completely before "
            "uploading it again.",
            status=400,
        )
    model = build_model(manifest.architecture, mean=manifest.mean, std=manifest.std)
    try:
        state = read_state_dict(Path(path), suffix=suffix)
        load_weights(model, state)
    except ArtifactError as exc:
        message = str(exc).removeprefix(f"{Path(path).name}: ")
        raise SubmissionRejected(
            "invalid_checkpoint",
            f"{shown}: {message}. The checkpoint must be the state_dict of the "
            f"{manifest.architecture.value} network of the registry (graders/architectures.py), "
            "without the normalization wrapper.",
            {"architecture": manifest.architecture.value},
        ) from None
    return model.eval()
