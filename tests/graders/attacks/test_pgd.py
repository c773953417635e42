"""PGD and the pieces shared with APGD: feasibility, strength on the undefended canary, the
single-step case, restarts on robust points only, reproducibility, model mode and argument
checks."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from graders.attacks.core import AttackName, Ball, TargetModel, misclassified
from graders.attacks.pgd import PGD, Candidates, ascent_direction
from graders.threat_model import Norm
from tests.graders.attacks.conftest import Points

LINF = Ball(Norm.LINF, 8 / 255)
L2 = Ball(Norm.L2, 0.5)


def _run(
    attack: PGD, model: nn.Module, points: Points, ball: Ball, seed: int = 0
) -> tuple[Tensor, TargetModel]:
    target = TargetModel(model)
    x_adv = attack(target, points.x, points.y, ball, generator=torch.Generator().manual_seed(seed))
    return x_adv, target


def _robust(model: nn.Module, x_adv: Tensor, y: Tensor) -> Tensor:
    with torch.no_grad():
        return ~misclassified(model(x_adv), y)


@pytest.mark.parametrize("ball", [LINF, L2], ids=["linf", "l2"])
def test_feasible_and_breaks_the_undefended_model(
    undefended: nn.Module, points: Points, ball: Ball
):
    x_adv, _ = _run(PGD(steps=10), undefended, points, ball)
    assert bool(ball.contains(x_adv, points.x).all())
    robust = _robust(undefended, x_adv, points.y).float().mean().item()
    # Seen: 0% (L-inf 8/255) and 19% (L2 0.5) of 48 points.
    assert robust <= (0.05 if ball.norm is Norm.LINF else 0.25)


def test_one_step_from_the_clean_point_is_fgsm(undefended: nn.Module, points: Points):
    """Default step 2.5 * eps / 1 > eps: one L-inf step lands on x + eps * sign(grad), clipped."""
    x, y = points.x, points.y
    x_var = x.clone().requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(F.cross_entropy(undefended(x_var), y, reduction="sum"), x_var)
    fgsm = (x + LINF.eps * grad.sign()).clamp(0, 1)
    fooled = misclassified(undefended(fgsm), y)
    assert int(fooled.sum()) >= len(y) // 2

    x_adv, target = _run(PGD(steps=1, random_start=False), undefended, points, LINF)
    assert torch.allclose(x_adv[fooled], fgsm[fooled], atol=1e-6)
    assert target.backwards == len(y) * 2  # the clean point and the step


def test_restarts_run_only_on_points_left_robust(sturdy: nn.Module, sturdy_points: Points):
    n = len(sturdy_points.y)
    one, once = _run(PGD(steps=5), sturdy, sturdy_points, LINF, seed=1)
    three, thrice = _run(PGD(steps=5, restarts=3), sturdy, sturdy_points, LINF, seed=1)
    left = int(_robust(sturdy, one, sturdy_points.y).sum())
    assert 0 < left < n
    # Same seed: the first run is the same; the two others cost at most 6 passes per point left.
    assert once.backwards < 6 * n
    assert thrice.backwards - once.backwards <= 2 * 6 * left
    assert int(_robust(sturdy, three, sturdy_points.y).sum()) <= left


def test_same_seed_same_output(sturdy: nn.Module, sturdy_points: Points):
    attack = PGD(steps=5)
    first, _ = _run(attack, sturdy, sturdy_points, LINF, seed=7)
    again, _ = _run(attack, sturdy, sturdy_points, LINF, seed=7)
    other, _ = _run(attack, sturdy, sturdy_points, LINF, seed=8)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_training_mode_is_restored_and_the_attack_runs_in_eval_mode(
    sturdy: nn.Module, sturdy_points: Points
):
    model = copy.deepcopy(sturdy).train()
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    x_adv, _ = _run(PGD(steps=3), model, sturdy_points, LINF, seed=2)
    assert model.training
    assert all(torch.equal(buffers[k], v) for k, v in model.state_dict().items())
    reference, _ = _run(PGD(steps=3), sturdy, sturdy_points, LINF, seed=2)
    assert torch.equal(x_adv, reference)


def test_breaks_survive_the_exact_projection(sturdy: nn.Module, sturdy_points: Points):
    """Iterates on the eps boundary next to pixels just above eps must stay adversarial through
    ``Ball.make_exact`` (an earlier version fell back to the clean point there)."""
    x, y = sturdy_points.x, sturdy_points.y
    attack = PGD(steps=10)
    raw = attack.perturb(TargetModel(sturdy), x, y, LINF, torch.Generator().manual_seed(0))
    final, _ = _run(attack, sturdy, sturdy_points, LINF, seed=0)
    assert int(_robust(sturdy, final, y).sum()) == int(_robust(sturdy, raw, y).sum())


def test_ascent_direction():
    grad = torch.tensor([[[[3.0, -4.0], [0.0, float("nan")]]], [[[0.0, 0.0], [0.0, 0.0]]]])
    linf = ascent_direction(grad, Norm.LINF)
    assert torch.equal(linf[0].flatten(), torch.tensor([1.0, -1.0, 0.0, 0.0]))
    l2 = ascent_direction(grad, Norm.L2)
    assert torch.allclose(l2[0].flatten(), torch.tensor([0.6, -0.8, 0.0, 0.0]))
    assert torch.equal(l2[1], torch.zeros_like(l2[1]))  # no gradient, no step


def test_candidates_keep_the_first_adversarial_else_the_highest_loss():
    found = Candidates.start(torch.zeros(3, 1, 1, 1))
    rows = torch.arange(3)
    # Point 0 never fooled: the highest loss wins (4.0, offered last). Point 1 fooled at once:
    # later adversarial iterates do not replace the first. Point 2 fooled at the second offer.
    offers = [
        (rows, 1.0, [1.0, 5.0, 2.0], [False, True, False]),
        (rows, 2.0, [0.5, 9.0, 3.0], [False, True, True]),
        (rows[:1], 3.0, [4.0], [False]),
    ]
    for which, value, loss, adversarial in offers:
        x_new = torch.full((len(which), 1, 1, 1), value)
        found.offer(which, x_new, torch.tensor(loss), torch.tensor(adversarial))
    assert found.x.flatten().tolist() == [3.0, 1.0, 2.0]
    assert found.broken.tolist() == [False, True, True]
    assert found.robust_rows().tolist() == [0]


def test_describe_and_default_step():
    assert PGD().describe() == {
        "name": AttackName.PGD.value,
        "steps": 20,
        "restarts": 1,
        "step_size": None,
        "random_start": True,
    }
    assert PGD(step_size=1).step_size == 1.0


@pytest.mark.parametrize(
    "params",
    [
        {"steps": 0},
        {"steps": 2.5},
        {"steps": True},
        {"restarts": 0},
        {"step_size": 0.0},
        {"step_size": -0.1},
        {"step_size": float("nan")},
        {"step_size": "0.1"},
        {"random_start": 1},
        {"restarts": 2, "random_start": False},
    ],
)
def test_rejects_bad_arguments(params: dict[str, object]):
    with pytest.raises(ValueError):
        PGD(**params)  # type: ignore[arg-type]
