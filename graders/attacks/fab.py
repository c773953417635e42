"""The targeted Fast Adaptive Boundary attack (FAB-T) of AutoAttack "standard", and the exact
projection onto a hyperplane inside the [0, 1] box that its steps are built on."""

from __future__ import annotations

import math
from collections.abc import Callable
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
    lp_norms,
    misclassified,
    normal,
    top_targets,
    uniform,
)
from graders.threat_model import Norm

_TINY = 1e-12


def hyperplane_box_projection(x0: Tensor, w: Tensor, c: Tensor, norm: Norm) -> Tensor:
    """The smallest step ``delta`` (in ``norm``) with ``<w, delta> = c`` and ``x0 + delta`` in
    [0, 1], for each row of the N x d batch ``x0`` (with ``w`` N x d and ``c`` of size N).

    This is the closest point of the hyperplane ``{z : <w, z - x0> = c}`` inside the box, the
    projection FAB steps towards. Where the hyperplane misses the box, the step goes as far
    towards it as the box allows (the box corner that maximizes ``<w, delta>`` in the direction
    of ``c``). Rows with ``w = 0`` or ``c = 0`` get ``delta = 0``. Exact up to float rounding:
    both norms reduce to finding the root of a piecewise-linear increasing function, found by
    sorting its breakpoints.
    """
    if x0.dim() != 2 or w.shape != x0.shape or c.shape != x0.shape[:1]:
        raise ValueError(
            f"expected x0 and w of shape N x d and c of shape N, got {tuple(x0.shape)}, "
            f"{tuple(w.shape)} and {tuple(c.shape)}"
        )
    # The plane does not change when (w, c) is rescaled: normalizing keeps w**2 (L2) from
    # underflowing or overflowing, whatever the gradient's scale.
    scale = w.abs().amax(dim=1)
    usable = (scale > 0) & torch.isfinite(scale) & torch.isfinite(c)
    safe_scale = torch.where(usable, scale, torch.ones_like(scale))
    direction = torch.sign(c) * usable
    w = torch.where(usable[:, None], w / safe_scale[:, None], torch.zeros_like(w))
    w = w * direction[:, None]  # now <w, delta> must equal target >= 0
    target = torch.where(usable, c.abs() / safe_scale, torch.zeros_like(c))

    sign = torch.sign(w)
    # How far each coordinate can move in the direction that increases <w, delta>.
    room = torch.where(w > 0, 1.0 - x0, x0).clamp_min(0.0)
    magnitude = w.abs()
    moving = magnitude > 0
    # <w, delta(lam)> = sum_j weight_j * min(lam, knee_j), with delta_j = sign_j * gain_j *
    # min(lam, knee_j): L-inf moves every coordinate by lam until its box face, L2 moves along
    # w (lam * |w_j|) until the face.
    if Norm(norm) is Norm.LINF:
        weight, knee, gain = magnitude, room, torch.ones_like(w)
    else:
        weight = magnitude * magnitude
        knee = torch.where(moving, room / torch.where(moving, magnitude, 1.0), 0.0)
        gain = magnitude
    knee = torch.where(moving, knee, torch.zeros_like(knee))

    knees, order = knee.sort(dim=1)
    weights = weight.gather(1, order)
    zero = torch.zeros_like(target)[:, None]
    # before[k]: sum of weight * knee over the k smallest knees; after[k]: weight of the rest.
    before = torch.cat([zero, (weights * knees).cumsum(dim=1)], dim=1)
    after = torch.cat([weights.flip(1).cumsum(dim=1).flip(1), zero], dim=1)
    at_knees = before[:, 1:] + knees * after[:, 1:]
    reached = at_knees >= target[:, None]
    feasible = reached.any(dim=1)
    segment = reached.float().argmax(dim=1, keepdim=True)  # first knee where target is reached
    low = torch.cat([zero, knees], dim=1).gather(1, segment).squeeze(1)
    high = knees.gather(1, segment).squeeze(1)
    rest = after.gather(1, segment).squeeze(1)
    lam = (target - before.gather(1, segment).squeeze(1)) / rest.clamp_min(_TINY)
    lam = torch.minimum(torch.maximum(lam, low), high)
    lam = torch.where(feasible, lam, knees[:, -1])  # misses the box: as far as it goes
    return sign * gain * torch.minimum(lam[:, None], knee)


class FABTargeted(Attack):
    """FAB-T: the targeted Fast Adaptive Boundary attack, as run by AutoAttack "standard".

    Paper: Croce & Hein, "Minimally distorted adversarial examples with a fast adaptive boundary
    attack", ICML 2020. Threat model: L-inf or L2 ball of radius ``ball.eps`` around [0, 1]
    images, intersected with the box [0, 1].

    For each of the ``n_targets`` classes with the highest clean logits after the top one, in
    turn and only on points no earlier target broke, FAB linearizes ``f_t - f_y`` at the current
    iterate, projects both the iterate and the clean image onto that approximate decision
    hyperplane inside the box (in the ball's norm), and steps to the convex combination of the
    two projections extrapolated by ``eta``, weighted towards the clean image by an adaptive
    ``alpha <= alpha_max``. An iterate that is misclassified is recorded if it is the smallest
    perturbation so far, then pulled back towards the clean image by ``beta``. The first restart
    starts at the clean image, later ones at a random point at distance
    ``min(best norm found, eps) / 2``. FAB minimizes the perturbation rather than working inside
    the ball: a point counts as broken only when its smallest adversarial has norm <= eps.

    Arguments (keyword-only):
        n_targets: target classes per point (default 9, top-2..top-10; capped at classes - 1).
        iterations: steps per target and restart (default 100).
        restarts: runs per target (default 1, the clean start only).
        alpha_max: largest weight of the clean image's projection in a step (default 0.1).
        eta: extrapolation of the projection step past the hyperplane (default 1.05).
        beta: backward step, the fraction of an adversarial perturbation kept (default 0.9).

    Input range: float32 N x C x H x W images in [0, 1]. Returns the smallest adversarial found
    where it is within eps, else the best candidate projected into the ball (or the clean image).
    """

    name: ClassVar[AttackName] = AttackName.FAB_T

    def __init__(
        self,
        *,
        n_targets: int = 9,
        iterations: int = 100,
        restarts: int = 1,
        alpha_max: float = 0.1,
        eta: float = 1.05,
        beta: float = 0.9,
    ) -> None:
        self.n_targets = check_positive_int("n_targets", n_targets)
        self.iterations = check_positive_int("iterations", iterations)
        self.restarts = check_positive_int("restarts", restarts)
        self.alpha_max = _real("alpha_max", alpha_max, "in [0, 1]", lambda v: 0 <= v <= 1)
        self.eta = _real("eta", eta, ">= 1", lambda v: v >= 1)
        self.beta = _real("beta", beta, "in (0, 1]", lambda v: 0 < v <= 1)

    def perturb(
        self, model: TargetModel, x: Tensor, y: Tensor, ball: Ball, generator: torch.Generator
    ) -> Tensor:
        clean_logits = model.logits(x)
        best = x.clone()
        best_norm = torch.full((x.shape[0],), math.inf, device=x.device)
        best_norm[misclassified(clean_logits, y)] = 0.0
        n_targets = min(self.n_targets, clean_logits.shape[1] - 1)
        if n_targets < 1 or ball.eps == 0:
            return x.clone()
        targets = top_targets(clean_logits, n_targets)
        for k in range(n_targets):
            for restart in range(self.restarts):
                active = (best_norm > ball.eps).nonzero().squeeze(1)
                if active.numel() == 0:
                    return ball.project(best, x)
                xa, ya = x[active], y[active]
                if restart == 0:
                    start = xa
                else:
                    radius = best_norm[active].clamp(max=ball.eps) / 2
                    start = _sphere_point(xa, radius, ball.norm, generator)
                candidate, norms = self._run(model, xa, ya, targets[active, k], ball.norm, start)
                improved = norms < best_norm[active]
                # What counts as broken is judged by a fresh fp32 forward pass (attack steps may
                # run under bf16 autocast).
                check = improved & (norms <= ball.eps)
                if bool(check.any()):
                    verified = misclassified(model.verify_logits(candidate[check]), ya[check])
                    improved[check.nonzero().squeeze(1)[~verified]] = False
                best[active[improved]] = candidate[improved]
                best_norm[active[improved]] = norms[improved]
        return ball.project(best, x)

    def _run(
        self, model: TargetModel, x: Tensor, y: Tensor, target: Tensor, norm: Norm, start: Tensor
    ) -> tuple[Tensor, Tensor]:
        """One FAB run towards ``target`` from ``start``: the smallest adversarial found for
        each point and its norm (inf where none was found)."""
        n = x.shape[0]
        flat_x = x.flatten(1)
        best = x.clone()
        best_norm = torch.full((n,), math.inf, device=x.device)
        loss = _target_margin(y, target)
        current = start
        for _ in range(self.iterations):
            value, grad, logits = model.value_and_grad(current, loss)
            # The current iterate (a random start or a pulled-back adversarial) may itself be
            # adversarial: its logits come for free with the gradient.
            _keep_smaller(best, best_norm, current, x, misclassified(logits, y), norm)
            ok = torch.isfinite(grad).flatten(1).all(dim=1) & torch.isfinite(value)
            w = torch.where(ok[:, None], grad.flatten(1), 0.0)
            value = torch.where(ok, value, 0.0)
            flat = current.flatten(1)
            # Linearized boundary: value + <w, z - current> = 0.
            step = hyperplane_box_projection(flat, w, -value, norm)
            step_orig = hyperplane_box_projection(
                flat_x, w, -value - (w * (flat_x - flat)).sum(dim=1), norm
            )
            size, size_orig = lp_norms(step, norm), lp_norms(step_orig, norm)
            alpha = (size / (size + size_orig).clamp_min(_TINY)).clamp(max=self.alpha_max)
            alpha = alpha[:, None]
            moved = (1 - alpha) * (flat + self.eta * step) + alpha * (flat_x + self.eta * step_orig)
            moved = moved.clamp(0.0, 1.0).view_as(x)
            adversarial = misclassified(model.logits(moved), y)
            _keep_smaller(best, best_norm, moved, x, adversarial, norm)
            pulled_back = x + self.beta * (moved - x)
            current = torch.where(adversarial.view(-1, 1, 1, 1), pulled_back, moved)
        return best, best_norm


def _target_margin(y: Tensor, target: Tensor) -> LossFn:
    """``z_t - z_y`` per point: positive once class ``target`` beats the true class."""

    def loss(logits: Tensor) -> Tensor:
        return (logits.gather(1, target[:, None]) - logits.gather(1, y[:, None])).squeeze(1)

    return loss


def _keep_smaller(
    best: Tensor, best_norm: Tensor, candidate: Tensor, x: Tensor, adversarial: Tensor, norm: Norm
) -> None:
    """Record, in place, adversarial candidates smaller than the best so far."""
    norms = lp_norms(candidate - x, norm)
    better = adversarial & (norms < best_norm)
    best[better] = candidate[better]
    best_norm[better] = norms[better]


def _sphere_point(x: Tensor, radius: Tensor, norm: Norm, generator: torch.Generator) -> Tensor:
    """A random point at distance ``radius`` (per point) from ``x`` in ``norm``, in the box."""
    if norm is Norm.LINF:
        direction = uniform(x.shape, generator, x.device) * 2 - 1
    else:
        direction = normal(x.shape, generator, x.device)
    direction = direction / lp_norms(direction, norm).clamp_min(_TINY).view(-1, 1, 1, 1)
    return (x + radius.view(-1, 1, 1, 1) * direction).clamp(0.0, 1.0)


def _real(name: str, value: float, where: str, accept: Callable[[float], bool]) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not accept(value)
    ):
        raise ValueError(f"{name} must be a finite number {where}, got {value!r}")
    return float(value)
