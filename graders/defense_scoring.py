"""Scoring of defense-phase checkpoints: clean and robust accuracy under a phase's threat model,
measured by the attack suites, with the gradient-masking checks stored alongside."""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import StrEnum
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from graders.attack_scoring import default_device
from graders.attacks.apgd import APGD, ApgdLoss
from graders.attacks.core import Ball, TargetModel, fraction_true, predict_logits
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
    eps_sweep,
)
from graders.attacks.suite import (
    SuiteKind,
    SuiteParams,
    SuiteReport,
    run_suite,
)
from graders.datasets import images_to_tensor
from graders.threat_model import ThreatModel
from graders.version import DEFENSE_EVALUATOR_VERSION

Progress = Callable[[dict[str, Any]], None]

CHECK_POINTS = 100
"""How many evaluation points the cheap model checks (determinism, logits, gradients) use."""

WHITE_BOX = ("pgd", "apgd-ce", "apgd-dlr", "apgd-t", "fab-t")


class RandomizedPolicy(StrEnum):
    """What to do with a model whose outputs change between identical forward passes:
    ``eot``: evaluate with the ``rand`` suite (EOT gradients); ``flag``: evaluate as configured
    and flag the result for review by the course staff."""

    EOT = "eot"
    FLAG = "flag"


class DefenseEvalConfig(BaseModel):
    """How a phase evaluates defenses (the ``[phases.defense]`` table of an assignment spec)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    leaderboard_suite: SuiteKind = SuiteKind.QUICK
    final_suite: SuiteKind = SuiteKind.FULL
    params: SuiteParams = SuiteParams()
    seed: int = Field(default=0, ge=0)
    batch_size: int | None = Field(default=None, ge=1, le=100_000)
    bf16: bool = Field(default=True, description="bf16 autocast for attack steps on CUDA")
    cpu_bf16: bool = Field(
        default=False,
        description="bf16 autocast for attack steps on a CPU too (worth it only on CPUs with "
        "native bf16, e.g. AVX512-BF16 or AMX; every break is still verified in fp32)",
    )
    min_clean_accuracy: float | None = Field(default=None, ge=0, le=1)
    randomized: RandomizedPolicy = RandomizedPolicy.EOT
    eps_sweep: list[float] = Field(
        default_factory=list, description="extra eps values on the 0-255 scale; empty: no sweep"
    )
    sweep_iterations: int = Field(default=20, ge=1, le=1000)
    sweep_points: int = Field(default=200, ge=1)

    def suites(self) -> list[SuiteKind]:
        """The distinct suites to run, the leaderboard's first."""
        kinds = [self.leaderboard_suite]
        if self.final_suite is not self.leaderboard_suite:
            kinds.append(self.final_suite)
        return kinds


class DefenseReport(BaseModel):
    """What is stored for a scored defense. ``score`` is the leaderboard suite's robust accuracy
    (higher wins); ``final_robust_accuracy`` is the per-point worst case over every suite run."""

    metric: str = "robust_accuracy"
    score: float
    clean_accuracy: float
    robust_accuracy: float
    final_robust_accuracy: float
    leaderboard_suite: SuiteKind
    final_suite: SuiteKind
    suites: dict[str, SuiteReport]
    flags: list[Flag]
    randomized: bool
    eps_sweep: list[SweepPoint]
    threat_model: dict[str, float | str]
    n_points: int
    seed: int
    device: str
    evaluation_seconds: float
    evaluator_version: str = DEFENSE_EVALUATOR_VERSION


def default_attack_batch_size(device: torch.device) -> int:
    """Attack batches: large on a GPU (halved on out-of-memory), 100 on a CPU."""
    return 512 if device.type == "cuda" else 100


def evaluate_defense(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    threat_model: ThreatModel,
    config: DefenseEvalConfig,
    *,
    device: torch.device | None = None,
    progress: Progress | None = None,
) -> DefenseReport:
    """Clean accuracy, robust accuracy under each configured suite, and the masking checks.

    ``model`` takes [0, 1] NCHW images (normalization inside) and returns logits; it is moved
    to ``device`` in channels-last layout and evaluated in eval mode. ``images`` are the hidden
    uint8 N x 32 x 32 x 3 evaluation points.
    """
    started = time.perf_counter()
    device = device or default_device()
    batch_size = config.batch_size or default_attack_batch_size(device)
    bf16 = config.bf16 if device.type == "cuda" else config.cpu_bf16
    model = model.to(device).to(memory_format=torch.channels_last).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    x = images_to_tensor(images).to(device)
    y = torch.from_numpy(labels.astype(np.int64)).to(device)
    ball = Ball.of(threat_model)

    def report_stage(stage: str) -> None:
        if progress is not None:
            progress({"stage": stage})

    report_stage("checking the model")
    flags: list[Flag] = []
    probe_x, probe_y = x[:CHECK_POINTS], y[:CHECK_POINTS]
    determinism = check_determinism(model, probe_x, batch_size=batch_size)
    randomized = determinism is not None
    if determinism is not None:
        flags.append(determinism)
    probabilities = check_logits(model, probe_x, batch_size=batch_size)
    if probabilities is not None:
        flags.append(probabilities)
    flags.extend(check_gradients(model, probe_x, probe_y, batch_size=batch_size))

    kinds = config.suites()
    if randomized and config.randomized is RandomizedPolicy.EOT:
        kinds = [SuiteKind.RAND]

    clean_logits = predict_logits(TargetModel(model), x, batch_size)
    clean_accuracy = fraction_true(clean_logits.argmax(1) == y)
    suites: dict[str, SuiteReport] = {}
    robust_everywhere = torch.ones(len(y), dtype=torch.bool)
    last_adv = x
    for kind in kinds:
        run = run_suite(
            model,
            x,
            y,
            ball,
            kind,
            config.params,
            seed=config.seed,
            batch_size=batch_size,
            bf16=bf16,
            clean_logits=None if randomized else clean_logits,
            progress=progress,
        )
        suites[kind.value] = run.report
        robust_everywhere &= torch.tensor([b is None for b in run.report.broken_by])
        last_adv = run.x_adv
        if kind is SuiteKind.FULL:
            gap = check_black_box_gap(
                robust_after_white_box=run.report.robust_after(WHITE_BOX),
                robust_after_black_box=run.report.robust_accuracy,
            )
            if gap is not None:
                flags.append(gap)

    if not randomized:
        consistency = check_batch_consistency(
            model, last_adv, batch_sizes=(batch_size, max(1, batch_size // 3))
        )
        if consistency is not None:
            flags.append(consistency)

    sweep: list[SweepPoint] = []
    if config.eps_sweep:
        report_stage("eps sweep")
        count = min(config.sweep_points, len(y))
        values = sorted({0.0, *config.eps_sweep, threat_model.eps})
        sweep = eps_sweep(
            model,
            x[:count],
            y[:count],
            norm=threat_model.norm,
            eps_values=values,
            attack=APGD(loss=ApgdLoss.CE, iterations=config.sweep_iterations),
            seed=config.seed,
            batch_size=batch_size,
        )
        sweep_clean = fraction_true(clean_logits[:count].argmax(1) == y[:count])
        flags.extend(check_eps_sweep(sweep, clean_accuracy=sweep_clean))

    low = check_clean_accuracy(clean_accuracy, config.min_clean_accuracy)
    if low is not None:
        flags.append(low)
    if randomized and config.randomized is RandomizedPolicy.FLAG:
        flags.append(
            Flag(
                code=FlagCode.NONDETERMINISTIC,
                message=(
                    "This phase does not evaluate randomized models with EOT; the course staff "
                    "will review this result by hand."
                ),
                details={"policy": config.randomized.value},
            )
        )

    leaderboard = suites[kinds[0].value]
    final = suites[kinds[-1].value]
    n = len(y)
    return DefenseReport(
        score=leaderboard.robust_accuracy,
        clean_accuracy=clean_accuracy,
        robust_accuracy=leaderboard.robust_accuracy,
        final_robust_accuracy=fraction_true(robust_everywhere),
        leaderboard_suite=leaderboard.suite,
        final_suite=final.suite,
        suites=suites,
        flags=flags,
        randomized=randomized,
        eps_sweep=sweep,
        threat_model={"norm": threat_model.norm.value, "eps": threat_model.eps},
        n_points=n,
        seed=config.seed,
        device=str(device),
        evaluation_seconds=time.perf_counter() - started,
    )
