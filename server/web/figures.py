"""What the detail pages draw: sample images of an attack batch as PNGs (clean, adversarial and
the perturbation made visible), and the geometry of the SVG charts (distance histograms, the
accuracy-vs-eps plot) that the templates turn into markup."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import numpy as np
from PIL import Image

from graders.datasets import EvalSet
from graders.threat_model import Norm, distances

SAMPLE_COUNT = 6
"""How many images of a batch the detail page shows."""

GREY = 128
"""The value of an unchanged pixel in a perturbation image."""


class SampleKind(StrEnum):
    """The three pictures of one sample image."""

    CLEAN = "clean"
    ADVERSARIAL = "adversarial"
    PERTURBATION = "perturbation"


class BatchUnavailable(Exception):
    """The stored batch cannot be shown (gone, or no longer matching the phase's clean set)."""


def load_batch(path: Path, eval_set: EvalSet) -> np.ndarray:
    """A stored attack batch, read without unpickling and checked against the clean images."""
    try:
        batch = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise BatchUnavailable(f"the stored batch cannot be read ({exc})") from exc
    if batch.dtype != np.uint8 or batch.shape != eval_set.images.shape:
        raise BatchUnavailable(
            f"the stored batch ({batch.dtype}, {batch.shape}) does not match the phase's clean "
            f"images ({eval_set.images.shape}); the phase's evaluation set has changed"
        )
    return batch


def sample_indices(n_images: int, count: int = SAMPLE_COUNT) -> list[int]:
    """``count`` images spread evenly over the batch (the same ones on every visit)."""
    if n_images <= count:
        return list(range(n_images))
    return [round(i * (n_images - 1) / (count - 1)) for i in range(count)]


def amplification(clean: np.ndarray, adversarial: np.ndarray) -> float:
    """The factor that stretches this image's largest change to the full grey range (1 if it
    is unchanged)."""
    largest = int(np.abs(adversarial.astype(np.int32) - clean.astype(np.int32)).max())
    return (GREY - 1) / largest if largest else 1.0


def sample_image(clean: np.ndarray, adversarial: np.ndarray, kind: SampleKind) -> np.ndarray:
    """One 32 x 32 x 3 uint8 picture: the clean image, the adversarial one, or their difference
    amplified around mid-grey (grey = unchanged, brighter = raised, darker = lowered)."""
    if kind is SampleKind.CLEAN:
        return clean
    if kind is SampleKind.ADVERSARIAL:
        return adversarial
    diff = adversarial.astype(np.float64) - clean.astype(np.float64)
    return np.clip(np.rint(GREY + diff * amplification(clean, adversarial)), 0, 255).astype(
        np.uint8
    )


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


# --- Charts -----------------------------------------------------------------------------------

WIDTH, HEIGHT = 560.0, 240.0
LEFT, RIGHT, TOP, BOTTOM = 56.0, 16.0, 16.0, 44.0
"""The SVG canvas and the margins around the plotting area (axis labels live in the margins)."""


@dataclass(frozen=True)
class Tick:
    position: float
    label: str


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    label: str
    """The bin, in words (for the tooltip and the table)."""
    count: int


@dataclass(frozen=True)
class Histogram:
    """A bar chart of how many images fall in each distance bin."""

    title: str
    x_label: str
    bars: list[Bar]
    x_ticks: list[Tick]
    y_ticks: list[Tick]
    limit_x: float | None
    """Where the threat model's eps lies on the x axis, if it is inside the chart."""
    limit_label: str
    summary: str
    width: float = WIDTH
    height: float = HEIGHT
    left: float = LEFT
    bottom: float = HEIGHT - BOTTOM
    right: float = WIDTH - RIGHT
    top: float = TOP


@dataclass(frozen=True)
class PlotPoint:
    x: float
    y: float
    eps: float
    value: float


@dataclass(frozen=True)
class LinePlot:
    """Robust accuracy against eps, on a log(1 + eps) axis so 0, 1, 2, 4 ... 64 spread out."""

    title: str
    x_label: str
    y_label: str
    points: list[PlotPoint]
    path: str
    x_ticks: list[Tick]
    y_ticks: list[Tick]
    marker_x: float | None
    """Where the phase's own eps lies on the x axis."""
    marker_label: str
    summary: str
    width: float = WIDTH
    height: float = HEIGHT
    left: float = LEFT
    bottom: float = HEIGHT - BOTTOM
    right: float = WIDTH - RIGHT
    top: float = TOP


def _count_axis(largest: int) -> tuple[int, list[Tick]]:
    """The top of a histogram's count axis (a round number at or above ``largest``) and its
    ticks: at most 5, in steps of 1, 2 or 5 times a power of ten."""
    largest = max(1, largest)
    step = next(
        factor * 10**power
        for power in range(len(str(largest)) + 1)
        for factor in (1, 2, 5)
        if math.ceil(largest / (factor * 10**power)) <= 4
    )
    top = math.ceil(largest / step) * step
    plot_height = HEIGHT - TOP - BOTTOM
    ticks = [
        Tick(HEIGHT - BOTTOM - plot_height * value / top, str(value))
        for value in range(0, top + 1, step)
    ]
    return top, ticks


def _bars(counts: Sequence[int], labels: Sequence[str], top: int) -> list[Bar]:
    plot_width = WIDTH - LEFT - RIGHT
    plot_height = HEIGHT - TOP - BOTTOM
    slot = plot_width / len(counts)
    bars = []
    for i, (count, label) in enumerate(zip(counts, labels, strict=True)):
        height = plot_height * count / top
        bars.append(
            Bar(
                x=LEFT + i * slot + slot * 0.1,
                y=HEIGHT - BOTTOM - height,
                width=slot * 0.8,
                height=height,
                label=label,
                count=int(count),
            )
        )
    return bars


def linf_histogram(dist: np.ndarray, eps: float | None) -> Histogram:
    """One bar per whole-number L-inf distance (0-255 scale), from 0 to the larger of the
    largest distance and ``eps``; ``eps`` (an L-inf threat model's) is marked."""
    values = dist.astype(np.int64)
    top = int(max(values.max(initial=0), math.ceil(eps) if eps is not None else 0))
    counts = np.bincount(values, minlength=top + 1).tolist()
    count_top, count_ticks = _count_axis(max(counts))
    bars = _bars(counts, [f"L-inf distance {d}" for d in range(top + 1)], count_top)
    label_every = max(1, math.ceil((top + 1) / 12))
    ticks = [
        Tick(bar.x + bar.width / 2, str(d))
        for d, bar in enumerate(bars)
        if d % label_every == 0 or d == top
    ]
    limit_x = None
    if eps is not None and eps <= top:  # the edge between the last allowed bin and the next
        slot = (WIDTH - LEFT - RIGHT) / (top + 1)
        limit_x = LEFT + (math.floor(eps) + 1) * slot
    return Histogram(
        title="L-inf distance of each image to its clean image",
        x_label="largest change of any pixel channel (0-255 scale)",
        bars=bars,
        x_ticks=ticks,
        y_ticks=count_ticks,
        limit_x=limit_x,
        limit_label=f"eps {eps:g}" if eps is not None else "",
        summary=_summary(dist, "L-inf", digits=0),
    )


def l2_histogram(dist: np.ndarray, eps: float | None, bins: int = 16) -> Histogram:
    """``bins`` equal-width bars of L2 distance (0-255 scale). Under an L2 threat model the axis
    runs from 0 to the larger of the largest distance and ``eps`` (marked); otherwise it spans
    the distances found, which an L-inf budget packs into a narrow band far from 0."""
    low = 0.0 if eps is not None or dist.size == 0 else math.floor(float(dist.min()))
    high = float(max(dist.max(initial=0.0), eps or 0.0))
    high = high if high > low else low + 1.0
    edges = np.linspace(low, high, bins + 1)
    counts = np.histogram(dist, bins=edges)[0].tolist()
    labels = [f"L2 distance {edges[i]:.1f} to {edges[i + 1]:.1f}" for i in range(bins)]
    count_top, count_ticks = _count_axis(max(counts))
    bars = _bars(counts, labels, count_top)
    plot_width = WIDTH - LEFT - RIGHT
    ticks = [Tick(LEFT + plot_width * i / 4, f"{low + (high - low) * i / 4:.0f}") for i in range(5)]
    limit_x = LEFT + plot_width * (eps - low) / (high - low) if eps is not None else None
    return Histogram(
        title="L2 distance of each image to its clean image",
        x_label="Euclidean norm of the change (0-255 scale)",
        bars=bars,
        x_ticks=ticks,
        y_ticks=count_ticks,
        limit_x=limit_x,
        limit_label=f"eps {eps:g}" if eps is not None else "",
        summary=_summary(dist, "L2", digits=1),
    )


def _summary(dist: np.ndarray, label: str, digits: int) -> str:
    if dist.size == 0:
        return f"No images, so no {label} distances."
    unchanged = int((dist == 0).sum())
    return (
        f"{label} distances of {dist.size} images: smallest {dist.min():.{digits}f}, mean "
        f"{dist.mean():.1f}, largest {dist.max():.{digits}f}; {unchanged} unchanged."
    )


@dataclass(frozen=True)
class BatchDistances:
    """Per-image distances of a stored batch to the clean images, and their histograms."""

    linf: Histogram
    l2: Histogram


def batch_distances(
    clean: np.ndarray, adversarial: np.ndarray, norm: Norm, eps: float
) -> BatchDistances:
    """Both histograms of a batch; the threat model's eps is marked on the chart of its norm."""
    return BatchDistances(
        linf=linf_histogram(
            distances(clean, adversarial, Norm.LINF), eps if norm is Norm.LINF else None
        ),
        l2=l2_histogram(distances(clean, adversarial, Norm.L2), eps if norm is Norm.L2 else None),
    )


def _log_axis(eps: float) -> float:
    return math.log2(1.0 + eps)


def sweep_plot(sweep: Sequence[tuple[float, float]], eps: float, norm_label: str) -> LinePlot:
    """Robust accuracy (fraction) at each eps of a sweep, with the phase's eps marked."""
    ordered = sorted(sweep)
    largest = max([e for e, _ in ordered] + [eps, 1.0])
    span = _log_axis(largest)
    plot_width = WIDTH - LEFT - RIGHT
    plot_height = HEIGHT - TOP - BOTTOM

    def x_of(value: float) -> float:
        return LEFT + plot_width * _log_axis(value) / span

    def y_of(accuracy: float) -> float:
        return HEIGHT - BOTTOM - plot_height * accuracy

    points = [PlotPoint(x_of(e), y_of(a), e, a) for e, a in ordered]
    path = " ".join(f"{'M' if i == 0 else 'L'}{p.x:.1f},{p.y:.1f}" for i, p in enumerate(points))
    x_ticks = [Tick(x_of(e), f"{e:g}") for e in sorted({e for e, _ in ordered})]
    y_ticks = [Tick(y_of(v / 4), f"{v * 25} %") for v in range(5)]
    described = ", ".join(f"{a * 100:.1f} % at eps {e:g}" for e, a in ordered)
    return LinePlot(
        title=f"Robust accuracy against the {norm_label} budget",
        x_label="eps on the 0-255 scale (logarithmic axis)",
        y_label="robust accuracy",
        points=points,
        path=path,
        x_ticks=x_ticks,
        y_ticks=y_ticks,
        marker_x=x_of(eps),
        marker_label=f"phase eps {eps:g}",
        summary=f"Robust accuracy {described}." if ordered else "No sweep points.",
    )
