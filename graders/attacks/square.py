"""Square Attack: the score-based black-box attack of the defense suite (random search over
square-shaped updates, no gradients), the suite's canary for masked gradients."""

from __future__ import annotations

import math
from bisect import bisect_left
from functools import lru_cache
from typing import ClassVar

import torch
from torch import Tensor

from graders.attacks.core import (
    Attack,
    AttackName,
    Ball,
    TargetModel,
    margin,
    randint,
)
from graders.threat_model import Norm

_P_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)
"""Iterations (of a 10,000-query run) after which the window fraction ``p`` halves."""

_SCHEDULE_QUERIES = 10_000
"""The budget the published schedule is written for; other budgets rescale it linearly."""

_L2_MIN_SIDE = 3
"""Smallest L2 window: the pattern of a 1x1 or 2x2 window is flat, so it carries no shape."""

_L2_TILES = 5
"""The L2 initialization tiles each side of the image with this many patterns."""


_MAX_REDRAWS = 8
"""L-inf: a window whose new signs equal its current ones would waste a query; draw the signs
at most this many times looking for a change."""


class Square(Attack):
    """Square Attack (Andriushchenko, Croce, Flammarion & Hein, ECCV 2020, "Square Attack: a
    query-efficient black-box adversarial attack via random search"), untargeted, as in
    AutoAttack standard.

    Threat model: L-inf or L2 ball of radius ``eps`` around [0, 1] images, intersected with the
    box [0, 1]. Score-based: only logits are queried (``model.logits``), never gradients, so
    gradient masking does not stop it. The loss is the margin ``max_{k != y} z_k - z_y``
    (positive once the point is misclassified); a candidate is kept only if it raises it.

    Each iteration changes one random square window per point; its side is
    ``round(sqrt(p * H * W))`` where ``p`` starts at ``p_init`` and halves after iterations 10, 50,
    200, 500, 1000, 2000, 4000, 6000 and 8000 of a 10,000-query run (rescaled linearly to
    ``queries``, as the paper does for other budgets). Windows are drawn independently per point.

    - L-inf: starts from vertical stripes (one random ``+-eps`` per column and channel); each
      iteration sets the window to a random ``+-eps`` per channel (redrawn if that would leave
      the window unchanged).
    - L2: starts from a grid of 5 x 5 tiles each holding the paper's centred pattern ``eta``
      (concentric squares, largest in the middle) with a random sign per channel, scaled to norm
      ``eps``. Each iteration (the paper's Algorithm 3) picks two windows W1 and W2 and, per
      channel, moves the perturbation mass of W1 u W2 (plus any budget left unused by clipping
      to [0, 1]) into W1, shaped as ``+-eta`` added to W1's current direction, so the norm of
      the perturbation stays ``eps`` before the box clipping. Simplifications: the pattern is
      the paper's formula (2), not the two half-windows of opposite signs of the authors' code,
      and windows are at least 3 x 3.

    Points stop querying as soon as they are misclassified: each iteration only the still-robust
    points are queried. A point costs at most ``queries`` forward passes per restart (the
    initialization counts as one); a restart runs only on points the previous ones did not
    break, from a fresh initialization, and the higher-margin result of the restarts is kept.

    Args:
        queries: forward passes per point and restart (AutoAttack: 5000).
        p_init: initial fraction of the image's pixels the window covers, in (0, 1]
            (AutoAttack: 0.8).
        restarts: independent runs on the points still robust (AutoAttack: 1).

    Input range: float NCHW images in [0, 1]; all randomness comes from ``generator``.
    """

    name: ClassVar[AttackName] = AttackName.SQUARE

    def __init__(self, *, queries: int = 5000, p_init: float = 0.8, restarts: int = 1) -> None:
        if isinstance(queries, bool) or not isinstance(queries, int) or queries < 1:
            raise ValueError(f"queries must be an integer >= 1, got {queries!r}")
        if (
            isinstance(p_init, bool)
            or not isinstance(p_init, int | float)
            or not math.isfinite(p_init)
            or not 0 < p_init <= 1
        ):
            raise ValueError(f"p_init must be a number in (0, 1], got {p_init!r}")
        if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 1:
            raise ValueError(f"restarts must be an integer >= 1, got {restarts!r}")
        self.queries = queries
        self.p_init = float(p_init)
        self.restarts = restarts

    def perturb(
        self, model: TargetModel, x: Tensor, y: Tensor, ball: Ball, generator: torch.Generator
    ) -> Tensor:
        best = x.clone()
        if ball.eps == 0:
            return best
        best_margin = torch.full((x.shape[0],), -math.inf, device=x.device)
        for _ in range(self.restarts):
            todo = (best_margin <= 0).nonzero().squeeze(1)
            if todo.numel() == 0:
                break
            x_adv, found = self._search(model, x[todo], y[todo], ball, generator)
            better = found > best_margin[todo]
            best[todo[better]] = x_adv[better]
            best_margin[todo[better]] = found[better]
        return best

    def window_fraction(self, iteration: int) -> float:
        """``p`` at ``iteration`` (1-based, the initialization being query 0): ``p_init`` halved
        at each threshold of the published schedule, rescaled to ``queries``."""
        scaled = int(iteration * _SCHEDULE_QUERIES / self.queries)
        return self.p_init / 2 ** bisect_left(_P_HALVINGS, scaled)

    def _search(
        self, model: TargetModel, x: Tensor, y: Tensor, ball: Ball, generator: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        """One run: the best point found for each image and its margin."""
        if ball.norm is Norm.LINF:
            x_best = _linf_init(x, ball.eps, generator)
        else:
            x_best = ball.project(x + _l2_init(x, ball.eps, generator), x)
        best_margin = margin(y)(model.logits(x_best))
        active = (best_margin <= 0).nonzero().squeeze(1)
        _, _, h, w = x.shape
        for iteration in range(1, self.queries):
            if active.numel() == 0:
                break
            p = self.window_fraction(iteration)
            x_act, best_act = x[active], x_best[active]
            if ball.norm is Norm.LINF:
                side = _side(p, h, w, minimum=1)
                candidate = _linf_step(x_act, best_act, ball.eps, side, generator)
            else:
                side = _side(p, h, w, minimum=_L2_MIN_SIDE)
                candidate = _l2_step(x_act, best_act, ball, side, generator)
            found = margin(y[active])(model.logits(candidate))
            improved = found > best_margin[active]
            x_best[active[improved]] = candidate[improved]
            best_margin[active[improved]] = found[improved]
            active = active[best_margin[active] <= 0]
        return x_best, best_margin


def _side(p: float, h: int, w: int, *, minimum: int) -> int:
    """Window side for a fraction ``p`` of the pixels, in [minimum, min(h, w) - 1] where the
    image allows it (a window never covers a whole side, so its position stays random)."""
    largest = max(min(h, w) - 1, 1)
    side = round(math.sqrt(p * h * w))
    return max(min(side, largest), min(minimum, largest))


def _random_signs(
    shape: tuple[int, ...], generator: torch.Generator, device: torch.device
) -> Tensor:
    return randint(0, 2, shape, generator, device).float() * 2 - 1


def _windows(
    n: int, side: int, h: int, w: int, generator: torch.Generator, device: torch.device
) -> tuple[Tensor, Tensor]:
    """A uniformly placed ``side`` x ``side`` window per point: its top-left row and column,
    each of shape (n, 1, 1)."""
    top = randint(0, h - side + 1, (n, 1, 1), generator, device)
    left = randint(0, w - side + 1, (n, 1, 1), generator, device)
    return top, left


def _window_mask(top: Tensor, left: Tensor, side: int, h: int, w: int) -> Tensor:
    """N x 1 x H x W booleans: inside each point's window."""
    rows = torch.arange(h, device=top.device).view(1, h, 1)
    cols = torch.arange(w, device=top.device).view(1, 1, w)
    inside = (rows >= top) & (rows < top + side) & (cols >= left) & (cols < left + side)
    return inside.unsqueeze(1)


# --- L-inf ---------------------------------------------------------------------------------


def _vertex(x: Tensor, signs: Tensor, eps: float) -> Tensor:
    """``x + signs * eps`` in the box (``Attack.__call__`` makes it exactly feasible)."""
    return (x.double() + signs.double() * eps).float().clamp(0.0, 1.0)


def _linf_init(x: Tensor, eps: float, generator: torch.Generator) -> Tensor:
    """Vertical stripes: one random ``+-eps`` per column and channel, the same down each column."""
    n, c, _, w = x.shape
    return _vertex(x, _random_signs((n, c, 1, w), generator, x.device), eps)


def _linf_step(
    x: Tensor, x_best: Tensor, eps: float, side: int, generator: torch.Generator
) -> Tensor:
    """``x_best`` with one random window per point set to a random ``+-eps`` per channel."""
    n, c, h, w = x.shape
    top, left = _windows(n, side, h, w, generator, x.device)
    inside = _window_mask(top, left, side, h, w)
    candidate = x_best
    redraw = torch.ones(n, dtype=torch.bool, device=x.device)
    for _ in range(_MAX_REDRAWS):
        signs = _random_signs((n, c, 1, 1), generator, x.device)
        drawn = torch.where(inside, _vertex(x, signs, eps), x_best)
        candidate = torch.where(redraw.view(-1, 1, 1, 1), drawn, candidate)
        redraw = (candidate == x_best).flatten(1).all(dim=1)
        if not bool(redraw.any()):
            break
    return candidate


# --- L2 ------------------------------------------------------------------------------------


@lru_cache(maxsize=64)
def _eta(side: int, device: torch.device) -> Tensor:
    """The paper's centred pattern (its eq. 2) on a ``side`` x ``side`` window, unit L2 norm:
    ``eta_rs = sum_{k=0}^{M(r,s)} 1 / (n + 1 - k)^2`` with ``n = side // 2`` and ``M`` the
    ring index, ``n`` minus the Chebyshev distance to the centre. Cached: read, never written."""
    n = side // 2
    steps = torch.arange(n + 1, dtype=torch.float64)
    levels = torch.cumsum(1.0 / (n + 1 - steps) ** 2, dim=0)
    offsets = (torch.arange(side) - n).abs()
    ring = n - torch.maximum(offsets.view(-1, 1), offsets.view(1, -1))
    pattern = levels[ring]
    return (pattern / pattern.norm()).float().to(device)


def _channel_norms(t: Tensor) -> Tensor:
    """N x C: the L2 norm of each channel of each point."""
    return t.pow(2).sum(dim=(2, 3)).sqrt()


def _l2_init(x: Tensor, eps: float, generator: torch.Generator) -> Tensor:
    """A grid of tiles each holding ``+-eta`` (random sign per tile and channel), norm ``eps``."""
    n, c, h, w = x.shape
    tile = max(min(h, w) // _L2_TILES, 1)
    rows, cols = h // tile, w // tile
    signs = _random_signs((n, c, rows, cols), generator, x.device)
    grid = signs.repeat_interleave(tile, dim=2).repeat_interleave(tile, dim=3)
    pattern = grid * _eta(tile, x.device).repeat(rows, cols)
    delta = torch.zeros_like(x)
    delta[:, :, : rows * tile, : cols * tile] = pattern
    norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
    return delta * (eps / norms).view(-1, 1, 1, 1)


def _placed_eta(top: Tensor, left: Tensor, side: int, h: int, w: int) -> Tensor:
    """N x 1 x H x W: the unit-norm pattern ``eta`` inside each point's window, zero elsewhere."""
    eta = _eta(side, top.device).flatten()
    rows = torch.arange(h, device=top.device).view(1, h, 1) - top
    cols = torch.arange(w, device=top.device).view(1, 1, w) - left
    inside = (rows >= 0) & (rows < side) & (cols >= 0) & (cols < side)
    index = rows.clamp(0, side - 1) * side + cols.clamp(0, side - 1)
    return (eta[index] * inside).unsqueeze(1)


def _l2_step(
    x: Tensor, x_best: Tensor, ball: Ball, side: int, generator: torch.Generator
) -> Tensor:
    """Algorithm 3 of the paper: per channel, the perturbation mass of two windows W1 u W2 (and
    the budget unused so far) moves into W1 as ``+-eta`` plus W1's current direction."""
    n, c, h, w = x.shape
    delta = x_best - x
    top1, left1 = _windows(n, side, h, w, generator, x.device)
    top2, left2 = _windows(n, side, h, w, generator, x.device)
    in1 = _window_mask(top1, left1, side, h, w)
    union = in1 | _window_mask(top2, left2, side, h, w)

    unused = (ball.eps**2 - delta.flatten(1).pow(2).sum(dim=1)).clamp_min(0.0)
    available = (_channel_norms(delta * union) ** 2 + unused.view(-1, 1) / c).sqrt()

    current = delta * in1
    direction = current / _channel_norms(current).clamp_min(1e-12).view(n, c, 1, 1)
    signs = _random_signs((n, c, 1, 1), generator, x.device)
    update = signs * _placed_eta(top1, left1, side, h, w) + direction
    scale = available / _channel_norms(update).clamp_min(1e-12)
    new_delta = torch.where(union, 0.0, delta) + update * scale.view(n, c, 1, 1)
    return ball.project(x + new_delta, x)
