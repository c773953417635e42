"""Projected gradient descent (PGD), and the pieces every iterative gradient attack of the suite
shares: the steepest-ascent direction of a norm and the per-point record of what was found."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from graders.attacks.core import (
    Attack,
    AttackName,
    Ball,
    TargetModel,
    check_positive_int,
    cross_entropy,
    misclassified,
)
from graders.threat_model import Norm


def ascent_direction(grad: Tensor, norm: Norm) -> Tensor:
    """The unit step of ``norm`` that increases the loss most to first order: the sign of the
    gradient for L-inf, the gradient divided by its L2 norm (per point) for L2.

    Non-finite gradient entries count as zero, so one bad coordinate cannot turn the whole
    iterate into NaN; a zero gradient gives a zero step.
    """
    grad = torch.where(torch.isfinite(grad), grad, torch.zeros_like(grad))
    if norm is Norm.LINF:
        return grad.sign()
    norms = grad.flatten(1).norm(p=2, dim=1).clamp_min(1e-12)
    return grad / norms.view(-1, *([1] * (grad.dim() - 1)))


@dataclass
class Candidates:
    """Per point of a batch, an attack's answer so far: the first adversarial (misclassified)
    iterate it found, else the iterate with the highest loss (the clean point until one is
    offered). ``broken`` marks the points with an adversarial iterate."""

    x: Tensor
    loss: Tensor
    broken: Tensor

    @classmethod
    def start(cls, x: Tensor) -> Candidates:
        """Nothing found yet: the clean points, loss -inf, none broken."""
        n = x.shape[0]
        return cls(
            x=x.clone(),
            loss=torch.full((n,), -math.inf, device=x.device),
            broken=torch.zeros(n, dtype=torch.bool, device=x.device),
        )

    def robust_rows(self) -> Tensor:
        """Indices of the points not broken yet (what a restart runs on)."""
        return (~self.broken).nonzero().squeeze(1)

    def offer(self, rows: Tensor, x_new: Tensor, loss: Tensor, adversarial: Tensor) -> None:
        """Iterates ``x_new`` for the points ``rows`` (with their loss and whether the model
        misclassifies them): keep each if it is the point's first adversarial one, or if no
        adversarial one is known and its loss is the highest so far."""
        known = self.broken[rows]
        first_adversarial = adversarial & ~known
        higher = ~adversarial & ~known & (loss > self.loss[rows])
        take = first_adversarial | higher
        if bool(take.any()):
            self.x[rows[take]] = x_new[take].detach()
            self.loss[rows[take]] = loss[take].detach()
            self.broken[rows[first_adversarial]] = True


class PGD(Attack):
    """Projected gradient descent on the cross-entropy loss (Madry et al. 2018, "Towards Deep
    Learning Models Resistant to Adversarial Attacks").

    Threat model: L-inf (steps along the sign of the gradient) or L2 (steps along the gradient
    normalized per point), each step projected back onto the ball and the [0, 1] box. Input:
    float NCHW images in [0, 1], eps on the [0, 1] scale.

    Arguments (keyword-only):
    - ``steps`` = 20: gradient steps per restart (``steps`` + 1 loss evaluations).
    - ``restarts`` = 1: runs from fresh random starts; each one after the first runs only on
      the points no earlier run broke.
    - ``step_size`` = None: the step on the [0, 1] scale; None means ``2.5 * eps / steps``.
    - ``random_start`` = True: start each run at a uniformly random point of the ball instead
      of the clean image (``restarts`` > 1 needs it, or the restarts would repeat the first).

    Returns, per point, the first iterate that is misclassified, else the highest-loss iterate.
    A point leaves the batch as soon as one of its iterates is misclassified.
    """

    name: ClassVar[AttackName] = AttackName.PGD

    def __init__(
        self,
        *,
        steps: int = 20,
        restarts: int = 1,
        step_size: float | None = None,
        random_start: bool = True,
    ) -> None:
        self.steps = check_positive_int("steps", steps)
        self.restarts = check_positive_int("restarts", restarts)
        if step_size is not None and (
            isinstance(step_size, bool)
            or not isinstance(step_size, int | float)
            or not math.isfinite(step_size)
            or step_size <= 0
        ):
            raise ValueError(f"step_size must be None or a finite number > 0, got {step_size!r}")
        self.step_size = None if step_size is None else float(step_size)
        if not isinstance(random_start, bool):
            raise ValueError(f"random_start must be a bool, got {random_start!r}")
        if self.restarts > 1 and not random_start:
            raise ValueError("restarts > 1 needs random_start=True (else every run is the same)")
        self.random_start = random_start

    def perturb(
        self, model: TargetModel, x: Tensor, y: Tensor, ball: Ball, generator: torch.Generator
    ) -> Tensor:
        step = self.step_size if self.step_size is not None else 2.5 * ball.eps / self.steps
        found = Candidates.start(x)
        for _ in range(self.restarts):
            rows = found.robust_rows()
            if rows.numel() == 0:
                break
            clean, labels = x[rows], y[rows]
            x_adv = ball.random_start(clean, generator) if self.random_start else clean.clone()
            for k in range(self.steps + 1):
                loss, grad, logits = model.value_and_grad(x_adv, cross_entropy(labels))
                adversarial = misclassified(logits, labels)
                found.offer(rows, x_adv, loss, adversarial)
                if k == self.steps:
                    break
                going = ~adversarial
                if not bool(going.all()):
                    if not bool(going.any()):
                        break
                    rows, clean, labels = rows[going], clean[going], labels[going]
                    x_adv, grad = x_adv[going], grad[going]
                x_adv = ball.project(x_adv + step * ascent_direction(grad, ball.norm), clean)
        return found.x
