"""Auto-PGD (APGD), the step-size-free gradient attack of AutoAttack, in its untargeted
(cross-entropy or DLR loss) and targeted (DLR towards the runner-up classes) variants."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from enum import StrEnum
from typing import ClassVar

import torch
from torch import Tensor

from graders.attacks.core import (
    Attack,
    AttackName,
    Ball,
    LossFn,
    TargetModel,
    check_positive_int,
    cross_entropy,
    dlr,
    misclassified,
    targeted_dlr,
    top_targets,
)
from graders.attacks.pgd import Candidates, ascent_direction

MOMENTUM = 0.75
"""Weight of the new projected gradient step against the previous update (alpha in the paper)."""

INITIAL_STEP = 2.0
"""The first step size, in units of eps."""

RHO = 0.75
"""Default share of loss-raising steps between checkpoints below which the step is halved."""

LossFactory = Callable[[Tensor], LossFn]
"""Builds the loss of the points with the given batch indices (labels and targets are per point,
and points leave the batch as they break)."""


class ApgdLoss(StrEnum):
    """The loss an untargeted APGD run maximizes."""

    CE = "ce"
    DLR = "dlr"


_NAMES = {ApgdLoss.CE: AttackName.APGD_CE, ApgdLoss.DLR: AttackName.APGD_DLR}
_LOSSES: dict[ApgdLoss, Callable[[Tensor], LossFn]] = {
    ApgdLoss.CE: cross_entropy,
    ApgdLoss.DLR: dlr,
}


def checkpoints(iterations: int) -> list[int]:
    """The iterations after which APGD may halve its step: ``ceil(p_j * iterations)`` with
    ``p_0 = 0``, ``p_1 = 0.22``, ``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``, those
    strictly between 0 and ``iterations`` (100 iterations: 22, 41, 57, 70, 80, 87, 93, 99)."""
    found: list[int] = []
    previous, current = 0.0, 0.22
    while current < 1.0:
        # The tolerance keeps float noise (0.22 * 100 = 22.000000000000004) from adding one.
        w = math.ceil(current * iterations - 1e-9)
        if 0 < w < iterations and (not found or w > found[-1]):
            found.append(w)
        previous, current = current, current + max(current - previous - 0.03, 0.06)
    return found


def _check_rho(rho: object) -> float:
    if isinstance(rho, bool) or not isinstance(rho, int | float) or not 0 < rho <= 1:
        raise ValueError(f"rho must be a number in (0, 1], got {rho!r}")
    return float(rho)


@dataclass
class _RunState:
    """Per point still in the batch of one APGD run: where it is, its best point so far, and
    its step-size bookkeeping since the last checkpoint."""

    rows: Tensor  # indices into the attacked batch
    clean: Tensor
    labels: Tensor
    x: Tensor  # the current iterate, its gradient and loss
    grad: Tensor
    loss: Tensor
    x_prev: Tensor  # the iterate before (for the momentum term)
    x_best: Tensor  # the highest-loss iterate, its gradient and loss
    grad_best: Tensor
    loss_best: Tensor
    step: Tensor
    increases: Tensor  # steps that raised the loss since the last checkpoint
    best_at_check: Tensor  # loss_best at the last checkpoint
    halved_at_check: Tensor  # whether the step was halved at the last checkpoint

    def keep(self, mask: Tensor) -> _RunState:
        """The state of the points where ``mask`` holds."""
        return _RunState(**{f.name: getattr(self, f.name)[mask] for f in fields(self)})


def _run(
    model: TargetModel,
    x: Tensor,
    y: Tensor,
    rows: Tensor,
    loss_for: LossFactory,
    ball: Ball,
    *,
    iterations: int,
    rho: float,
    generator: torch.Generator,
    found: Candidates,
) -> None:
    """One APGD run from a random start on the points ``rows`` of ``x``, reporting every iterate
    to ``found``. A point leaves the batch at its first misclassified iterate: every update is
    per point and all randomness is drawn at the start, so the points that stay follow exactly
    the path they would follow in the full batch."""
    schedule = set(checkpoints(iterations))
    clean, labels = x[rows], y[rows]
    start = ball.random_start(clean, generator)
    loss, grad, logits = model.value_and_grad(start, loss_for(rows))
    adversarial = misclassified(logits, labels)
    found.offer(rows, start, loss, adversarial)
    s = _RunState(
        rows=rows,
        clean=clean,
        labels=labels,
        x=start,
        grad=grad,
        loss=loss,
        x_prev=start,
        x_best=start,
        grad_best=grad,
        loss_best=loss,
        step=torch.full_like(loss, INITIAL_STEP * ball.eps),
        increases=torch.zeros_like(loss),
        best_at_check=loss,
        halved_at_check=torch.zeros_like(adversarial),
    )
    last_check = 0

    for k in range(iterations):
        if bool(adversarial.any()):
            if bool(adversarial.all()):
                return
            s = s.keep(~adversarial)

        z = ball.project(s.x + _per_point(s.step) * ascent_direction(s.grad, ball.norm), s.clean)
        if k == 0:
            x_next = z
        else:
            moved = s.x + MOMENTUM * (z - s.x) + (1 - MOMENTUM) * (s.x - s.x_prev)
            x_next = ball.project(moved, s.clean)

        loss, grad, logits = model.value_and_grad(x_next, loss_for(s.rows))
        adversarial = misclassified(logits, s.labels)
        found.offer(s.rows, x_next, loss, adversarial)
        s.increases = s.increases + (loss > s.loss).float()
        improved = loss > s.loss_best
        s.x_best = torch.where(_per_point(improved), x_next, s.x_best)
        s.grad_best = torch.where(_per_point(improved), grad, s.grad_best)
        s.loss_best = torch.where(improved, loss, s.loss_best)
        s.x_prev, s.x, s.grad, s.loss = s.x, x_next, grad, loss

        if k + 1 in schedule:
            # Halve where too few steps raised the loss since the last checkpoint, or where the
            # step was kept then and the best loss has not moved since; restart there from the
            # best point (whose gradient is known).
            few_increases = s.increases < rho * (k + 1 - last_check)
            stalled = ~s.halved_at_check & (s.loss_best <= s.best_at_check)
            halve = few_increases | stalled
            s.step = torch.where(halve, s.step / 2, s.step)
            s.x = torch.where(_per_point(halve), s.x_best, s.x)
            s.grad = torch.where(_per_point(halve), s.grad_best, s.grad)
            s.loss = torch.where(halve, s.loss_best, s.loss)
            s.halved_at_check, s.best_at_check = halve, s.loss_best
            s.increases = torch.zeros_like(s.increases)
            last_check = k + 1


def _per_point(values: Tensor) -> Tensor:
    """A per-point vector shaped to broadcast over N x C x H x W."""
    return values.view(-1, 1, 1, 1)


def _apgd_attack(
    model: TargetModel,
    x: Tensor,
    y: Tensor,
    ball: Ball,
    generator: torch.Generator,
    *,
    losses: list[LossFactory],
    iterations: int,
    restarts: int,
    rho: float,
) -> Tensor:
    """``restarts`` APGD runs per loss in ``losses``, one loss after another, each run only on
    the points no earlier run broke; per point the first adversarial iterate, else the one with
    the highest loss."""
    found = Candidates.start(x)
    for loss_for in losses:
        for _ in range(restarts):
            rows = found.robust_rows()
            if rows.numel() == 0:
                return found.x
            _run(
                model,
                x,
                y,
                rows,
                loss_for,
                ball,
                iterations=iterations,
                rho=rho,
                generator=generator,
                found=found,
            )
    return found.x


class APGD(Attack):
    """Untargeted Auto-PGD (Croce & Hein 2020, "Reliable evaluation of adversarial robustness
    with an ensemble of diverse parameter-free attacks"): APGD-CE or APGD-DLR.

    Threat model: L-inf (sign-of-gradient steps) or L2 (steps along the gradient normalized
    per point, with the same schedule). Input: float NCHW images in [0, 1], eps on the [0, 1]
    scale. Each run starts at a random point of the ball with step ``2 * eps``, adds momentum
    0.75 after the first step, and at checkpoints 22%, 41%, 57%, ... of the iterations halves
    the step of each point whose loss rose in fewer than ``rho`` of the steps since the last
    checkpoint, or whose step and best loss both stayed unchanged since then, restarting it from
    its best point. Loss and gradient come from ``model.value_and_grad`` (EOT and bf16 apply).

    Arguments (keyword-only):
    - ``loss`` = ``ApgdLoss.CE``: cross-entropy ("ce", APGD-CE) or DLR ("dlr", APGD-DLR).
    - ``iterations`` = 100: steps per run (``iterations`` + 1 loss evaluations per point).
    - ``restarts`` = 1: runs from fresh random starts, each only on the points not yet broken.
    - ``rho`` = 0.75: the share of loss-raising steps below which the step is halved.

    Returns, per point, the first misclassified iterate, else the highest-loss iterate. Points
    leave the batch at their first misclassified iterate, which leaves the result unchanged.
    """

    def __init__(
        self,
        *,
        loss: ApgdLoss = ApgdLoss.CE,
        iterations: int = 100,
        restarts: int = 1,
        rho: float = RHO,
    ) -> None:
        try:
            self.loss = ApgdLoss(loss)
        except ValueError:
            accepted = ", ".join(repr(v.value) for v in ApgdLoss)
            raise ValueError(f"unknown APGD loss {loss!r}; expected one of {accepted}") from None
        self.iterations = check_positive_int("iterations", iterations)
        self.restarts = check_positive_int("restarts", restarts)
        self.rho = _check_rho(rho)

    # The base class declares ``name`` a class constant; here it depends on the loss, so it is a
    # read-only property (reading ``attack.name`` works the same; only assigning it would not).
    @property
    def name(self) -> AttackName:  # type: ignore[override]
        """APGD-CE or APGD-DLR, by the loss."""
        return _NAMES[self.loss]

    def perturb(
        self, model: TargetModel, x: Tensor, y: Tensor, ball: Ball, generator: torch.Generator
    ) -> Tensor:
        make = _LOSSES[self.loss]
        return _apgd_attack(
            model,
            x,
            y,
            ball,
            generator,
            losses=[lambda rows: make(y[rows])],
            iterations=self.iterations,
            restarts=self.restarts,
            rho=self.rho,
        )


class APGDTargeted(Attack):
    """Targeted Auto-PGD with the targeted DLR loss, APGD-T (Croce & Hein 2020, "Reliable
    evaluation of adversarial robustness with an ensemble of diverse parameter-free attacks").

    Threat model, input range and step schedule as :class:`APGD`. The targets of each point are
    the classes with its 2nd, 3rd, ..., (``n_targets`` + 1)-th highest clean logits; one target
    after another, each only on the points no earlier target broke. Success means leaving the
    true class (any wrong class counts, not only the target).

    Arguments (keyword-only):
    - ``n_targets`` = 9: target classes per point (at most the number of classes - 1).
    - ``iterations`` = 100: steps per run.
    - ``restarts`` = 1: runs per target, each only on the points not yet broken.
    - ``rho`` = 0.75: the share of loss-raising steps below which the step is halved.

    Returns, per point, the first misclassified iterate, else the highest-loss iterate.
    """

    name: ClassVar[AttackName] = AttackName.APGD_T

    def __init__(
        self,
        *,
        n_targets: int = 9,
        iterations: int = 100,
        restarts: int = 1,
        rho: float = RHO,
    ) -> None:
        self.n_targets = check_positive_int("n_targets", n_targets)
        self.iterations = check_positive_int("iterations", iterations)
        self.restarts = check_positive_int("restarts", restarts)
        self.rho = _check_rho(rho)

    def perturb(
        self, model: TargetModel, x: Tensor, y: Tensor, ball: Ball, generator: torch.Generator
    ) -> Tensor:
        targets = top_targets(model.logits(x), self.n_targets)

        def towards(column: int) -> LossFactory:
            return lambda rows: targeted_dlr(y[rows], targets[rows, column])

        return _apgd_attack(
            model,
            x,
            y,
            ball,
            generator,
            losses=[towards(column) for column in range(self.n_targets)],
            iterations=self.iterations,
            restarts=self.restarts,
            rho=self.rho,
        )
