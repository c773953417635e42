"""Short supervised training of our own classifiers, used to make hidden models for demos and tests.

Models take [0, 1] NCHW float input; images come in as uint8 N x H x W x C arrays.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from graders.attack_scoring import predict
from graders.datasets import images_to_tensor

MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
CROP_PADDING = 4
# Share of the one-cycle schedule spent warming the learning rate up from a tenth of its peak.
WARMUP_FRACTION = 0.15


@dataclass(frozen=True)
class TrainingReport:
    """What a training run did: ``final_train_accuracy`` is measured on the (augmented) batches
    of the last epoch run; ``stopped_early`` is True when the time budget ended it before
    ``epochs`` full epochs."""

    epochs_run: int
    seconds: float
    final_train_accuracy: float
    stopped_early: bool


def _check_data(images: np.ndarray, labels: np.ndarray) -> None:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError("images must be a uint8 N x H x W x C array")
    if not isinstance(labels, np.ndarray) or labels.dtype.kind not in "iu":
        raise ValueError("labels must be an integer array")
    if labels.shape != (len(images),):
        raise ValueError(f"labels must have shape ({len(images)},), got {labels.shape}")
    if len(images) == 0:
        raise ValueError("no images given")


def _model_device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _one_cycle(progress: float) -> float:
    """Learning-rate multiplier at ``progress`` in [0, 1]: linear warm-up, then cosine to zero."""
    if progress < WARMUP_FRACTION:
        return 0.1 + 0.9 * progress / WARMUP_FRACTION
    rest = (progress - WARMUP_FRACTION) / (1.0 - WARMUP_FRACTION)
    return 0.5 * (1.0 + math.cos(math.pi * min(rest, 1.0)))


def _augment(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random crop after zero padding by ``CROP_PADDING`` pixels, and random horizontal flip."""
    n, channels, height, width = batch.shape
    padded = F.pad(batch, (CROP_PADDING,) * 4)
    shifts = torch.randint(0, 2 * CROP_PADDING + 1, (2, n), generator=generator)
    rows = (shifts[0, :, None] + torch.arange(height)).to(batch.device)
    cols = (shifts[1, :, None] + torch.arange(width)).to(batch.device)
    padded_width = width + 2 * CROP_PADDING
    cropped = padded.gather(2, rows[:, None, :, None].expand(n, channels, height, padded_width))
    cropped = cropped.gather(3, cols[:, None, None, :].expand(n, channels, height, width))
    flip = (torch.rand(n, generator=generator) < 0.5).to(batch.device)
    return torch.where(flip[:, None, None, None], cropped.flip(3), cropped)


def train_classifier(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    epochs: int,
    batch_size: int = 128,
    lr: float = 0.1,
    seed: int = 0,
    time_budget_s: float | None = None,
    augment: bool = True,
) -> TrainingReport:
    """Train ``model`` in place with a short, strong recipe and leave it in eval mode.

    SGD (Nesterov momentum 0.9, weight decay 5e-4) on a one-cycle schedule peaking at ``lr``,
    with random-crop and flip augmentation, on the model's device. The model is converted to
    channels-last layout (faster on CPU and GPU) and left that way.
    With ``time_budget_s`` the schedule runs on whichever of steps or wall time is further
    along, so a run cut short by the budget still ends annealed rather than at a high rate.
    Deterministic for a given ``seed`` when no time budget is set.
    """
    _check_data(images, labels)
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs <= 0:
        raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr}")
    if time_budget_s is not None and not time_budget_s > 0:
        raise ValueError(f"time_budget_s must be positive, got {time_budget_s}")

    start = time.perf_counter()
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    device = _model_device(model)
    model.to(memory_format=torch.channels_last)
    targets = torch.from_numpy(labels.astype(np.int64))
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=lr,
        momentum=MOMENTUM,
        nesterov=True,
        weight_decay=WEIGHT_DECAY,
    )
    steps_per_epoch = math.ceil(len(images) / batch_size)
    total_steps = epochs * steps_per_epoch
    step, epochs_run = 0, 0
    final_accuracy, stopped_early = 0.0, False

    model.train()
    try:
        while epochs_run < epochs and not stopped_early:
            epochs_run += 1
            correct, seen = 0, 0
            order = torch.randperm(len(images), generator=generator)
            for first in range(0, len(images), batch_size):
                elapsed = time.perf_counter() - start
                if time_budget_s is not None and elapsed >= time_budget_s:
                    stopped_early = True
                    break
                progress = step / total_steps
                if time_budget_s is not None:
                    progress = max(progress, elapsed / time_budget_s)
                for group in optimizer.param_groups:
                    group["lr"] = lr * _one_cycle(progress)

                index = order[first : first + batch_size]
                batch = images_to_tensor(images[index.numpy()])
                if augment:
                    batch = _augment(batch, generator)
                batch = batch.to(device).contiguous(memory_format=torch.channels_last)
                target = targets[index].to(device)

                logits = model(batch)
                loss = F.cross_entropy(logits, target)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()

                step += 1
                correct += int((logits.argmax(1) == target).sum())
                seen += len(index)
            if seen:
                final_accuracy = correct / seen
            else:  # the budget ran out right at the start of this epoch
                epochs_run -= 1
    finally:
        model.eval()

    return TrainingReport(
        epochs_run=epochs_run,
        seconds=time.perf_counter() - start,
        final_train_accuracy=final_accuracy,
        stopped_early=stopped_early,
    )


def accuracy(
    model: nn.Module, images: np.ndarray, labels: np.ndarray, *, batch_size: int = 500
) -> float:
    """Top-1 accuracy of ``model`` on uint8 NHWC ``images`` in eval mode; the mode is restored."""
    _check_data(images, labels)
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    predictions = predict(model, images, batch_size=batch_size, device=_model_device(model))
    return float((predictions == labels).mean())
