"""Attack-batch scoring on tiny models whose answers are known in advance."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from graders.attack_scoring import HiddenModel, predict, score_attack_batch
from graders.threat_model import ThreatModel


class BrightnessClassifier(nn.Module):
    """Class 1 when the mean pixel is above 0.5, else class 0; has BatchNorm to check eval mode."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=(1, 2, 3)).unsqueeze(1)
        score = self.bn(mean) - 0.5
        return torch.cat([-score, score], dim=1)


class Constant(nn.Module):
    def __init__(self, label: int) -> None:
        super().__init__()
        self.label = label

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(len(x), 2)
        logits[:, self.label] = 1.0
        return logits


def test_predict_is_batched_eval_mode_and_restores_training_flag() -> None:
    model = BrightnessClassifier().train()
    images = np.concatenate(
        [np.full((5, 32, 32, 3), 250, np.uint8), np.zeros((6, 32, 32, 3), np.uint8)]
    )
    predictions = predict(model, images, batch_size=4)
    np.testing.assert_array_equal(predictions, [1] * 5 + [0] * 6)
    assert model.training  # restored


def test_scores_accuracy_per_model_and_fooled_counts() -> None:
    clean = np.concatenate(
        [np.full((4, 32, 32, 3), 200, np.uint8), np.full((4, 32, 32, 3), 40, np.uint8)]
    )
    labels = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    adversarial = clean.copy()
    adversarial[:2] = 120  # mean 0.47: the brightness model now says 0 for two class-1 images
    models = [
        HiddenModel("bright", BrightnessClassifier().eval(), "a" * 64),
        HiddenModel("always-one", Constant(1), "b" * 64, preprocessing="jpeg(quality=75)"),
    ]
    clean_predictions = {m.name: predict(m.module, clean) for m in models}
    report = score_attack_batch(
        adversarial,
        clean,
        labels,
        models,
        ThreatModel("linf", 80),
        clean_predictions=clean_predictions,
    )
    bright, always = report.models
    assert bright.adversarial_accuracy == pytest.approx(6 / 8)
    assert bright.clean_accuracy == 1.0
    assert always.adversarial_accuracy == pytest.approx(4 / 8)
    assert report.score == pytest.approx((6 / 8 + 4 / 8) / 2)
    # images 0-1 fool only the brightness model, 2-3 fool none, 4-7 only the constant one
    assert report.fooled_by_k == [2, 6, 0]
    assert report.linf_histogram[80] == 2 and sum(report.linf_histogram) == 8
    assert report.evaluator_version


def test_mismatched_inputs_are_refused() -> None:
    images = np.zeros((2, 32, 32, 3), np.uint8)
    model = HiddenModel("c", Constant(0), "c" * 64)
    with pytest.raises(ValueError, match="same images"):
        score_attack_batch(
            images,
            images[:1],
            np.zeros(2, int),
            [model],
            ThreatModel("linf", 8),
            clean_predictions={"c": np.zeros(2)},
        )
    with pytest.raises(ValueError, match="at least one"):
        score_attack_batch(
            images, images, np.zeros(2, int), [], ThreatModel("linf", 8), clean_predictions={}
        )
