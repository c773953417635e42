"""Gradient-masking checks of a defense evaluation (EVALUATION.md, sanity checks 2-9): signs that
the attack suite's robust accuracy overstates a model's robustness, reported as flags that are
stored with the result and shown to the TA and the student.

A flag does not change a score. It says what was seen (with numbers), what it usually means and
what to do. Images are float32 NCHW in [0, 1]; models return logits; accuracies are fractions in
[0, 1]; epsilons of the eps sweep are on the 0-255 scale.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from enum import StrEnum

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from graders.attacks.core import (
    Attack,
    Ball,
    TargetModel,
    check_positive_int,
    cross_entropy,
    eval_mode,
    fraction_true,
    misclassified,
    predict_logits,
)
from graders.threat_model import Norm

GAP_THRESHOLD = 0.002
"""0.2 points: a black-box or transfer attack beating the white-box ones by more means masking."""

DETERMINISM_PASSES = 5
DETERMINISM_TOLERANCE = 1e-4
"""Largest absolute change of a logit between identical eval-mode passes (deterministic model)."""

PROBABILITY_TOLERANCE = 1e-3
"""How far from 1 a row of outputs may sum and still look like softmax probabilities."""

ZERO_GRADIENT_SHARE = 0.5
"""Above this share of clean points with an all-zero input gradient, gradients are masked."""

LARGE_EPS_MAX_ACCURACY = 0.05
"""Robust accuracy at the largest eps of a sweep must be at most this (about 0)."""

LINF_SWEEP_EPS: tuple[float, ...] = (0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
"""A suitable L-inf sweep (0-255 scale): at 64/255 a working attack breaks about every point."""

_SLACK = 1e-9
"""Float slack on comparisons of accuracies (k / N) against thresholds: 0.45 - 0.448 is
0.0020000000000000018 in floats, and a gap of exactly 0.2 points must not raise a flag."""

_CHECK_SEED = 0
"""Seed of the global RNGs while a check runs a (possibly randomized) model: stored flags are
reproducible, and the caller's random streams are left as they were."""


class FlagCode(StrEnum):
    """What a masking flag is about; stored with the result."""

    NONDETERMINISTIC = "nondeterministic"
    BATCH_DEPENDENT = "batch_dependent"
    """Predictions differ between two batch sizes."""
    PROBABILITIES = "probabilities"
    """Outputs look like softmax outputs, not logits."""
    ZERO_GRADIENTS = "zero_gradients"
    NONFINITE_GRADIENTS = "nonfinite_gradients"
    BLACK_BOX_GAP = "black_box_gap"
    """Square broke more than 0.2 points that the white-box attacks missed."""
    TRANSFER_GAP = "transfer_gap"
    """A transfer attack beat the white-box attacks by more than 0.2 points."""
    EPS_SWEEP_NOT_MONOTONE = "eps_sweep_not_monotone"
    EPS_SWEEP_NOT_ZERO = "eps_sweep_not_zero"
    """Still robust at a large eps."""
    LOW_CLEAN_ACCURACY = "low_clean_accuracy"


FlagDetail = float | int | str | list[float] | list[int]


class Flag(BaseModel):
    """One sign of gradient masking. ``message`` is plain words for the student and the TA: what
    was seen (with numbers), what it usually means, what to do; ``details`` the numbers behind it.
    """

    model_config = ConfigDict(frozen=True)

    code: FlagCode
    message: str
    details: dict[str, FlagDetail] = Field(default_factory=dict)


class SweepPoint(BaseModel):
    """Robust accuracy at one eps (0-255 scale) of an eps sweep.

    ``robust_accuracy`` is cumulative: a point broken at this eps or at any smaller eps of the
    sweep counts as broken (the larger ball contains the smaller one), so along a sweep it never
    rises. ``raw_robust_accuracy`` is what the attack at this eps achieved by itself; ``None``
    (points built elsewhere) means the same as ``robust_accuracy``.
    """

    model_config = ConfigDict(frozen=True)

    eps: float = Field(ge=0, allow_inf_nan=False)
    robust_accuracy: float = Field(ge=0, le=1)
    raw_robust_accuracy: float | None = Field(default=None, ge=0, le=1)

    @property
    def attack_accuracy(self) -> float:
        """The attack's own result at this eps (raw when known)."""
        return (
            self.robust_accuracy if self.raw_robust_accuracy is None else self.raw_robust_accuracy
        )


# --- Checks on the model at clean points ---------------------------------------------------------


def check_determinism(
    model: nn.Module,
    x: Tensor,
    *,
    passes: int = DETERMINISM_PASSES,
    tolerance: float = DETERMINISM_TOLERANCE,
    batch_size: int = 100,
) -> Flag | None:
    """Flag a model whose logits change between ``passes`` identical fp32 eval-mode forward
    passes by more than ``tolerance`` (absolute): a randomized model needs Expectation over
    Transformation, and plain gradient attacks overstate its robustness."""
    _check_images(x)
    check_positive_int("batch_size", batch_size)
    if isinstance(passes, bool) or not isinstance(passes, int) or passes < 2:
        raise ValueError(f"passes must be an integer >= 2, got {passes!r}")
    if not math.isfinite(tolerance) or tolerance < 0:
        raise ValueError(f"tolerance must be finite and >= 0, got {tolerance!r}")
    n = x.shape[0]
    if n == 0:
        return None
    target = TargetModel(model)
    with eval_mode(model), _fixed_global_rng(x.device):
        runs = [predict_logits(target, x, batch_size) for _ in range(passes)]
    first = runs[0]
    moved = torch.zeros(n, dtype=torch.bool, device=x.device)
    relabelled = torch.zeros(n, dtype=torch.bool, device=x.device)
    largest = 0.0
    for other in runs[1:]:
        close = torch.isclose(other, first, rtol=0.0, atol=tolerance, equal_nan=True)
        moved |= ~close.all(dim=1)
        relabelled |= other.argmax(dim=1) != first.argmax(dim=1)
        difference = (other - first).abs().nan_to_num(nan=math.inf)
        largest = max(largest, float(torch.where(close, 0.0, difference).max()))
    if not bool(moved.any()):
        return None
    moved_share = fraction_true(moved)
    relabelled_share = fraction_true(relabelled)
    message = (
        f"Your model's outputs change between identical forward passes: over {passes} passes in "
        f"eval mode on the same {n} clean test points, the logits of {_percent(moved_share)} of "
        f"the points differ by up to {largest:.3g} (tolerance {tolerance:g}), and the predicted "
        f"class changes on {_percent(relabelled_share)} of the points. This usually means "
        "randomness at test time (dropout left active, random noise or random input "
        "transformations). Randomness makes single gradients noisy, so plain white-box "
        "attacks overstate robustness; the grader has to average gradients over many passes "
        "(Expectation over Transformation) to evaluate such a model. If the randomness is not "
        "meant to be part of your defense, make the forward pass deterministic in eval mode."
    )
    return Flag(
        code=FlagCode.NONDETERMINISTIC,
        message=message,
        details={
            "passes": passes,
            "tolerance": tolerance,
            "n_points": n,
            "max_abs_difference": largest,
            "changed_share": moved_share,
            "prediction_changed_share": relabelled_share,
        },
    )


def check_batch_consistency(
    model: nn.Module, x: Tensor, *, batch_sizes: tuple[int, int]
) -> Flag | None:
    """Flag a model whose eval-mode predictions depend on the batch: the argmax at batch size
    ``batch_sizes[0]`` differs from the argmax at ``batch_sizes[1]`` on some point (BatchNorm
    using batch statistics, layers mixing the images of a batch).

    The first batch size is run twice: if its two passes already disagree the model is
    randomized, differences are not evidence of batch dependence, and no flag is raised here
    (:func:`check_determinism` reports it). Pick batch sizes that split ``x`` differently, e.g.
    ``(1, len(x))``; if both are at least ``len(x)`` the check can see nothing.
    """
    _check_images(x)
    if len(batch_sizes) != 2:
        raise ValueError(f"batch_sizes must be two batch sizes, got {batch_sizes!r}")
    first_size, second_size = batch_sizes
    check_positive_int("batch_sizes[0]", first_size)
    check_positive_int("batch_sizes[1]", second_size)
    if first_size == second_size:
        raise ValueError(f"batch_sizes must differ, got {batch_sizes!r}")
    n = x.shape[0]
    if n == 0:
        return None
    target = TargetModel(model)
    with eval_mode(model), _fixed_global_rng(x.device):
        first = predict_logits(target, x, first_size).argmax(dim=1)
        second = predict_logits(target, x, second_size).argmax(dim=1)
        repeat = predict_logits(target, x, first_size).argmax(dim=1)
    if bool((repeat != first).any()):
        return None
    differs = first != second
    if not bool(differs.any()):
        return None
    count = int(differs.sum())
    share = count / n
    message = (
        f"Your model's predictions depend on how many images it sees at once: in eval mode the "
        f"predicted class of {count} of {n} clean test points ({_percent(share)}) changes between "
        f"batches of {first_size} and of {second_size} images. This usually means a "
        "normalization that uses the statistics of the current batch even in eval mode (e.g. "
        "F.batch_norm(..., training=True) or a hand-written BatchNorm) or another layer that "
        "mixes the images of a batch. Each answer then depends on the other images in the "
        "batch, so attacks and scores depend on the batch size and the robust accuracy is not "
        "reliable. Make each image's output depend on that image only in eval mode (use the "
        "running statistics)."
    )
    return Flag(
        code=FlagCode.BATCH_DEPENDENT,
        message=message,
        details={
            "batch_sizes": [first_size, second_size],
            "n_points": n,
            "changed_count": count,
            "changed_share": share,
        },
    )


def check_logits(model: nn.Module, x: Tensor, *, batch_size: int = 100) -> Flag | None:
    """Flag outputs that look like softmax probabilities rather than logits: every output is
    >= 0 (hence in [0, 1]) and every row sums to 1 within ``PROBABILITY_TOLERANCE``.

    Log-probabilities (a log-softmax output) are not flagged: they differ from logits by a
    per-row constant, which changes neither predictions nor the attacks' losses.
    """
    _check_images(x)
    check_positive_int("batch_size", batch_size)
    n = x.shape[0]
    if n == 0:
        return None
    target = TargetModel(model)
    with eval_mode(model), _fixed_global_rng(x.device):
        outputs = predict_logits(target, x, batch_size).double()
    if not bool(torch.isfinite(outputs).all()) or float(outputs.min()) < 0:
        return None
    deviation = float((outputs.sum(dim=1) - 1).abs().max())
    if deviation > PROBABILITY_TOLERANCE:
        return None
    message = (
        f"Your model's outputs look like probabilities, not logits: on all {n} clean test "
        "points every output is between 0 and 1 and each row sums to 1 (largest deviation "
        f"{deviation:.1e}). The grader's attacks treat the outputs as logits; a softmax on top of "
        "probabilities flattens the loss and saturated softmax outputs have vanishing "
        "gradients, so gradient attacks fail without the model being robust. Return the logits "
        "(the values before the softmax) from forward: the grader applies its own losses."
    )
    return Flag(
        code=FlagCode.PROBABILITIES,
        message=message,
        details={"n_points": n, "max_row_sum_deviation": deviation},
    )


def check_gradients(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    batch_size: int = 100,
    max_zero_share: float = ZERO_GRADIENT_SHARE,
) -> list[Flag]:
    """Flags on the cross-entropy input gradient at the clean points ``x`` with labels ``y``:
    NONFINITE_GRADIENTS if any point's gradient holds a NaN or an infinity, ZERO_GRADIENTS if
    more than ``max_zero_share`` of the points have an all-zero gradient (or the output is not
    connected to the input in the autograd graph at all)."""
    _check_images(x)
    check_positive_int("batch_size", batch_size)
    _check_fraction("max_zero_share", max_zero_share)
    if y.shape != (x.shape[0],):
        raise ValueError(f"y must hold one label per image, got {tuple(y.shape)}")
    n = x.shape[0]
    if n == 0:
        return []
    y = y.to(x.device)
    target = TargetModel(model)
    with eval_mode(model), _fixed_global_rng(x.device):
        if not _gradient_reaches_input(model, x[:1]):
            return [_detached_flag(n)]
        nonfinite_parts, zero_parts, bad_output_parts = [], [], []
        for rows in _chunks(n, batch_size):
            _, grad, logits = target.value_and_grad(x[rows], cross_entropy(y[rows]))
            flat = grad.flatten(1)
            nonfinite_parts.append(~torch.isfinite(flat).all(dim=1))
            zero_parts.append((flat == 0).all(dim=1))
            bad_output_parts.append(~torch.isfinite(logits).all(dim=1))
    nonfinite, zero = torch.cat(nonfinite_parts), torch.cat(zero_parts)
    bad_outputs = torch.cat(bad_output_parts)
    flags = []
    if bool(nonfinite.any()):
        count, share = int(nonfinite.sum()), fraction_true(nonfinite)
        outputs_note = (
            f" The outputs themselves are NaN or infinite at {int(bad_outputs.sum())} of them."
            if bool(bad_outputs.any())
            else ""
        )
        message = (
            f"Your model's input gradients contain NaN or infinite values at {_percent(share)} "
            f"of the clean test points ({count} of {n}).{outputs_note} Gradient attacks cannot "
            "follow such a gradient, so they fail on those points without the model being "
            "robust: this is gradient masking, typically from a square root, logarithm or "
            "division evaluated at zero, or from overflowing activations. Make the forward pass "
            "numerically safe (e.g. add a small epsilon inside sqrt, log and divisions)."
        )
        flags.append(
            Flag(
                code=FlagCode.NONFINITE_GRADIENTS,
                message=message,
                details={
                    "n_points": n,
                    "nonfinite_count": count,
                    "nonfinite_share": share,
                    "nonfinite_output_count": int(bad_outputs.sum()),
                },
            )
        )
    zero_share = fraction_true(zero)
    if zero_share > max_zero_share + _SLACK:
        count = int(zero.sum())
        message = (
            f"Your model's input gradients are zero at {_percent(zero_share)} of the clean test "
            f"points ({count} of {n}). Gradient attacks then have no direction to follow, which "
            "usually means gradient masking (e.g. non-differentiable preprocessing such as "
            "quantization or JPEG, or outputs so confident that the softmax saturates) rather "
            "than robustness; the grader's black-box attacks may still break it. Robustness "
            "that comes from hiding the gradient does not hold up against adaptive attacks: "
            "keep every step of the forward pass differentiable and train for robustness instead."
        )
        flags.append(
            Flag(
                code=FlagCode.ZERO_GRADIENTS,
                message=message,
                details={
                    "n_points": n,
                    "zero_count": count,
                    "zero_share": zero_share,
                    "max_zero_share": max_zero_share,
                },
            )
        )
    return flags


# --- Checks on attack results --------------------------------------------------------------------


def check_black_box_gap(
    *,
    robust_after_white_box: float,
    robust_after_black_box: float,
    threshold: float = GAP_THRESHOLD,
) -> Flag | None:
    """Flag a black-box attack (Square) that broke more than ``threshold`` (0.2 points) of the
    points the white-box attacks left robust.

    ``robust_after_black_box`` is the robust accuracy after Square (run on the points the
    white-box attacks left, as AutoAttack does, or on all points): any gap above the threshold
    means a gradient-free attack found adversarial examples the gradient attacks missed.
    """
    _check_fraction("robust_after_white_box", robust_after_white_box)
    _check_fraction("robust_after_black_box", robust_after_black_box)
    _check_threshold(threshold)
    gap = robust_after_white_box - robust_after_black_box
    if gap <= threshold + _SLACK:
        return None
    message = (
        f"Square, a black-box attack that uses no gradients, broke {_points(gap)} points more "
        f"than the white-box attacks: robust accuracy {_percent(robust_after_white_box)} after "
        f"the white-box attacks, {_percent(robust_after_black_box)} after Square (more than "
        f"{_points(threshold)} points apart means trouble). Gradient attacks losing to a "
        "gradient-free one usually means the gradients are masked (non-differentiable, "
        "randomized or saturated layers) rather than the model being robust. Your score counts "
        "Square's successes, but stronger black-box or adaptive attacks may break more: check "
        "that your forward pass is differentiable and deterministic."
    )
    return Flag(
        code=FlagCode.BLACK_BOX_GAP,
        message=message,
        details={
            "robust_after_white_box": robust_after_white_box,
            "robust_after_black_box": robust_after_black_box,
            "gap": gap,
            "threshold": threshold,
        },
    )


def check_transfer_gap(
    *, white_box_robust: float, transfer_robust: float, threshold: float = GAP_THRESHOLD
) -> Flag | None:
    """Flag a transfer attack (adversarial examples crafted on another model) that leaves a
    robust accuracy more than ``threshold`` (0.2 points) below the white-box attacks'."""
    _check_fraction("white_box_robust", white_box_robust)
    _check_fraction("transfer_robust", transfer_robust)
    _check_threshold(threshold)
    gap = white_box_robust - transfer_robust
    if gap <= threshold + _SLACK:
        return None
    message = (
        "Adversarial examples crafted on another model fooled your model more often than the "
        f"white-box attacks that see its gradients: robust accuracy {_percent(transfer_robust)} "
        f"under the transfer attack against {_percent(white_box_robust)} under the white-box "
        f"attacks, {_points(gap)} points apart (more than {_points(threshold)} means trouble). "
        "An attack without access to your model should not beat one with it; this usually means "
        "your model's gradients are masked and mislead the white-box attacks. Your model is "
        "less robust than its white-box accuracy suggests: check that the forward pass is "
        "differentiable and deterministic."
    )
    return Flag(
        code=FlagCode.TRANSFER_GAP,
        message=message,
        details={
            "white_box_robust": white_box_robust,
            "transfer_robust": transfer_robust,
            "gap": gap,
            "threshold": threshold,
        },
    )


def eps_sweep(
    model: nn.Module | TargetModel,
    x: Tensor,
    y: Tensor,
    *,
    norm: Norm,
    eps_values: Sequence[float],
    attack: Attack,
    seed: int,
    batch_size: int = 100,
) -> list[SweepPoint]:
    """Robust accuracy of ``model`` under ``attack`` at each eps of ``eps_values`` (0-255 scale,
    strictly increasing; eps 0 is the clean accuracy). Misclassified clean points count as
    broken at every eps; a success is a fresh fp32 forward pass that misclassifies.

    Every eps attacks all correctly classified points afresh, not only those still robust at the
    previous eps. That costs one attack per eps on every point but keeps two curves apart:

    - ``raw_robust_accuracy``: what the attack at that eps found by itself. This is the one
      :func:`check_eps_sweep` tests for rises, the masking symptom (an attack that breaks a point
      at eps 4 but not at eps 8 is not following a useful gradient). Attacking only the
      survivors would make it non-increasing by construction and hide exactly that.
    - ``robust_accuracy``: cumulative, a point broken at some eps counts as broken at every
      larger one (the larger ball contains the smaller). It never rises, is the better estimate
      of robustness at each eps, and is the curve to show and to test at the largest eps.

    The generator at each eps is seeded from ``seed`` and that eps alone, so adding or removing
    an eps leaves the results at the others unchanged. ``attack`` needs enough iterations for the
    largest eps: steps that are a large fraction of eps overshoot (in the tests, sign-gradient
    PGD with 5 steps left 6% of the undefended model's points robust at 64/255 that it broke at
    16/255; with 10 steps, none), which the raw curve then shows as a rise.
    """
    norm = Norm(norm)
    _check_images(x)
    check_positive_int("batch_size", batch_size)
    if y.shape != (x.shape[0],):
        raise ValueError(f"y must hold one label per image, got {tuple(y.shape)}")
    eps_list = [float(eps) for eps in eps_values]
    if not eps_list:
        raise ValueError("eps_values must not be empty")
    if any(not math.isfinite(eps) or eps < 0 for eps in eps_list):
        raise ValueError(f"eps values must be finite and >= 0, got {eps_list}")
    if any(later <= earlier for earlier, later in zip(eps_list, eps_list[1:], strict=False)):
        raise ValueError(f"eps values must be strictly increasing, got {eps_list}")
    n = x.shape[0]
    if n == 0:
        raise ValueError("the eps sweep needs at least one point")
    target = model if isinstance(model, TargetModel) else TargetModel(model)
    x, y = x.detach().float(), y.to(x.device)
    with eval_mode(target.module):
        correct = torch.cat(
            [
                ~misclassified(target.verify_logits(x[rows]), y[rows])
                for rows in _chunks(n, batch_size)
            ]
        )
        x_correct, y_correct = x[correct], y[correct]
        survivors = torch.ones(x_correct.shape[0], dtype=torch.bool, device=x.device)
        points = []
        for eps in eps_list:
            if eps == 0 or x_correct.shape[0] == 0:
                robust = torch.ones_like(survivors)
            else:
                robust = _robust_under(
                    target,
                    x_correct,
                    y_correct,
                    ball=Ball(norm, eps / 255.0),
                    attack=attack,
                    generator=torch.Generator().manual_seed(_eps_seed(seed, eps)),
                    batch_size=batch_size,
                )
            survivors &= robust
            points.append(
                SweepPoint(
                    eps=eps,
                    robust_accuracy=int(survivors.sum()) / n,
                    raw_robust_accuracy=int(robust.sum()) / n,
                )
            )
    return points


def check_eps_sweep(
    points: Sequence[SweepPoint],
    *,
    clean_accuracy: float,
    large_eps_max_accuracy: float = LARGE_EPS_MAX_ACCURACY,
) -> list[Flag]:
    """Flags on an eps sweep (any order; sorted by eps here).

    EPS_SWEEP_NOT_MONOTONE: the attack's own accuracy (``raw_robust_accuracy``) at some eps is
    above its value at a smaller eps or above ``clean_accuracy`` (the value at eps 0); the
    largest such rise is reported. EPS_SWEEP_NOT_ZERO: the cumulative ``robust_accuracy`` at the
    largest eps of the sweep is above ``large_eps_max_accuracy``; the sweep must therefore end at
    an eps that breaks any honest model (L-inf 64 on the 0-255 scale, see ``LINF_SWEEP_EPS``).
    """
    _check_fraction("clean_accuracy", clean_accuracy)
    _check_fraction("large_eps_max_accuracy", large_eps_max_accuracy)
    ordered = sorted(points, key=lambda point: point.eps)
    if not ordered:
        return []
    flags = []
    lowest_eps, lowest = 0.0, clean_accuracy
    worst: tuple[float, float, float, float] | None = None  # (lower eps, its acc, eps, acc)
    rising = []
    for point in ordered:
        accuracy = point.attack_accuracy
        if accuracy > lowest + _SLACK:
            rising.append(point.eps)
            if worst is None or accuracy - lowest > worst[3] - worst[1]:
                worst = (lowest_eps, lowest, point.eps, accuracy)
        elif accuracy < lowest:
            lowest_eps, lowest = point.eps, accuracy
    details: dict[str, FlagDetail] = {
        "eps": [point.eps for point in ordered],
        "robust_accuracy": [point.robust_accuracy for point in ordered],
        "raw_robust_accuracy": [point.attack_accuracy for point in ordered],
        "clean_accuracy": clean_accuracy,
    }
    if worst is not None:
        low_eps, low_accuracy, high_eps, high_accuracy = worst
        message = (
            "Robust accuracy rose as the perturbation budget grew: the attack left "
            f"{_percent(low_accuracy)} of the points correctly classified at "
            f"{_eps_label(low_eps)} but {_percent(high_accuracy)} at {_eps_label(high_eps)} "
            "(eps on the 0-255 scale). A larger ball contains the smaller one, so a working "
            "attack only does better as eps grows; a rise means the attack misses adversarial "
            "examples that exist. That usually means gradient masking (noisy, shattered or "
            "uninformative gradients) rather than robustness; less often the sweep's attack has "
            "too few iterations for a large eps. The grader counts a point broken at a smaller "
            "eps as broken at every larger one."
        )
        flags.append(
            Flag(
                code=FlagCode.EPS_SWEEP_NOT_MONOTONE,
                message=message,
                details={**details, "rising_at_eps": rising},
            )
        )
    last = ordered[-1]
    if last.robust_accuracy > large_eps_max_accuracy + _SLACK:
        message = (
            f"At eps {last.eps:g} on the 0-255 scale, the largest of the sweep, "
            f"{_percent(last.robust_accuracy)} of the points are still classified correctly "
            f"under the gradient attack (expected at most {_percent(large_eps_max_accuracy)}). "
            "A perturbation that large can turn an image into a different one, so real "
            "robustness does not survive it; the attack failing there usually means gradient "
            "masking (e.g. non-differentiable preprocessing such as quantization or JPEG) rather "
            "than robustness. The grader's black-box attacks may still break your model."
        )
        flags.append(
            Flag(
                code=FlagCode.EPS_SWEEP_NOT_ZERO,
                message=message,
                details={**details, "large_eps_max_accuracy": large_eps_max_accuracy},
            )
        )
    return flags


def check_clean_accuracy(clean_accuracy: float, minimum: float | None) -> Flag | None:
    """Flag a clean accuracy below the phase's ``minimum`` (``None``: the phase sets none). A
    model can look robust by being inaccurate, so robust accuracy means little below it."""
    _check_fraction("clean_accuracy", clean_accuracy)
    if minimum is None:
        return None
    _check_fraction("minimum", minimum)
    if clean_accuracy >= minimum - _SLACK:
        return None
    message = (
        f"Your model's clean accuracy is {_percent(clean_accuracy)}, below this phase's minimum "
        f"of {_percent(minimum)}. A model can look robust by being inaccurate (points it already "
        "gets wrong cannot be attacked, and a near-constant classifier has few adversarial "
        "examples to find), so its robust accuracy says little about robustness. Raise the "
        "clean accuracy (train longer, or trade off less of it for robustness) and resubmit."
    )
    return Flag(
        code=FlagCode.LOW_CLEAN_ACCURACY,
        message=message,
        details={"clean_accuracy": clean_accuracy, "minimum": minimum},
    )


# --- Helpers -------------------------------------------------------------------------------------


@contextmanager
def _fixed_global_rng(device: torch.device) -> Iterator[None]:
    """Seed the global RNGs a randomized model draws from (the CPU's and ``device``'s) with
    ``_CHECK_SEED`` for the duration, then put the caller's states back."""
    cuda_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices, device_type="cuda"):
        torch.random.default_generator.manual_seed(_CHECK_SEED)
        if device.type == "cuda":
            with torch.cuda.device(device):
                torch.cuda.manual_seed(_CHECK_SEED)
        yield


def _chunks(n: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


def _gradient_reaches_input(module: nn.Module, x: Tensor) -> bool:
    """Whether the output depends on the input in the autograd graph at all (it does not when
    preprocessing runs in NumPy, under ``torch.no_grad()`` or after ``.detach()``)."""
    x_var = x.detach().float().clone().requires_grad_(True)
    with torch.enable_grad():
        out = module(x_var)
        if not isinstance(out, Tensor) or not out.requires_grad:
            return False
        (grad,) = torch.autograd.grad(out.float().sum(), x_var, allow_unused=True)
    return grad is not None


def _detached_flag(n: int) -> Flag:
    message = (
        "Your model's output is not connected to its input in the autograd graph (for example "
        "preprocessing done in NumPy, under torch.no_grad() or after .detach()), so its input "
        f"gradients are zero at all {n} clean test points. Gradient attacks then have nothing to "
        "follow, which is gradient masking rather than robustness; the grader's black-box "
        "attacks may still break it. Keep the forward pass differentiable from input to output."
    )
    return Flag(
        code=FlagCode.ZERO_GRADIENTS,
        message=message,
        details={
            "n_points": n,
            "zero_count": n,
            "zero_share": 1.0,
            "cause": "output_not_connected_to_input",
        },
    )


def _robust_under(
    target: TargetModel,
    x: Tensor,
    y: Tensor,
    *,
    ball: Ball,
    attack: Attack,
    generator: torch.Generator,
    batch_size: int,
) -> Tensor:
    """Per point: ``attack`` in ``ball`` did not make a fresh fp32 forward pass misclassify it."""
    robust = []
    for rows in _chunks(x.shape[0], batch_size):
        x_adv = attack(target, x[rows], y[rows], ball, generator=generator)
        robust.append(~misclassified(target.verify_logits(x_adv), y[rows]))
    return torch.cat(robust)


def _eps_seed(seed: int, eps: float) -> int:
    """The generator seed of one eps of a sweep: a function of ``seed`` and that eps only."""
    return (seed * 1_000_003 + round(eps * 1000)) % 2**63


def _percent(fraction: float) -> str:
    """0.96 -> "96%", 0.455 -> "45.5%"."""
    return f"{100 * fraction:.1f}".removesuffix(".0") + "%"


def _points(fraction: float) -> str:
    """An accuracy difference in percentage points: 0.0021 -> "0.21"."""
    return f"{100 * fraction:.2f}".rstrip("0").rstrip(".")


def _eps_label(eps: float) -> str:
    return "eps 0 (no perturbation)" if eps == 0 else f"eps {eps:g}"


def _check_images(x: Tensor) -> None:
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(
            f"expected a float NCHW batch in [0, 1], got shape {tuple(x.shape)} and {x.dtype}"
        )


def _check_fraction(name: str, value: float) -> None:
    if isinstance(value, bool) or not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a fraction in [0, 1], got {value!r}")


def _check_threshold(threshold: float) -> None:
    if not math.isfinite(threshold) or not 0.0 <= threshold < 1.0:
        raise ValueError(f"threshold must be a fraction in [0, 1), got {threshold!r}")
