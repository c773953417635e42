"""Threat models (an L-inf or L2 ball around each clean image) and the exact check of an attack
batch against one, on the 0-255 integer pixel scale the grader scores."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from graders.errors import SubmissionRejected

IMAGE_SHAPE = (32, 32, 3)
"""Height, width, channels of one CIFAR-10 image as the grader stores it (uint8, HWC)."""

L2_RELATIVE_SLACK = 1e-6
"""Relative tolerance on L2 distances: covers float rounding of the square root, nothing more."""


class Norm(StrEnum):
    """The norm that measures a perturbation."""

    LINF = "linf"
    L2 = "l2"

    @property
    def label(self) -> str:
        """The name students read in messages ("L-inf", "L2")."""
        return "L-inf" if self is Norm.LINF else "L2"


@dataclass(frozen=True)
class ThreatModel:
    """A norm ball of radius ``eps`` around each clean image, ``eps`` on the 0-255 pixel scale.

    The standard CIFAR-10 models are ``ThreatModel("linf", 8)`` (8/255 on [0, 1] images) and
    ``ThreatModel("l2", 127.5)`` (0.5 on [0, 1] images).
    """

    norm: Norm
    eps: float

    def __post_init__(self) -> None:
        try:
            norm = Norm(self.norm)
        except ValueError:
            accepted = ", ".join(repr(n.value) for n in Norm)
            raise ValueError(f"unknown norm {self.norm!r}; expected one of {accepted}") from None
        if isinstance(self.eps, bool) or not isinstance(self.eps, int | float | np.number):
            raise TypeError(f"eps must be a number on the 0-255 scale, got {self.eps!r}")
        eps = float(self.eps)
        if not math.isfinite(eps) or eps <= 0:
            raise ValueError(f"eps must be finite and > 0 on the 0-255 scale, got {self.eps!r}")
        object.__setattr__(self, "norm", norm)
        object.__setattr__(self, "eps", eps)

    @property
    def eps_unit(self) -> float:
        """``eps`` for images scaled to [0, 1] (8 becomes 8/255)."""
        return self.eps / 255.0


def distances(clean: np.ndarray, adv: np.ndarray, norm: Norm) -> np.ndarray:
    """Per-image distance between two uint8 N x 32 x 32 x 3 batches, on the 0-255 scale.

    Returns float64 of shape (N,). L-inf distances are whole numbers (the largest per-channel
    change); L2 distances are the Euclidean norm of the whole 32 x 32 x 3 difference.
    """
    norm = Norm(norm)
    _check_batch_pair(clean, adv)
    diff = adv.astype(np.int32) - clean.astype(np.int32)
    flat = diff.reshape(diff.shape[0], -1)
    if norm is Norm.LINF:
        return np.abs(flat).max(axis=1).astype(np.float64)
    squared = np.einsum("ij,ij->i", flat, flat, dtype=np.int64)
    return np.sqrt(squared.astype(np.float64))


def check_threat_model(
    clean: np.ndarray,
    adv: np.ndarray,
    threat_model: ThreatModel,
    names: Sequence[str],
    *,
    max_listed: int = 20,
) -> np.ndarray:
    """Return the per-image distances, or reject the batch if any image leaves the threat model.

    L-inf is compared exactly in integers (|adv - clean| <= eps per channel). L2 allows a
    relative slack of ``L2_RELATIVE_SLACK`` for float rounding only. The rejection lists the
    worst ``max_listed`` offenders by name, worst first, so a student can find and fix them.
    """
    if len(names) != clean.shape[0]:
        raise ValueError(f"got {len(names)} names for {clean.shape[0]} images")
    if max_listed < 0:
        raise ValueError(f"max_listed must be >= 0, got {max_listed}")
    dist = distances(clean, adv, threat_model.norm)
    eps = threat_model.eps
    limit = eps if threat_model.norm is Norm.LINF else eps * (1.0 + L2_RELATIVE_SLACK)
    violating = np.flatnonzero(dist > limit)
    if violating.size == 0:
        return dist
    # Stable sort on the negated distance: worst first, ties in batch order.
    order = violating[np.argsort(-dist[violating], kind="stable")]
    listed = [
        {"image": str(names[i]), "distance": _shown_distance(dist[i], threat_model.norm)}
        for i in order[:max_listed]
    ]
    worst = order[0]
    label = threat_model.norm.label
    eps_text = f"{eps:g}"
    if threat_model.norm is Norm.LINF:
        fix = (
            f"Clip each perturbation to [-{eps_text}, {eps_text}] around the clean pixels "
            f"(on [0, 1] images: to [-{eps_text}/255, {eps_text}/255]) before uploading."
        )
    else:
        fix = (
            f"Rescale each perturbation so its L2 norm is at most {eps_text} on the 0-255 scale "
            f"({threat_model.eps_unit:.4g} on [0, 1] images), then round, before uploading."
        )
    count = int(violating.size)
    verb = "is" if count == 1 else "are"
    message = (
        f"{count} of {len(names)} images {verb} outside the {label} threat model "
        f"(eps = {eps_text} on the 0-255 scale); the worst is {names[worst]} at distance "
        f"{_shown_distance(dist[worst], threat_model.norm)}. {fix}"
    )
    details = {
        "norm": threat_model.norm.value,
        "eps": eps,
        "violations": listed,
        "violation_count": count,
    }
    raise SubmissionRejected("threat_model_violated", message, details)


def _shown_distance(value: float, norm: Norm) -> int | float:
    """A distance as students read it: an int for L-inf, four decimals for L2."""
    return int(value) if norm is Norm.LINF else round(float(value), 4)


def _check_batch_pair(clean: np.ndarray, adv: np.ndarray) -> None:
    """Refuse arrays that are not two uint8 N x 32 x 32 x 3 batches of the same N.

    Callers pass batches already parsed by ``graders.batch_formats``, so a mismatch here is a
    programming error (ValueError), not something a student can fix.
    """
    for label, batch in (("clean", clean), ("adv", adv)):
        if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[1:] != IMAGE_SHAPE:
            raise ValueError(
                f"{label} must be uint8 N x 32 x 32 x 3, got {batch.dtype} {batch.shape}"
            )
    if clean.shape != adv.shape:
        raise ValueError(f"clean {clean.shape} and adv {adv.shape} differ in shape")
