"""APGD-CE, APGD-DLR and APGD-T: the step schedule, feasibility, strength against PGD and on the
undefended canary, cost accounting, EOT, reproducibility, model mode and argument checks."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from graders.attacks.apgd import APGD, ApgdLoss, APGDTargeted, checkpoints
from graders.attacks.core import Attack, AttackName, Ball, TargetModel, misclassified
from graders.attacks.pgd import PGD
from graders.threat_model import Norm
from tests.graders.attacks.conftest import Points

LINF = Ball(Norm.LINF, 8 / 255)
L2 = Ball(Norm.L2, 0.5)


def _run(
    attack: Attack, model: nn.Module | TargetModel, points: Points, ball: Ball, seed: int = 0
) -> tuple[Tensor, TargetModel]:
    target = model if isinstance(model, TargetModel) else TargetModel(model)
    x_adv = attack(target, points.x, points.y, ball, generator=torch.Generator().manual_seed(seed))
    return x_adv, target


def _robust(model: nn.Module, x_adv: Tensor, y: Tensor) -> Tensor:
    with torch.no_grad():
        return ~misclassified(model(x_adv), y)


@pytest.fixture(scope="module")
def apgd_ce_robust(sturdy: nn.Module, sturdy_points: Points) -> int:
    """How many sturdy points APGD-CE with AutoAttack's settings (100 iterations, 1 restart)
    leaves robust."""
    x_adv, _ = _run(APGD(), sturdy, sturdy_points, LINF)
    assert bool(LINF.contains(x_adv, sturdy_points.x).all())
    return int(_robust(sturdy, x_adv, sturdy_points.y).sum())


def test_checkpoints_follow_the_paper():
    assert checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert checkpoints(10) == [3, 5, 6, 7, 8, 9]
    assert checkpoints(1) == []


@pytest.mark.parametrize("ball", [LINF, L2], ids=["linf", "l2"])
@pytest.mark.parametrize(
    "attack",
    [
        APGD(iterations=10),
        APGD(loss=ApgdLoss.DLR, iterations=10),
        APGDTargeted(n_targets=2, iterations=5),
    ],
    ids=["ce", "dlr", "t"],
)
def test_output_is_feasible(sturdy: nn.Module, sturdy_points: Points, attack: Attack, ball: Ball):
    x_adv, _ = _run(attack, sturdy, sturdy_points, ball)
    assert bool(ball.contains(x_adv, sturdy_points.x).all())
    assert not torch.equal(x_adv, sturdy_points.x)


def test_apgd_ce_breaks_the_undefended_model(undefended: nn.Module, points: Points):
    x_adv, target = _run(APGD(), undefended, points, LINF)
    # Seen: 0 of 48 robust, 95 backward passes in all (48 starts, 47 first steps).
    assert _robust(undefended, x_adv, points.y).float().mean().item() <= 0.05
    assert target.backwards <= 3 * len(points.y)


def test_l2_apgd_ce_breaks_most_undefended_points(undefended: nn.Module, points: Points):
    x_adv, _ = _run(APGD(), undefended, points, L2)
    assert bool(L2.contains(x_adv, points.x).all())
    # Seen: 4 of 48 robust at L2 0.5.
    assert _robust(undefended, x_adv, points.y).float().mean().item() <= 0.25


@pytest.mark.parametrize("steps", [1, 10])
def test_apgd_ce_is_at_least_as_strong_as_pgd(
    sturdy: nn.Module, sturdy_points: Points, apgd_ce_robust: int, steps: int
):
    # Seen (robust of 48): APGD-CE 13, PGD-1 25, PGD-10 19.
    pgd_adv, _ = _run(PGD(steps=steps, random_start=steps > 1), sturdy, sturdy_points, LINF)
    pgd_robust = int(_robust(sturdy, pgd_adv, sturdy_points.y).sum())
    assert apgd_ce_robust <= pgd_robust


def test_apgd_t_is_about_as_strong_as_apgd_ce(
    sturdy: nn.Module, sturdy_points: Points, apgd_ce_robust: int
):
    x_adv, target = _run(APGDTargeted(), sturdy, sturdy_points, LINF)
    assert bool(LINF.contains(x_adv, sturdy_points.x).all())
    # Seen: 12 robust of 48 against 13 for APGD-CE; 13,211 backward passes.
    robust_t = int(_robust(sturdy, x_adv, sturdy_points.y).sum())
    assert robust_t <= apgd_ce_robust + 2
    # Later targets run only on points earlier ones left: well under 9 full runs.
    assert target.backwards < 9 * 101 * len(sturdy_points.y) // 2


def test_apgd_ce_costs_one_pass_per_iteration_per_point_still_robust(
    sturdy: nn.Module, sturdy_points: Points
):
    """Measured on :meth:`APGD.perturb`, the attack's own output before the final projection."""
    x, y, iterations = sturdy_points.x, sturdy_points.y, 100
    target = TargetModel(sturdy)
    found = APGD(iterations=iterations).perturb(
        target, x, y, LINF, torch.Generator().manual_seed(0)
    )
    robust = int(_robust(sturdy, found, y).sum())
    # Seen: 1769 backward (and forward) images, 13 points robust: 13 x 101 = 1313 for them,
    # the rest for points that left the batch when an iterate fooled the model.
    assert 0 < robust < len(y)
    assert (iterations + 1) * robust <= target.backwards < (iterations + 1) * len(y)
    assert target.forwards == target.backwards


def test_restarts_run_only_on_points_left_robust(sturdy: nn.Module, sturdy_points: Points):
    one, once = _run(APGD(iterations=10), sturdy, sturdy_points, LINF, seed=3)
    two, twice = _run(APGD(iterations=10, restarts=2), sturdy, sturdy_points, LINF, seed=3)
    left = int(_robust(sturdy, one, sturdy_points.y).sum())
    assert 0 < left < len(sturdy_points.y)
    assert twice.backwards - once.backwards <= 11 * left
    assert int(_robust(sturdy, two, sturdy_points.y).sum()) <= left


def test_same_seed_same_output(sturdy: nn.Module, sturdy_points: Points):
    for attack in (APGD(iterations=10), APGDTargeted(n_targets=2, iterations=5)):
        first, _ = _run(attack, sturdy, sturdy_points, LINF, seed=5)
        again, _ = _run(attack, sturdy, sturdy_points, LINF, seed=5)
        other, _ = _run(attack, sturdy, sturdy_points, LINF, seed=6)
        assert torch.equal(first, again)
        assert not torch.equal(first, other)


def test_training_mode_is_restored_and_the_attack_runs_in_eval_mode(
    sturdy: nn.Module, sturdy_points: Points
):
    model = copy.deepcopy(sturdy).train()
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    x_adv, _ = _run(APGD(iterations=5), model, sturdy_points, LINF, seed=2)
    assert model.training
    assert all(torch.equal(buffers[k], v) for k, v in model.state_dict().items())
    reference, _ = _run(APGD(iterations=5), sturdy, sturdy_points, LINF, seed=2)
    assert torch.equal(x_adv, reference)


class _NoisyInput(nn.Module):
    """A randomized defense: small Gaussian noise on the input, from the global generator."""

    def __init__(self, model: nn.Module, sigma: float = 0.01) -> None:
        super().__init__()
        self.model = model
        self.sigma = sigma

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.model(x + self.sigma * torch.randn_like(x))
        return out


def test_eot_on_a_randomized_model(undefended: nn.Module, points: Points):
    iterations, eot = 10, 4
    # Built in eval mode: the attack restores the wrapper's mode, and with it the shared model's.
    target = TargetModel(_NoisyInput(undefended).eval(), eot_samples=eot)
    x_adv, _ = _run(APGD(iterations=iterations), target, points, LINF)
    assert bool(LINF.contains(x_adv, points.x).all())
    # Every evaluated point costs eot passes; at most iterations + 1 evaluations per point.
    assert target.backwards % eot == 0
    assert 0 < target.backwards <= eot * (iterations + 1) * len(points.y)
    assert _robust(undefended, x_adv, points.y).float().mean().item() <= 0.25


def test_names_and_describe():
    assert APGD().name is AttackName.APGD_CE
    assert APGD(loss=ApgdLoss.DLR).name is AttackName.APGD_DLR
    assert APGD(loss="dlr").name is AttackName.APGD_DLR  # type: ignore[arg-type]
    assert APGDTargeted().name is AttackName.APGD_T
    assert APGD(loss=ApgdLoss.DLR).describe() == {
        "name": "apgd-dlr",
        "loss": "dlr",
        "iterations": 100,
        "restarts": 1,
        "rho": 0.75,
    }
    assert APGDTargeted(n_targets=3).describe() == {
        "name": "apgd-t",
        "n_targets": 3,
        "iterations": 100,
        "restarts": 1,
        "rho": 0.75,
    }


def test_too_many_targets_for_the_classes(sturdy: nn.Module, sturdy_points: Points):
    with pytest.raises(ValueError, match="n_targets"):
        _run(APGDTargeted(n_targets=10, iterations=1), sturdy, sturdy_points, LINF)


@pytest.mark.parametrize(
    "params",
    [
        {"loss": "cw"},
        {"iterations": 0},
        {"iterations": 10.0},
        {"restarts": 0},
        {"restarts": False},
        {"rho": 0.0},
        {"rho": 1.5},
        {"rho": "0.75"},
    ],
)
def test_apgd_rejects_bad_arguments(params: dict[str, object]):
    with pytest.raises(ValueError):
        APGD(**params)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "params",
    [{"n_targets": 0}, {"n_targets": 2.0}, {"iterations": -1}, {"restarts": 0}, {"rho": -1}],
)
def test_apgd_t_rejects_bad_arguments(params: dict[str, object]):
    with pytest.raises(ValueError):
        APGDTargeted(**params)  # type: ignore[arg-type]
