"""The suite runner: per-point worst case, independent re-verification, determinism, progress,
out-of-memory halving; and whole defense evaluations with their masking flags."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from graders.attacks import suite as suite_module
from graders.attacks.core import Attack, AttackName, Ball, TargetModel
from graders.attacks.masking import FlagCode
from graders.attacks.suite import SuiteKind, SuiteParams, run_suite
from graders.defense_scoring import DefenseEvalConfig, RandomizedPolicy, evaluate_defense
from graders.threat_model import ThreatModel
from tests.graders.attacks.conftest import Points

LINF8 = Ball.of(ThreatModel("linf", 8))
SMALL = SuiteParams(
    apgd_iterations=20, n_targets=3, fab_iterations=20, square_queries=200, pgd_steps=10
)


def as_uint8(x: Tensor) -> np.ndarray:
    return (x.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


@pytest.mark.parametrize("kind", [SuiteKind.FULL, SuiteKind.QUICK])
def test_undefended_model_is_near_zero_and_every_break_is_real(
    undefended: nn.Module, points: Points, kind: SuiteKind
) -> None:
    run = run_suite(undefended, points.x, points.y, LINF8, kind, SMALL, seed=0, batch_size=16)
    report = run.report
    assert report.clean_accuracy == 1.0  # the fixture's points are all classified correctly
    assert report.robust_accuracy <= 0.05, report.attacks
    assert report.robust_accuracy <= report.clean_accuracy
    broken = torch.tensor([b not in (None, "clean") for b in report.broken_by])
    # Independent re-check: inside the ball (exactly) and misclassified by a fresh forward pass.
    assert bool(LINF8.contains(run.x_adv, points.x).all())
    with torch.no_grad():
        predictions = undefended(run.x_adv).argmax(1)
    assert bool((predictions[broken] != points.y[broken]).all())
    assert sum(a.points_broken for a in report.attacks) == int(broken.sum())
    assert report.attacks[0].points_attacked == len(points.y)


def test_sturdy_model_keeps_robust_points_and_later_attacks_see_only_survivors(
    sturdy: nn.Module, sturdy_points: Points
) -> None:
    x, y = sturdy_points.x, sturdy_points.y
    report = run_suite(sturdy, x, y, LINF8, SuiteKind.FULL, SMALL, seed=0, batch_size=16).report
    assert 0 < report.robust_accuracy < report.clean_accuracy
    left = len(y)
    for stats in report.attacks:
        assert stats.points_attacked == left
        left -= stats.points_broken
    assert left == round(report.robust_accuracy * len(y))
    assert report.robust_after(["apgd-ce"]) >= report.robust_accuracy


def test_same_seed_same_result_and_progress_is_reported(
    sturdy: nn.Module, sturdy_points: Points
) -> None:
    seen: list[dict[str, Any]] = []
    x, y = sturdy_points.x, sturdy_points.y
    first = run_suite(
        sturdy, x, y, LINF8, SuiteKind.QUICK, SMALL, seed=5, batch_size=16, progress=seen.append
    )
    again = run_suite(sturdy, x, y, LINF8, SuiteKind.QUICK, SMALL, seed=5, batch_size=16)
    assert first.report.broken_by == again.report.broken_by
    assert torch.equal(first.x_adv, again.x_adv)
    assert [s["attack"] for s in seen][:1] == ["pgd"]
    assert {s["attacks"] for s in seen} == {2}
    assert all(s["robust_points_left"] <= len(y) for s in seen)


class _RunsOutOfMemory(Attack):
    """Raises CUDA's out-of-memory error for batches over ``limit`` points."""

    name = AttackName.PGD
    limit = 5
    sizes: list[int] = []

    def perturb(
        self, model: TargetModel, x: Tensor, y: Tensor, ball: Ball, generator: torch.Generator
    ) -> Tensor:
        type(self).sizes.append(len(x))
        if len(x) > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return x + ball.eps


def test_out_of_memory_halves_the_batch_and_finishes(
    undefended: nn.Module, points: Points, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(suite_module, "build_suite", lambda kind, params: [_RunsOutOfMemory()])
    _RunsOutOfMemory.sizes = []
    run = run_suite(
        undefended, points.x, points.y, LINF8, SuiteKind.QUICK, SMALL, seed=0, batch_size=20
    )
    assert run.report.batch_size == 5
    assert _RunsOutOfMemory.sizes[:3] == [20, 10, 5]
    assert run.report.attacks[0].points_attacked == len(points.y)


def test_defense_evaluation_of_an_undefended_model_raises_no_masking_flag(
    undefended: nn.Module, points: Points
) -> None:
    config = DefenseEvalConfig(
        params=SMALL, eps_sweep=[2, 16, 64], sweep_iterations=10, sweep_points=24
    )
    report = evaluate_defense(
        undefended, as_uint8(points.x), points.y.numpy(), ThreatModel("linf", 8), config
    )
    assert report.robust_accuracy <= 0.05 and report.final_robust_accuracy <= 0.05
    assert set(report.suites) == {"quick", "full"}
    assert [f.code for f in report.flags] == [], report.flags
    assert report.eps_sweep[0].eps == 0 and report.eps_sweep[-1].robust_accuracy == 0


def test_input_quantization_raises_the_masking_flags(
    quantized: nn.Module, undefended: nn.Module, points: Points
) -> None:
    config = DefenseEvalConfig(
        params=SMALL, eps_sweep=[16, 64], sweep_iterations=10, sweep_points=24
    )
    report = evaluate_defense(
        quantized, as_uint8(points.x), points.y.numpy(), ThreatModel("linf", 8), config
    )
    codes = {f.code for f in report.flags}
    assert {FlagCode.ZERO_GRADIENTS, FlagCode.BLACK_BOX_GAP} <= codes, report.flags
    full = report.suites["full"]
    white_box = full.robust_after(["apgd-ce", "apgd-t", "fab-t"])
    assert white_box - full.robust_accuracy > 0.2  # Square found what gradients could not
    assert report.final_robust_accuracy <= report.clean_accuracy
    assert all(f.message for f in report.flags)


class _NoisyInput(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x + 0.02 * torch.randn_like(x))


@pytest.mark.parametrize("policy", [RandomizedPolicy.EOT, RandomizedPolicy.FLAG])
def test_randomized_model_is_evaluated_with_eot_or_flagged(
    undefended: nn.Module, points: Points, policy: RandomizedPolicy
) -> None:
    params = SuiteParams(
        apgd_iterations=5,
        eot_samples=3,
        pgd_steps=3,
        square_queries=20,
        fab_iterations=3,
        n_targets=1,
    )
    config = DefenseEvalConfig(params=params, randomized=policy)
    report = evaluate_defense(
        _NoisyInput(undefended).eval(),
        as_uint8(points.x[:12]),
        points.y[:12].numpy(),
        ThreatModel("linf", 8),
        config,
    )
    assert report.randomized
    codes = [f.code for f in report.flags]
    assert FlagCode.NONDETERMINISTIC in codes
    if policy is RandomizedPolicy.EOT:
        assert list(report.suites) == ["rand"]
        assert [a.name for a in report.suites["rand"].attacks] == ["apgd-ce", "apgd-dlr"]
        assert report.suites["rand"].attacks[0].backward_images >= 3 * 12
    else:
        assert list(report.suites) == ["quick", "full"]
        assert codes.count(FlagCode.NONDETERMINISTIC) == 2  # seen, and left for review


def test_bf16_attack_steps_still_count_only_fp32_verified_breaks(
    sturdy: nn.Module, sturdy_points: Points
) -> None:
    x, y = sturdy_points.x, sturdy_points.y
    fp32 = run_suite(sturdy, x, y, LINF8, SuiteKind.QUICK, SMALL, seed=0, batch_size=16).report
    run = run_suite(sturdy, x, y, LINF8, SuiteKind.QUICK, SMALL, seed=0, batch_size=16, bf16=True)
    assert run.report.bf16
    broken = torch.tensor([b not in (None, "clean") for b in run.report.broken_by])
    with torch.no_grad():
        assert bool((sturdy(run.x_adv[broken]).argmax(1) != y[broken]).all())
    assert bool(LINF8.contains(run.x_adv, x).all())
    # Lower-precision gradients may find a little less or more; not a different picture.
    assert abs(run.report.robust_accuracy - fp32.robust_accuracy) <= 0.1
