"""Attack suites (``full``, ``quick``, ``rand``) and the runner that applies one to a model: each
attack only on points still robust, every break re-verified by the grader in fp32, per-point
worst case over the suite, batch halving on out-of-memory, progress reported as it goes."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from graders.attacks.apgd import APGD, ApgdLoss, APGDTargeted
from graders.attacks.core import (
    Attack,
    Ball,
    TargetModel,
    eval_mode,
    misclassified,
    predict_logits,
)
from graders.attacks.fab import FABTargeted
from graders.attacks.pgd import PGD
from graders.attacks.square import Square
from graders.errors import GraderError

log = logging.getLogger(__name__)

Progress = Callable[[dict[str, Any]], None]
"""Receives ``{"stage": "attack", "suite", "attack", "attack_index", "attacks",
"robust_points_left", "points_attacked", "points_to_attack"}`` as the run goes."""


class SuiteKind(StrEnum):
    """``full``: AutoAttack-standard composition (APGD-CE, APGD-T, FAB-T, Square).
    ``quick``: PGD with restarts, then APGD-CE, for feedback during a phase.
    ``rand``: APGD-CE and APGD-DLR with Expectation over Transformation, for randomized models."""

    FULL = "full"
    QUICK = "quick"
    RAND = "rand"


class SuiteParams(BaseModel):
    """Iteration counts of the suites; the defaults are AutoAttack standard's (EVALUATION.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    apgd_iterations: int = Field(default=100, ge=1, le=10_000)
    n_targets: int = Field(default=9, ge=1, le=9)
    fab_iterations: int = Field(default=100, ge=1, le=10_000)
    square_queries: int = Field(default=5000, ge=1, le=100_000)
    square_p_init: float = Field(default=0.8, gt=0, le=1)
    pgd_steps: int = Field(default=20, ge=1, le=10_000)
    pgd_restarts: int = Field(default=2, ge=1, le=100)
    eot_samples: int = Field(default=20, ge=1, le=1000)


def build_suite(kind: SuiteKind, params: SuiteParams) -> list[Attack]:
    """The attacks of a suite, in the order they run."""
    kind = SuiteKind(kind)
    if kind is SuiteKind.FULL:
        return [
            APGD(loss=ApgdLoss.CE, iterations=params.apgd_iterations),
            APGDTargeted(n_targets=params.n_targets, iterations=params.apgd_iterations),
            FABTargeted(n_targets=params.n_targets, iterations=params.fab_iterations),
            Square(queries=params.square_queries, p_init=params.square_p_init),
        ]
    if kind is SuiteKind.QUICK:
        return [
            PGD(steps=params.pgd_steps, restarts=params.pgd_restarts),
            APGD(loss=ApgdLoss.CE, iterations=params.apgd_iterations),
        ]
    return [
        APGD(loss=ApgdLoss.CE, iterations=params.apgd_iterations),
        APGD(loss=ApgdLoss.DLR, iterations=params.apgd_iterations),
    ]


def eot_samples_for(kind: SuiteKind, params: SuiteParams) -> int:
    """Gradient samples per step: ``params.eot_samples`` for the ``rand`` suite, else 1."""
    return params.eot_samples if SuiteKind(kind) is SuiteKind.RAND else 1


class AttackStats(BaseModel):
    """One attack's share of a suite run."""

    name: str
    params: dict[str, Any]
    points_attacked: int
    points_broken: int
    robust_accuracy_after: float
    seconds: float
    forward_images: int
    backward_images: int


class SuiteReport(BaseModel):
    """A suite run as it is stored: accuracies, per-attack breakdown, and per-point outcome."""

    suite: SuiteKind
    params: dict[str, Any]
    seed: int
    n_points: int
    clean_accuracy: float
    robust_accuracy: float
    attacks: list[AttackStats]
    broken_by: list[str | None] = Field(
        description="per point: 'clean' if misclassified without attack, the attack that broke "
        "it, or null if it stayed robust"
    )
    batch_size: int
    bf16: bool
    seconds: float

    def robust_after(self, names: Sequence[str]) -> float:
        """Robust accuracy counting only breaks by the named attacks (and clean mistakes)."""
        wanted = set(names) | {"clean"}
        robust = sum(1 for b in self.broken_by if b is None or b not in wanted)
        return robust / self.n_points if self.n_points else 0.0


@dataclass(frozen=True)
class SuiteRun:
    """A report plus the adversarial inputs: the verified adversarial example for each broken
    point and the clean image for every other point."""

    report: SuiteReport
    x_adv: Tensor


def _chunk_seed(seed: int, attack_index: int, first_point: int) -> int:
    digest = hashlib.sha256(f"{seed}/{attack_index}/{first_point}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def run_suite(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    ball: Ball,
    kind: SuiteKind,
    params: SuiteParams,
    *,
    seed: int,
    batch_size: int,
    bf16: bool = False,
    clean_logits: Tensor | None = None,
    progress: Progress | None = None,
) -> SuiteRun:
    """Attack ``model`` on ``(x, y)`` with a suite; robust accuracy is the per-point worst case.

    Each attack starts from the clean images of the points no earlier attack broke. A point is
    counted broken only when its adversarial input passes :meth:`Ball.contains` exactly and a
    fresh fp32 forward pass misclassifies it. ``clean_logits`` (fp32, cached by the caller) skip
    the clean pass. On out-of-memory the batch size halves and the chunk is retried; the final
    batch size is stored. Deterministic for a given ``seed`` and batch size.
    """
    kind = SuiteKind(kind)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    started = time.perf_counter()
    target = TargetModel(model, bf16=bf16, eot_samples=eot_samples_for(kind, params))
    try:
        with eval_mode(model):
            return _run(
                model=model,
                target=target,
                x=x,
                y=y,
                ball=ball,
                kind=kind,
                params=params,
                seed=seed,
                batch_size=batch_size,
                bf16=bf16,
                clean_logits=clean_logits,
                progress=progress,
                started=started,
            )
    except torch.OutOfMemoryError as exc:
        raise GraderError(
            "the model does not fit in the grader's memory even one image at a time"
        ) from exc


def _run(
    *,
    model: nn.Module,
    target: TargetModel,
    x: Tensor,
    y: Tensor,
    ball: Ball,
    kind: SuiteKind,
    params: SuiteParams,
    seed: int,
    batch_size: int,
    bf16: bool,
    clean_logits: Tensor | None,
    progress: Progress | None,
    started: float,
) -> SuiteRun:
    """The suite itself, the model already in eval mode."""
    if clean_logits is None:
        clean_logits = predict_logits(target, x, batch_size)
    broken_by: list[str | None] = [
        "clean" if wrong else None for wrong in misclassified(clean_logits, y).tolist()
    ]
    x_adv = x.clone()
    attacks = build_suite(kind, params)
    stats = []
    for index, attack in enumerate(attacks):
        attack_started = time.perf_counter()
        forwards, backwards = target.forwards, target.backwards
        todo = [i for i, b in enumerate(broken_by) if b is None]
        broken_here = 0
        done = 0
        while done < len(todo):
            if progress is not None:
                progress(
                    {
                        "stage": "attack",
                        "suite": kind.value,
                        "attack": attack.name.value,
                        "attack_index": index + 1,
                        "attacks": len(attacks),
                        "robust_points_left": sum(b is None for b in broken_by),
                        "points_attacked": done,
                        "points_to_attack": len(todo),
                    }
                )
            rows = torch.tensor(todo[done : done + batch_size], device=x.device)
            generator = torch.Generator().manual_seed(_chunk_seed(seed, index, int(rows[0])))
            try:
                candidate = attack(target, x[rows], y[rows], ball, generator=generator)
            except (torch.OutOfMemoryError, RuntimeError) as exc:
                if not _is_oom(exc) or batch_size == 1:
                    raise
                batch_size = max(1, batch_size // 2)
                log.warning("out of memory in %s; batch size now %d", attack.name, batch_size)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                continue
            feasible = ball.contains(candidate, x[rows])
            wrong = misclassified(target.verify_logits(candidate), y[rows])
            for row, ok in zip(rows.tolist(), (feasible & wrong).tolist(), strict=True):
                if ok:
                    broken_by[row] = attack.name.value
                    broken_here += 1
            x_adv[rows] = torch.where((feasible & wrong).view(-1, 1, 1, 1), candidate, x[rows])
            done += len(rows)
        robust_now = sum(b is None for b in broken_by)
        stats.append(
            AttackStats(
                name=attack.name.value,
                params=attack.describe(),
                points_attacked=len(todo),
                points_broken=broken_here,
                robust_accuracy_after=robust_now / len(y) if len(y) else 0.0,
                seconds=time.perf_counter() - attack_started,
                forward_images=target.forwards - forwards,
                backward_images=target.backwards - backwards,
            )
        )
    n = len(y)
    report = SuiteReport(
        suite=kind,
        params=params.model_dump(),
        seed=seed,
        n_points=n,
        clean_accuracy=sum(b != "clean" for b in broken_by) / n if n else 0.0,
        robust_accuracy=sum(b is None for b in broken_by) / n if n else 0.0,
        attacks=stats,
        broken_by=broken_by,
        batch_size=batch_size,
        bf16=bf16,
        seconds=time.perf_counter() - started,
    )
    return SuiteRun(report=report, x_adv=x_adv)
