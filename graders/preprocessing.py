"""Input-transformation defenses (JPEG, bit-depth reduction) put in front of a hidden model.

They mirror past homework: gray-box scoring where the attacker does not see the preprocessing.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from enum import StrEnum
from typing import cast

import numpy as np
import torch
from PIL import Image
from torch import nn


class PreprocessingKind(StrEnum):
    """Preprocessing defenses an assignment spec can name."""

    JPEG = "jpeg"
    BIT_DEPTH = "bit_depth"


def _check_int(name: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
    return value


def _check_images(x: torch.Tensor) -> None:
    if x.ndim != 4 or not x.is_floating_point():
        raise ValueError(
            f"expected a float NCHW batch in [0, 1], got shape {tuple(x.shape)} and {x.dtype}"
        )


def _jpeg_roundtrip(image: np.ndarray, quality: int) -> np.ndarray:
    """Encode one HWC uint8 image (1 or 3 channels) as JPEG and decode it again."""
    gray = image.shape[2] == 1
    buffer = io.BytesIO()
    Image.fromarray(image[:, :, 0] if gray else image).save(
        buffer, format="JPEG", quality=quality, subsampling=0
    )
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        array = np.asarray(decoded.convert("L" if gray else "RGB"))
    return array[:, :, None] if gray else array


class JpegCompression(nn.Module):
    """JPEG-encode and decode each image at ``quality`` (1..100), with Pillow's libjpeg.

    Images are clamped to [0, 1] and rounded to uint8 first; colour images use 4:4:4 chroma
    (no subsampling), 1-channel images are encoded as grayscale. The output is float in [0, 1]
    on the input's device and dtype. This is NOT differentiable: the output is detached from
    the input, so a white-box attacker has to approximate it (BPDA); that is the point when it
    scores a gray-box phase.
    """

    def __init__(self, quality: int) -> None:
        super().__init__()
        self.quality = _check_int("quality", quality, 1, 100)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_images(x)
        if x.shape[1] not in (1, 3):
            raise ValueError(f"JPEG needs 1 or 3 channels, got {x.shape[1]}")
        pixels = (x.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
        images = pixels.permute(0, 2, 3, 1).cpu().numpy()
        decoded = np.stack([_jpeg_roundtrip(image, self.quality) for image in images])
        out = torch.from_numpy(decoded).permute(0, 3, 1, 2).float().div(255)
        return out.to(device=x.device, dtype=x.dtype).contiguous()

    def extra_repr(self) -> str:
        return f"quality={self.quality}"


class BitDepthReduction(nn.Module):
    """Quantize [0, 1] inputs to ``2**bits`` evenly spaced levels (feature squeezing, Xu et al.).

    Values are clamped to [0, 1] first. Its gradient is zero almost everywhere (rounding), which
    masks gradients rather than adding robustness.
    """

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = _check_int("bits", bits, 1, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_images(x)
        levels = 2**self.bits - 1
        return torch.round(x.clamp(0, 1) * levels) / levels

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


_PARAMETER: dict[PreprocessingKind, str] = {
    PreprocessingKind.JPEG: "quality",
    PreprocessingKind.BIT_DEPTH: "bits",
}

_FACTORIES: dict[PreprocessingKind, Callable[[int], nn.Module]] = {
    PreprocessingKind.JPEG: JpegCompression,
    PreprocessingKind.BIT_DEPTH: BitDepthReduction,
}


def build_preprocessing(kind: PreprocessingKind | str, **params: int) -> nn.Module:
    """The preprocessing an assignment spec names, e.g. ``("jpeg", quality=75)``.

    Each kind takes exactly one parameter: ``quality`` for ``jpeg``, ``bits`` for ``bit_depth``.
    """
    try:
        parsed = PreprocessingKind(kind)
    except ValueError:
        known = ", ".join(member.value for member in PreprocessingKind)
        raise ValueError(f"unknown preprocessing {kind!r}; known: {known}") from None
    name = _PARAMETER[parsed]
    if set(params) != {name}:
        given = ", ".join(sorted(params)) or "none"
        raise ValueError(f"{parsed.value} takes exactly one parameter {name!r}; got: {given}")
    return _FACTORIES[parsed](params[name])


class Defended(nn.Module):
    """``model(preprocess(x))``: a hidden model behind its preprocessing defense."""

    def __init__(self, preprocess: nn.Module, model: nn.Module) -> None:
        super().__init__()
        self.preprocess = preprocess
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.model(self.preprocess(x)))
