"""The shared attack pieces: exact feasibility, losses, targets, the model wrapper's accounting."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from graders.attacks.core import (
    Attack,
    AttackName,
    Ball,
    TargetModel,
    cross_entropy,
    dlr,
    margin,
    targeted_dlr,
    top_targets,
)
from graders.threat_model import ThreatModel


def grid_images(n: int, seed: int) -> Tensor:
    """Images on the uint8 / 255 grid, like real CIFAR-10 inputs."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 32, 32), generator=generator).float() / 255


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_make_exact_keeps_points_on_the_boundary_and_inside_exactly(norm: str) -> None:
    ball = Ball.of(ThreatModel(norm, 8 if norm == "linf" else 127.5))
    x = grid_images(64, seed=1)
    generator = torch.Generator().manual_seed(2)
    direction = torch.randn(x.shape, generator=generator)
    if norm == "linf":
        step = direction.sign() * ball.eps
    else:
        step = direction / direction.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * ball.eps * 1.001
    adv = ball.make_exact(x + step, x)
    assert bool(ball.contains(adv, x).all())
    assert not bool((adv == x).flatten(1).all(dim=1).any())  # nothing fell back to clean
    distances = ball.norms(adv.double() - x.double())
    assert float(distances.max()) <= ball.eps
    if norm == "linf":  # unclipped coordinates stay on the boundary (within one ulp)
        assert float(distances.min()) > ball.eps - 1e-7


def test_make_exact_replaces_non_finite_values_by_feasible_ones() -> None:
    ball = Ball.of(ThreatModel("linf", 8))
    x = grid_images(4, seed=3)
    adv = x.clone()
    adv[0, 0, 0, 0] = float("nan")
    adv[1, 1, 1, 1] = float("inf")
    fixed = ball.make_exact(adv, x)
    assert bool(torch.isfinite(fixed).all()) and bool(ball.contains(fixed, x).all())


def test_contains_is_exact_in_float64() -> None:
    ball = Ball("linf", 0.25)
    x = torch.zeros(1, 1, 2, 2) + 0.5
    assert bool(ball.contains(x + 0.25, x).all())
    outside = torch.nextafter(x + 0.25, torch.ones_like(x))
    assert not bool(ball.contains(outside, x).any())
    assert not bool(ball.contains(x + 0.6, x).any())  # out of the box as well


def test_losses_have_the_documented_signs() -> None:
    logits = torch.tensor([[3.0, 1.0, 0.0, -1.0], [0.0, 2.0, 1.0, -1.0]])
    y = torch.tensor([0, 0])
    assert margin(y)(logits).tolist() == [-2.0, 2.0]  # positive only when misclassified
    assert bool((dlr(y)(logits)[0] < 0) & (dlr(y)(logits)[1] > 0))
    target = torch.tensor([1, 1])
    assert bool(targeted_dlr(y, target)(logits)[1] > targeted_dlr(y, target)(logits)[0])
    assert cross_entropy(y)(logits).shape == (2,)
    # DLR is invariant to scaling the logits: the point of the loss.
    assert torch.allclose(dlr(y)(logits), dlr(y)(logits * 7))


def test_top_targets_are_the_runner_up_classes_in_order() -> None:
    logits = torch.tensor([[0.1, 0.9, 0.5, 0.7]])
    assert top_targets(logits, 3).tolist() == [[3, 2, 0]]
    with pytest.raises(ValueError, match="n_targets"):
        top_targets(logits, 4)


def test_target_model_counts_images_and_averages_eot_gradients() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 3)).eval()
    x = torch.rand(5, 3, 2, 2)
    y = torch.zeros(5, dtype=torch.long)
    target = TargetModel(net, eot_samples=3)
    loss, grad, logits = target.value_and_grad(x, cross_entropy(y))
    assert target.forwards == 15 and target.backwards == 15
    single = TargetModel(net)
    loss1, grad1, _ = single.value_and_grad(x, cross_entropy(y))
    assert torch.allclose(grad, grad1, atol=1e-6) and torch.allclose(loss, loss1)  # deterministic
    assert logits.shape == (5, 3)
    with pytest.raises(ValueError, match="eot_samples"):
        TargetModel(net, eot_samples=0)


class _PushOut(Attack):
    """Moves every pixel by 1.0: the base class must project the result into the ball."""

    name = AttackName.PGD

    def perturb(
        self, model: TargetModel, x: Tensor, y: Tensor, ball: Ball, generator: torch.Generator
    ) -> Tensor:
        assert not model.module.training
        return x + 1.0


def test_attack_call_projects_output_and_restores_training_mode() -> None:
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10)).train()
    x = grid_images(3, seed=4)
    ball = Ball.of(ThreatModel("linf", 8))
    adv = _PushOut()(net, x, torch.zeros(3, dtype=torch.long), ball, generator=torch.Generator())
    assert net.training
    assert bool(ball.contains(adv, x).all())
    with pytest.raises(ValueError, match="N x C x H x W"):
        _PushOut()(net, x[0], torch.zeros(3, dtype=torch.long), ball, generator=torch.Generator())
