"""Tests for the preprocessing defenses: JPEG, bit-depth reduction, the builder, Defended."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from graders.preprocessing import (
    BitDepthReduction,
    Defended,
    JpegCompression,
    PreprocessingKind,
    build_preprocessing,
)


def _smooth_images(batch: int = 2, channels: int = 3, size: int = 32) -> torch.Tensor:
    """Smooth gradients with a little texture: the kind of image JPEG keeps well."""
    torch.manual_seed(0)
    ramp = torch.linspace(0, 1, size)
    base = 0.25 + 0.5 * (ramp.view(1, 1, size, 1) + ramp.view(1, 1, 1, size)) / 2
    phase = torch.rand(batch, channels, 1, 1)
    texture = 0.1 * torch.sin(6.28 * (ramp.view(1, 1, 1, size) * 3 + phase))
    return (base + texture).clamp(0, 1).expand(batch, channels, size, size).contiguous()


def _mean_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().mean())


def test_jpeg_changes_images_but_keeps_shape_range_and_dtype() -> None:
    x = torch.rand(2, 3, 32, 32)
    out = JpegCompression(quality=50)(x)
    assert out.shape == x.shape
    assert out.dtype == x.dtype
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert _mean_error(out, x) > 0.01


def test_jpeg_is_close_at_high_quality_and_worse_at_low_quality() -> None:
    x = _smooth_images()
    high = _mean_error(JpegCompression(95)(x), x)
    low = _mean_error(JpegCompression(10)(x), x)
    assert high < 0.01
    assert low > 2 * high


def test_jpeg_output_is_on_the_quantized_grid_and_keeps_dtype() -> None:
    x = _smooth_images().double()
    out = JpegCompression(90)(x)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out * 255, (out * 255).round())


def test_jpeg_handles_grayscale_and_rejects_other_channel_counts() -> None:
    gray = _smooth_images(channels=1)
    assert JpegCompression(75)(gray).shape == gray.shape
    with pytest.raises(ValueError, match="1 or 3 channels"):
        JpegCompression(75)(torch.rand(1, 2, 8, 8))


def test_jpeg_is_not_differentiable() -> None:
    x = _smooth_images().requires_grad_(True)
    out = JpegCompression(75)(x)
    assert not out.requires_grad


def test_jpeg_works_under_inference_mode() -> None:
    with torch.inference_mode():
        out = JpegCompression(75)(_smooth_images())
    assert out.shape == (2, 3, 32, 32)


@pytest.mark.parametrize("quality", [0, 101, 50.0, True])
def test_jpeg_rejects_bad_quality(quality: object) -> None:
    with pytest.raises(ValueError, match="quality"):
        JpegCompression(quality)  # type: ignore[arg-type]


@pytest.mark.parametrize("bits", [1, 3, 5])
def test_bit_depth_reduction_uses_two_to_the_bits_levels(bits: int) -> None:
    x = torch.linspace(0, 1, 1000).view(1, 1, 10, 100)
    out = BitDepthReduction(bits)(x)
    levels = torch.arange(2**bits, dtype=torch.float32) / (2**bits - 1)
    torch.testing.assert_close(out.unique(), levels)
    assert float((out - x).abs().max()) <= 0.5 / (2**bits - 1) + 1e-6


def test_bit_depth_eight_keeps_uint8_images_and_clamps() -> None:
    x = torch.randint(0, 256, (2, 3, 4, 4)).float() / 255
    torch.testing.assert_close(BitDepthReduction(8)(x), x)
    assert BitDepthReduction(1)(torch.tensor([-0.5, 1.5]).view(1, 1, 1, 2)).tolist() == [
        [[[0.0, 1.0]]]
    ]


@pytest.mark.parametrize("bits", [0, 9])
def test_bit_depth_rejects_bad_bits(bits: int) -> None:
    with pytest.raises(ValueError, match="bits"):
        BitDepthReduction(bits)


def test_build_preprocessing_from_strings_and_enums() -> None:
    jpeg = build_preprocessing("jpeg", quality=60)
    assert isinstance(jpeg, JpegCompression) and jpeg.quality == 60
    squeeze = build_preprocessing(PreprocessingKind.BIT_DEPTH, bits=4)
    assert isinstance(squeeze, BitDepthReduction) and squeeze.bits == 4


def test_build_preprocessing_errors() -> None:
    with pytest.raises(ValueError, match="unknown preprocessing 'blur'.*jpeg.*bit_depth"):
        build_preprocessing("blur", sigma=1)
    with pytest.raises(ValueError, match="exactly one parameter 'quality'; got: none"):
        build_preprocessing("jpeg")
    with pytest.raises(ValueError, match="exactly one parameter 'bits'; got: bits, extra"):
        build_preprocessing("bit_depth", bits=3, extra=1)
    with pytest.raises(ValueError, match="bits must be an integer in \\[1, 8\\]"):
        build_preprocessing("bit_depth", bits=12)


def test_defended_runs_the_model_on_preprocessed_inputs() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 10))
    squeeze = BitDepthReduction(1)
    defended = Defended(squeeze, model)
    x = torch.rand(5, 3, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(defended(x), model(squeeze(x)))
        assert not torch.allclose(defended(x), model(x))
