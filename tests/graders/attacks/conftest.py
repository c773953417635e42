"""Tiny CPU models and points for attack tests.

- ``undefended``: a small CNN trained on low-contrast synthetic images, where 8/255 is a large
  perturbation: a sound attack suite must bring it to about 0% robust accuracy.
- ``sturdy``: the same CNN trained on full-contrast images, where a good part of the points
  survive 8/255: used where attacks must be compared on points that are not trivially broken.
- ``quantized``: ``undefended`` behind 3-bit input quantization, whose input gradients are zero
  almost everywhere (a deliberately masked model).
Each comes with points it classifies correctly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from graders.datasets import images_to_tensor, make_synthetic
from graders.preprocessing import BitDepthReduction, Defended
from graders.training import train_classifier

LOW_CONTRAST = 0.3


def small_cnn() -> nn.Module:
    """About 25k parameters: fast enough on a CPU to attack a few hundred times in a test."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )


def low_contrast(images: np.ndarray, factor: float = LOW_CONTRAST) -> np.ndarray:
    """uint8 images with their contrast around mid-grey scaled by ``factor``."""
    scaled = 128 + (images.astype(np.float32) - 128) * factor
    return np.clip(scaled, 0, 255).round().astype(np.uint8)


@dataclass(frozen=True)
class Points:
    """Clean [0, 1] NCHW images and labels, all classified correctly by their model."""

    x: Tensor
    y: Tensor


def _trained(contrast: float) -> nn.Module:
    torch.manual_seed(0)
    images, labels = make_synthetic(60, seed=11)
    model = small_cnn()
    train_classifier(
        model, low_contrast(images, contrast), labels, epochs=15, batch_size=32, lr=0.1, seed=0
    )
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _correct_points(model: nn.Module, contrast: float, count: int) -> Points:
    images, labels = make_synthetic(8, seed=99)
    x = images_to_tensor(low_contrast(images, contrast))
    y = torch.from_numpy(labels)
    with torch.no_grad():
        correct = model(x).argmax(1) == y
    return Points(x[correct][:count].contiguous(), y[correct][:count].contiguous())


@pytest.fixture(scope="session")
def undefended() -> nn.Module:
    return _trained(LOW_CONTRAST)


@pytest.fixture(scope="session")
def points(undefended: nn.Module) -> Points:
    return _correct_points(undefended, LOW_CONTRAST, 48)


@pytest.fixture(scope="session")
def sturdy() -> nn.Module:
    return _trained(1.0)


@pytest.fixture(scope="session")
def sturdy_points(sturdy: nn.Module) -> Points:
    return _correct_points(sturdy, 1.0, 48)


@pytest.fixture(scope="session")
def quantized(undefended: nn.Module) -> nn.Module:
    return Defended(BitDepthReduction(3), undefended).eval()
