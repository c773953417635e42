"""Tests for the gradient-masking checks: each check on an honest model (no flag) and on a small
module built to show the symptom (the flag), the gap thresholds at their boundary, and eps sweeps
on the undefended and the quantized canaries."""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from graders.attacks.core import (
    Attack,
    AttackName,
    Ball,
    TargetModel,
    cross_entropy,
    misclassified,
)
from graders.attacks.masking import (
    Flag,
    FlagCode,
    SweepPoint,
    check_batch_consistency,
    check_black_box_gap,
    check_clean_accuracy,
    check_determinism,
    check_eps_sweep,
    check_gradients,
    check_logits,
    check_transfer_gap,
    eps_sweep,
)
from graders.threat_model import Norm

from .conftest import Points

SWEEP = (0.0, 1.0, 4.0, 16.0, 64.0)


# --- Small modules with one symptom each ---------------------------------------------------------


class LogitDropout(nn.Module):
    """Dropout on the logits that stays on in eval mode (``training=True`` hard-coded)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return F.dropout(self.model(x), p=0.5, training=True)


class InputNoise(nn.Module):
    """Gaussian noise added to the input at every forward pass, in any mode."""

    def __init__(self, model: nn.Module, std: float = 0.05) -> None:
        super().__init__()
        self.model = model
        self.std = std

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x + self.std * torch.randn_like(x))


class BatchCentered(nn.Module):
    """Subtracts the batch mean image before the model: batch-dependent even in eval mode."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x - x.mean(dim=0, keepdim=True) + 0.5)


class NanGradient(nn.Module):
    """Finite outputs, NaN input gradients: adds ``0 * sqrt(|x - x|)``, whose derivative at 0 is
    infinite (times 0: NaN)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        trap = (x - x.detach()).abs().sqrt().flatten(1).sum(dim=1, keepdim=True)
        return self.model(x) + 0.0 * trap


class Detached(nn.Module):
    """Preprocessing outside the autograd graph (as if done in NumPy)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x.detach())


class SignGradient(Attack):
    """PGD with sign steps for these tests only: ``steps`` steps of ``2.5 * eps / steps`` from the
    clean point (or, with ``random_start``, a random point of the ball), returning the first
    misclassified iterate of each point (else the last). L-inf only."""

    name: ClassVar[AttackName] = AttackName.PGD

    def __init__(self, steps: int = 10, *, random_start: bool = False) -> None:
        self.steps = steps
        self.random_start = random_start

    def perturb(
        self, model: TargetModel, x: Tensor, y: Tensor, ball: Ball, generator: torch.Generator
    ) -> Tensor:
        x_adv = ball.random_start(x, generator) if self.random_start else x.clone()
        step = 2.5 * ball.eps / self.steps
        found = x_adv.clone()
        broken = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        for _ in range(self.steps):
            _, grad, logits = model.value_and_grad(x_adv, cross_entropy(y))
            broken = self._keep(found, broken, x_adv, misclassified(logits, y))
            x_adv = ball.project(x_adv + step * grad.sign(), x)
        broken = self._keep(found, broken, x_adv, misclassified(model.logits(x_adv), y))
        return torch.where(broken.view(-1, 1, 1, 1), found, x_adv)

    @staticmethod
    def _keep(found: Tensor, broken: Tensor, x_adv: Tensor, success: Tensor) -> Tensor:
        new = success & ~broken
        found[new] = x_adv[new]
        return broken | new


class SmallEpsOnly(Attack):
    """Breaks points at eps <= 4/255 with ``SignGradient`` and gives up above: a caricature of an
    attack whose success does not grow with eps."""

    name: ClassVar[AttackName] = AttackName.PGD

    def perturb(
        self, model: TargetModel, x: Tensor, y: Tensor, ball: Ball, generator: torch.Generator
    ) -> Tensor:
        if ball.eps > 4.5 / 255:
            return x.clone()
        return SignGradient().perturb(model, x, y, ball, generator)


def codes(flags: list[Flag]) -> set[FlagCode]:
    return {flag.code for flag in flags}


# --- Determinism, batch consistency, logits, gradients -------------------------------------------


def test_undefended_raises_no_flag(undefended: nn.Module, points: Points) -> None:
    assert check_determinism(undefended, points.x) is None
    assert check_batch_consistency(undefended, points.x, batch_sizes=(1, 48)) is None
    assert check_logits(undefended, points.x) is None
    assert check_gradients(undefended, points.x, points.y) == []


@pytest.mark.parametrize("wrapper", [LogitDropout, InputNoise])
def test_randomness_in_eval_mode_is_nondeterministic(
    wrapper: type[nn.Module], undefended: nn.Module, points: Points
) -> None:
    flag = check_determinism(wrapper(undefended), points.x, batch_size=16)
    assert flag is not None
    assert flag.code is FlagCode.NONDETERMINISTIC
    assert flag.details["passes"] == 5
    assert isinstance(flag.details["max_abs_difference"], float)
    assert flag.details["max_abs_difference"] > 1e-4
    assert flag.details["changed_share"] == 1.0
    assert "5 passes" in flag.message and "48 clean test points" in flag.message


def test_determinism_sets_eval_mode_and_restores_each_mode(undefended: nn.Module) -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10), nn.Dropout(0.5)).train()
    model[1].eval()  # a mixed state, which ``model.train(True)`` would not restore
    x = torch.rand(6, 3, 8, 8)
    assert check_determinism(model, x) is None  # nn.Dropout is off in eval mode
    assert [m.training for m in model.modules()] == [True, True, False, True]


def test_determinism_checks_the_tolerance() -> None:
    class Jitter(nn.Module):
        def __init__(self, size: float) -> None:
            super().__init__()
            self.size = size

        def forward(self, x: Tensor) -> Tensor:
            logits = x.flatten(1)[:, :10]
            return logits + self.size * torch.rand_like(logits)

    x = torch.rand(4, 3, 4, 4)
    assert check_determinism(Jitter(5e-5), x) is None
    assert check_determinism(Jitter(1e-2), x) is not None
    with pytest.raises(ValueError, match="passes"):
        check_determinism(Jitter(0.0), x, passes=1)


def test_determinism_leaves_the_callers_random_stream_alone(
    undefended: nn.Module, points: Points
) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first = check_determinism(InputNoise(undefended), points.x)
    assert torch.equal(torch.rand(3), expected)
    second = check_determinism(InputNoise(undefended), points.x)
    assert first == second  # the check seeds the model's randomness itself


def test_batch_dependent_model_is_flagged(undefended: nn.Module, points: Points) -> None:
    flag = check_batch_consistency(BatchCentered(undefended), points.x, batch_sizes=(1, 48))
    assert flag is not None
    assert flag.code is FlagCode.BATCH_DEPENDENT
    assert flag.details["batch_sizes"] == [1, 48]
    changed = flag.details["changed_count"]
    assert isinstance(changed, int) and 0 < changed <= 48
    assert f"{changed} of 48" in flag.message


def test_batch_norm_in_train_mode_is_set_to_eval(undefended: nn.Module, points: Points) -> None:
    undefended.train()
    try:
        assert check_batch_consistency(undefended, points.x, batch_sizes=(1, 48)) is None
        assert undefended.training
    finally:
        undefended.eval()


def test_randomness_is_not_reported_as_batch_dependence(
    undefended: nn.Module, points: Points
) -> None:
    model = LogitDropout(undefended)
    assert check_batch_consistency(model, points.x, batch_sizes=(1, 48)) is None
    assert check_determinism(model, points.x) is not None
    with pytest.raises(ValueError, match="differ"):
        check_batch_consistency(undefended, points.x, batch_sizes=(8, 8))


def test_softmax_outputs_are_flagged(undefended: nn.Module, points: Points) -> None:
    flag = check_logits(nn.Sequential(undefended, nn.Softmax(dim=1)), points.x, batch_size=20)
    assert flag is not None
    assert flag.code is FlagCode.PROBABILITIES
    deviation = flag.details["max_row_sum_deviation"]
    assert isinstance(deviation, float) and deviation <= 1e-3
    assert "logits" in flag.message


def test_log_probabilities_and_nonnegative_logits_are_not_flagged(
    undefended: nn.Module, points: Points
) -> None:
    assert check_logits(nn.Sequential(undefended, nn.LogSoftmax(dim=1)), points.x) is None
    # Non-negative but not normalized: ReLU on logits is not a probability output.
    assert check_logits(nn.Sequential(undefended, nn.ReLU()), points.x) is None


def test_quantized_model_has_zero_gradients(quantized: nn.Module, points: Points) -> None:
    flags = check_gradients(quantized, points.x, points.y, batch_size=20)
    assert codes(flags) == {FlagCode.ZERO_GRADIENTS}
    assert flags[0].details["zero_share"] == 1.0
    assert "zero at 100% of the clean test points (48 of 48)" in flags[0].message
    assert "black-box attacks may still break it" in flags[0].message


def test_detached_model_has_zero_gradients(undefended: nn.Module, points: Points) -> None:
    flags = check_gradients(Detached(undefended), points.x, points.y)
    assert codes(flags) == {FlagCode.ZERO_GRADIENTS}
    assert flags[0].details["cause"] == "output_not_connected_to_input"


def test_nan_gradients_are_flagged(undefended: nn.Module, points: Points) -> None:
    model = NanGradient(undefended)
    with torch.no_grad():
        assert torch.isfinite(model(points.x)).all()
    flags = check_gradients(model, points.x, points.y)
    assert codes(flags) == {FlagCode.NONFINITE_GRADIENTS}
    assert flags[0].details["nonfinite_share"] == 1.0
    assert flags[0].details["nonfinite_output_count"] == 0


def test_zero_gradient_share_threshold(undefended: nn.Module, points: Points) -> None:
    # Half the points behind a quantizer, half not: a share of exactly 0.5 is not above 0.5.
    class HalfQuantized(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            frozen = torch.round(x * 7) / 7
            keep = (torch.arange(x.shape[0]) % 2 == 0).view(-1, 1, 1, 1)
            return undefended(torch.where(keep, x, frozen))

    x, y = points.x[:48], points.y[:48]
    assert check_gradients(HalfQuantized(), x, y) == []
    flags = check_gradients(HalfQuantized(), x, y, max_zero_share=0.4)
    assert codes(flags) == {FlagCode.ZERO_GRADIENTS}
    assert flags[0].details["zero_share"] == 0.5


# --- Gaps ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("white_box", "other", "flagged"),
    [
        (0.45, 0.45, False),
        (0.45, 0.449, False),
        (0.45, 0.448, False),  # exactly 0.2 points (0.0020000000000000018 in floats)
        (0.45, 0.4479, True),
        (0.45, 0.40, True),
        (0.40, 0.45, False),  # the black-box / transfer attack did worse
        (0.002, 0.0, False),
        (0.003, 0.0, True),
    ],
)
def test_gap_checks_at_the_boundary(white_box: float, other: float, flagged: bool) -> None:
    black_box = check_black_box_gap(robust_after_white_box=white_box, robust_after_black_box=other)
    transfer = check_transfer_gap(white_box_robust=white_box, transfer_robust=other)
    assert (black_box is not None) is flagged
    assert (transfer is not None) is flagged
    if black_box is not None and transfer is not None:
        assert black_box.code is FlagCode.BLACK_BOX_GAP
        assert transfer.code is FlagCode.TRANSFER_GAP
        assert black_box.details["gap"] == pytest.approx(white_box - other)


def test_gap_message_reads_in_points_and_percent() -> None:
    flag = check_black_box_gap(robust_after_white_box=0.45, robust_after_black_box=0.42)
    assert flag is not None
    assert "broke 3 points more" in flag.message
    assert "45%" in flag.message and "42%" in flag.message
    assert (
        check_black_box_gap(
            robust_after_white_box=0.45, robust_after_black_box=0.42, threshold=0.05
        )
        is None
    )
    with pytest.raises(ValueError, match="fraction"):
        check_transfer_gap(white_box_robust=45.0, transfer_robust=42.0)


# --- eps sweep -----------------------------------------------------------------------------------


def test_eps_sweep_on_undefended_reaches_zero(undefended: nn.Module, points: Points) -> None:
    # Six points get a wrong label: the clean accuracy is 42/48 and they count as broken.
    y = points.y.clone()
    y[:6] = (y[:6] + 1) % 10
    sweep = eps_sweep(
        undefended, points.x, y, norm=Norm.LINF, eps_values=SWEEP, attack=SignGradient(), seed=0
    )
    accuracies = [point.robust_accuracy for point in sweep]
    assert [point.eps for point in sweep] == list(SWEEP)
    assert accuracies[0] == pytest.approx(42 / 48)
    assert all(b <= a for a, b in zip(accuracies, accuracies[1:], strict=False))
    assert accuracies[-1] <= 0.05
    assert accuracies[1] > accuracies[-1]  # small eps leaves points: the curve really falls
    for point in sweep:
        assert point.raw_robust_accuracy is not None
        assert point.robust_accuracy <= point.raw_robust_accuracy
    assert check_eps_sweep(sweep, clean_accuracy=42 / 48) == []


def test_eps_sweep_on_quantized_stays_high(quantized: nn.Module, points: Points) -> None:
    x, y = points.x[:24], points.y[:24]
    with torch.no_grad():
        clean = float((quantized(x).argmax(1) == y).float().mean())
    assert clean > 0.5
    sweep = eps_sweep(
        quantized,
        x,
        y,
        norm=Norm.LINF,
        eps_values=SWEEP,
        attack=SignGradient(),
        seed=0,
    )
    assert sweep[0].robust_accuracy == pytest.approx(clean)
    assert sweep[-1].robust_accuracy > 0.5
    flags = check_eps_sweep(sweep, clean_accuracy=clean)
    assert FlagCode.EPS_SWEEP_NOT_ZERO in codes(flags)
    not_zero = next(flag for flag in flags if flag.code is FlagCode.EPS_SWEEP_NOT_ZERO)
    assert "At eps 64 on the 0-255 scale" in not_zero.message


def test_eps_sweep_is_cumulative_and_reports_raw_rises(
    undefended: nn.Module, points: Points
) -> None:
    sweep = eps_sweep(
        undefended,
        points.x,
        points.y,
        norm=Norm.LINF,
        eps_values=(0, 2, 4, 8),
        attack=SmallEpsOnly(),
        seed=0,
    )
    at_4, at_8 = sweep[2], sweep[3]
    assert at_8.raw_robust_accuracy == 1.0  # the attack gave up at eps 8
    assert at_8.robust_accuracy == at_4.robust_accuracy < 0.5  # but eps 4's successes count
    flags = check_eps_sweep(sweep, clean_accuracy=1.0)
    assert FlagCode.EPS_SWEEP_NOT_MONOTONE in codes(flags)  # (and NOT_ZERO: eps 8 is not large)
    rise = next(flag for flag in flags if flag.code is FlagCode.EPS_SWEEP_NOT_MONOTONE)
    assert rise.details["rising_at_eps"] == [8.0]
    assert "at eps 8" in rise.message


def test_eps_sweep_seeds_each_eps_on_its_own(undefended: nn.Module, points: Points) -> None:
    attack = SignGradient(steps=2, random_start=True)
    x, y = points.x[:24], points.y[:24]

    def sweep(eps_values: tuple[float, ...], seed: int) -> list[SweepPoint]:
        return eps_sweep(
            undefended,
            x,
            y,
            norm=Norm.LINF,
            eps_values=eps_values,
            attack=attack,
            seed=seed,
            batch_size=10,
        )

    full = sweep((0.0, 1.0, 2.0), seed=5)
    assert full == sweep((0.0, 1.0, 2.0), seed=5)
    assert sweep((2.0,), seed=5)[0].raw_robust_accuracy == full[2].raw_robust_accuracy
    with pytest.raises(ValueError, match="increasing"):
        sweep((0.0, 2.0, 1.0), seed=5)


def test_check_eps_sweep_on_given_curves() -> None:
    def curve(*values: float) -> list[SweepPoint]:
        return [
            SweepPoint(eps=eps, robust_accuracy=value)
            for eps, value in zip((0.0, 4.0, 8.0, 64.0), values, strict=True)
        ]

    assert check_eps_sweep(curve(0.9, 0.5, 0.3, 0.05), clean_accuracy=0.9) == []
    assert codes(check_eps_sweep(curve(0.9, 0.5, 0.3, 0.06), clean_accuracy=0.9)) == {
        FlagCode.EPS_SWEEP_NOT_ZERO
    }
    rising = check_eps_sweep(curve(0.9, 0.3, 0.5, 0.0), clean_accuracy=0.9)
    assert codes(rising) == {FlagCode.EPS_SWEEP_NOT_MONOTONE}
    assert "30% of the points correctly classified at eps 4 but 50% at eps 8" in rising[0].message
    # Above the clean accuracy is a rise from eps 0.
    above_clean = check_eps_sweep(curve(0.9, 0.92, 0.3, 0.0), clean_accuracy=0.9)
    assert codes(above_clean) == {FlagCode.EPS_SWEEP_NOT_MONOTONE}
    assert "eps 0 (no perturbation)" in above_clean[0].message
    assert check_eps_sweep([], clean_accuracy=0.9) == []


# --- Clean accuracy ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("clean", "minimum", "flagged"),
    [
        (0.5, None, False),
        (0.0, None, False),
        (0.70, 0.70, False),
        (0.7 - 1e-12, 0.70, False),  # float noise is not a shortfall
        (0.69, 0.70, True),
        (0.0, 0.01, True),
        (1.0, 1.0, False),
    ],
)
def test_clean_accuracy_boundaries(clean: float, minimum: float | None, flagged: bool) -> None:
    flag = check_clean_accuracy(clean, minimum)
    assert (flag is not None) is flagged
    if flag is not None:
        assert flag.code is FlagCode.LOW_CLEAN_ACCURACY
        assert flag.details == {"clean_accuracy": clean, "minimum": minimum}


def test_clean_accuracy_message_and_validation() -> None:
    flag = check_clean_accuracy(0.62, 0.7)
    assert flag is not None
    assert "62%" in flag.message and "70%" in flag.message
    with pytest.raises(ValueError):
        check_clean_accuracy(62.0, 0.7)
    with pytest.raises(ValueError):
        check_clean_accuracy(0.62, float("nan"))


def test_flags_are_frozen_and_serializable() -> None:
    flag = check_clean_accuracy(0.5, 0.6)
    assert flag is not None
    with pytest.raises(ValueError):
        flag.code = FlagCode.PROBABILITIES  # type: ignore[misc]
    assert Flag.model_validate_json(flag.model_dump_json()) == flag
