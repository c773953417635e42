"""Scoring of attack-phase batches: how well perturbed images fool a set of hidden models."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from pydantic import BaseModel
from torch import nn

from graders.threat_model import Norm, ThreatModel, distances
from graders.version import EVALUATOR_VERSION


def default_device() -> torch.device:
    """CUDA when present, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_batch_size(device: torch.device) -> int:
    """Large batches on a GPU; on a CPU 100 keeps activations in cache (ResNet-20, 2 cores:
    0.18 s per 500 images at batch 100 against 0.29 s at batch 500, docs/benchmarks.md)."""
    return 500 if device.type == "cuda" else 100


@dataclass(frozen=True)
class HiddenModel:
    """A hidden model ready to score: an eval-mode module taking [0, 1] NCHW input."""

    name: str
    module: nn.Module
    weights_sha256: str
    preprocessing: str | None = None


class ModelResult(BaseModel):
    name: str
    weights_sha256: str
    preprocessing: str | None
    adversarial_accuracy: float
    clean_accuracy: float
    seconds: float


class AttackReport(BaseModel):
    """What is stored for a scored attack batch. ``score`` is the mean adversarial accuracy."""

    metric: str = "mean_accuracy"
    score: float
    n_images: int
    mean_clean_accuracy: float
    models: list[ModelResult]
    fooled_by_k: list[int]
    threat_model: dict[str, float | str]
    linf_histogram: list[int]
    mean_l2: float
    evaluation_seconds: float
    device: str
    evaluator_version: str = EVALUATOR_VERSION


def predict(
    model: nn.Module,
    images: np.ndarray,
    *,
    batch_size: int | None = None,
    device: torch.device | None = None,
) -> np.ndarray:
    """Predicted labels of ``model`` on uint8 N x 32 x 32 x 3 images, in eval mode, batched."""
    device = device or default_device()
    batch_size = batch_size or default_batch_size(device)
    was_training = model.training
    model.eval()
    predictions = []
    try:
        with torch.inference_mode():
            for start in range(0, len(images), batch_size):
                chunk = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size]))
                x = chunk.to(device).permute(0, 3, 1, 2).float().div_(255.0)
                x = x.contiguous(memory_format=torch.channels_last)
                predictions.append(model(x).argmax(dim=1).cpu().numpy())
    finally:
        model.train(was_training)
    return np.concatenate(predictions) if predictions else np.zeros(0, dtype=np.int64)


def score_attack_batch(
    adversarial: np.ndarray,
    clean: np.ndarray,
    labels: np.ndarray,
    models: Sequence[HiddenModel],
    threat_model: ThreatModel,
    *,
    clean_predictions: Mapping[str, np.ndarray],
    batch_size: int | None = None,
    device: torch.device | None = None,
) -> AttackReport:
    """Score a validated batch: each model's accuracy on it, and how many images fool k models.

    ``clean_predictions`` holds each model's predictions on the clean images (callers cache them:
    they depend only on the model and the evaluation set). The batch must already have passed the
    threat-model check; distances are recomputed here only for the stored statistics.
    """
    if adversarial.shape != clean.shape or len(labels) != len(clean):
        raise ValueError("adversarial, clean and labels must describe the same images")
    if not models:
        raise ValueError("at least one hidden model is needed")
    started = time.perf_counter()
    results = []
    fooled = np.zeros(len(labels), dtype=np.int64)
    for hidden in models:
        model_started = time.perf_counter()
        adv_pred = predict(hidden.module, adversarial, batch_size=batch_size, device=device)
        correct = adv_pred == labels
        fooled += ~correct
        results.append(
            ModelResult(
                name=hidden.name,
                weights_sha256=hidden.weights_sha256,
                preprocessing=hidden.preprocessing,
                adversarial_accuracy=float(correct.mean()),
                clean_accuracy=float((clean_predictions[hidden.name] == labels).mean()),
                seconds=time.perf_counter() - model_started,
            )
        )
    linf = distances(clean, adversarial, Norm.LINF)
    l2 = distances(clean, adversarial, Norm.L2)
    histogram_top = int(max(threat_model.eps, linf.max(initial=0)))
    return AttackReport(
        score=float(np.mean([r.adversarial_accuracy for r in results])),
        n_images=len(labels),
        mean_clean_accuracy=float(np.mean([r.clean_accuracy for r in results])),
        models=results,
        fooled_by_k=np.bincount(fooled, minlength=len(models) + 1).tolist(),
        threat_model={"norm": threat_model.norm.value, "eps": threat_model.eps},
        linf_histogram=np.bincount(linf.astype(np.int64), minlength=histogram_top + 1).tolist(),
        mean_l2=float(l2.mean()) if len(l2) else 0.0,
        evaluation_seconds=time.perf_counter() - started,
        device=str(device or default_device()),
    )
