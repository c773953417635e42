"""Square Attack: feasibility, success on the undefended and gradient-masked canaries, query
accounting, reproducibility and argument checks."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from graders.attacks.core import AttackName, Ball, TargetModel, margin
from graders.attacks.square import Square
from graders.threat_model import Norm
from tests.graders.attacks.conftest import Points

LINF = Ball(Norm.LINF, 8 / 255)


def _run(
    model: nn.Module, x: Tensor, y: Tensor, ball: Ball, seed: int = 0, **params: object
) -> tuple[Tensor, TargetModel]:
    target = TargetModel(model)
    attack = Square(**params)  # type: ignore[arg-type]
    x_adv = attack(target, x, y, ball, generator=torch.Generator().manual_seed(seed))
    return x_adv, target


def _broken(model: nn.Module, x_adv: Tensor, y: Tensor) -> Tensor:
    with torch.no_grad():
        return model(x_adv).argmax(dim=1) != y


class _Constant(nn.Module):
    """Predicts class 0 for every input, whatever it is: points labelled 0 cannot be broken,
    the others are misclassified from the first query."""

    def forward(self, x: Tensor) -> Tensor:
        logits = torch.zeros(x.shape[0], 10, device=x.device)
        logits[:, 0] = 1.0
        return logits + 0.0 * x.flatten(1).sum(dim=1, keepdim=True)


def test_linf_output_is_feasible_and_on_the_vertices(sturdy: nn.Module, sturdy_points: Points):
    x, y = sturdy_points.x[:16], sturdy_points.y[:16]
    x_adv, target = _run(sturdy, x, y, LINF, queries=300)
    assert bool(LINF.contains(x_adv, x).all())
    assert target.backwards == 0  # score-based: never a gradient
    # Every coordinate moved by +-eps (to 1e-6), unless the box [0, 1] clipped it. A point that
    # Attack.__call__ had replaced by its clean image (see square._LINF_SLACK) would fail here.
    delta = (x_adv - x).abs()
    at_eps = (delta - LINF.eps).abs() <= 1e-6
    clipped = (x_adv == 0) | (x_adv == 1)
    assert bool((at_eps | clipped).all())


def test_l2_output_is_feasible_and_uses_the_budget(sturdy: nn.Module, sturdy_points: Points):
    ball = Ball(Norm.L2, 0.5)
    x, y = sturdy_points.x[:16], sturdy_points.y[:16]
    x_adv, target = _run(sturdy, x, y, ball, queries=300)
    assert bool(ball.contains(x_adv, x).all())
    assert target.backwards == 0
    norms = ball.norms(x_adv - x)
    # Clipping to [0, 1] can only shrink the perturbation; the update keeps the rest at eps.
    assert float(norms.median()) >= 0.9 * ball.eps, norms


def test_linf_breaks_the_undefended_model(undefended: nn.Module, points: Points):
    queries = 1000
    x_adv, target = _run(undefended, points.x, points.y, LINF, queries=queries)
    broken = _broken(undefended, x_adv, points.y)
    n_broken, n_robust = int(broken.sum()), int((~broken).sum())
    rate = n_broken / len(points.y)
    # Unbroken points spent exactly the budget; the rest is what the broken ones needed.
    mean_queries = (target.forwards - queries * n_robust) / max(n_broken, 1)
    print(f"square linf 8/255 undefended: {rate:.1%} broken, {mean_queries:.0f} queries/broken")
    assert rate >= 0.85
    assert mean_queries < queries / 2


def test_breaks_the_gradient_masked_model(quantized: nn.Module, points: Points):
    with torch.no_grad():
        correct = quantized(points.x).argmax(dim=1) == points.y
    x, y = points.x[correct], points.y[correct]
    assert len(y) >= 20
    # A gradient attack sees nothing: input quantization zeroes every input gradient.
    _, grad, _ = TargetModel(quantized).value_and_grad(x, margin(y))
    assert bool((grad == 0).all())
    x_adv, _ = _run(quantized, x, y, LINF, queries=1000)
    assert bool(LINF.contains(x_adv, x).all())
    rate = float(_broken(quantized, x_adv, y).float().mean())
    print(f"square linf 8/255 quantized: {rate:.1%} of {len(y)} correct points broken")
    assert rate >= 0.5


def test_l2_breaks_the_undefended_model(undefended: nn.Module, points: Points):
    ball = Ball(Norm.L2, 1.5)
    x_adv, _ = _run(undefended, points.x, points.y, ball, queries=500)
    assert bool(ball.contains(x_adv, points.x).all())
    rate = float(_broken(undefended, x_adv, points.y).float().mean())
    print(f"square l2 1.5 undefended: {rate:.1%} broken")
    # Gaussian noise of norm 1.5 breaks 46% of these points, however many draws (500 or 1000).
    assert rate >= 0.65


@pytest.mark.parametrize("ball", [LINF, Ball(Norm.L2, 0.5)], ids=["linf", "l2"])
def test_same_seed_same_output_other_seed_other_output(
    sturdy: nn.Module, sturdy_points: Points, ball: Ball
):
    x, y = sturdy_points.x[:8], sturdy_points.y[:8]
    first, _ = _run(sturdy, x, y, ball, seed=3, queries=100)
    again, _ = _run(sturdy, x, y, ball, seed=3, queries=100)
    other, _ = _run(sturdy, x, y, ball, seed=4, queries=100)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


@pytest.mark.parametrize("restarts", [1, 2])
def test_queries_never_exceed_the_budget(sturdy: nn.Module, sturdy_points: Points, restarts: int):
    x, y = sturdy_points.x[:16], sturdy_points.y[:16]
    queries = 60
    x_adv, target = _run(sturdy, x, y, LINF, queries=queries, restarts=restarts)
    robust = int((~_broken(sturdy, x_adv, y)).sum())
    assert robust > 0  # otherwise the bound below says nothing
    assert target.forwards <= len(y) * queries * restarts
    # Points never broken spend every query of every restart.
    assert target.forwards >= robust * queries * restarts


def test_broken_points_stop_querying():
    x = torch.rand(12, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1] * 6)
    queries = 40
    x_adv, target = _run(_Constant(), x, y, LINF, queries=queries)
    # Label 1: misclassified by the initialization, one query each; label 0: never broken.
    assert target.forwards == 6 * 1 + 6 * queries
    assert bool(LINF.contains(x_adv, x).all())


def test_zero_eps_returns_the_clean_points_without_querying(undefended: nn.Module, points: Points):
    x, y = points.x[:4], points.y[:4]
    x_adv, target = _run(undefended, x, y, LINF.scaled(0.0), queries=50)
    assert torch.equal(x_adv, x)
    assert target.forwards == 0


def test_window_schedule_follows_the_paper():
    full = Square(queries=10_000, p_init=0.8)
    assert full.window_fraction(10) == 0.8
    assert full.window_fraction(11) == 0.4
    assert full.window_fraction(50) == 0.4
    assert full.window_fraction(51) == 0.2
    assert full.window_fraction(2001) == pytest.approx(0.8 / 64)
    assert full.window_fraction(9999) == pytest.approx(0.8 / 512)
    # Other budgets rescale the iteration to 10,000 queries.
    short = Square(queries=1000, p_init=0.8)
    assert short.window_fraction(1) == 0.8
    assert short.window_fraction(2) == 0.4
    assert short.window_fraction(801) == pytest.approx(0.8 / 512)


def test_describe_and_name():
    attack = Square(queries=100, p_init=0.5, restarts=2)
    assert Square.name is AttackName.SQUARE
    assert attack.describe() == {"name": "square", "queries": 100, "p_init": 0.5, "restarts": 2}


@pytest.mark.parametrize(
    "params",
    [
        {"queries": 0},
        {"queries": -5},
        {"queries": 10.0},
        {"queries": True},
        {"p_init": 0.0},
        {"p_init": 1.5},
        {"p_init": -0.1},
        {"p_init": math.nan},
        {"p_init": "0.8"},
        {"restarts": 0},
        {"restarts": 1.5},
    ],
)
def test_rejects_bad_arguments(params: dict[str, object]):
    with pytest.raises(ValueError):
        Square(**params)  # type: ignore[arg-type]


def test_arguments_are_keyword_only():
    with pytest.raises(TypeError):
        Square(100)  # type: ignore[misc]
