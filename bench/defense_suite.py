"""Defense-suite benchmark: our `full` attack suite against torchattacks' AutoAttack-standard
composition on the same PreActResNet-18, the same points and the same device, in one run.

Reports wall time, CPU time, robust accuracy and peak memory of each and checks the targets (our
robust accuracy at most the reference's + 0.5 points, in at most half its time on a CPU and a
third on a GPU). `make bench-defense` runs it; docs/benchmarks.md has the figures.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import torchattacks
from torch import Tensor, nn

from graders.architectures import Architecture, build_model
from graders.attacks.core import AttackName, Ball, TargetModel, misclassified, predict_logits
from graders.attacks.suite import SuiteKind, SuiteParams, run_suite
from graders.datasets import images_to_tensor, load_cifar10, make_synthetic
from graders.defense_models import NormalizationName, load_defense, parse_manifest
from graders.threat_model import Norm
from graders.training import train_classifier

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "defense_suite.json"
EPS = 8 / 255
N_CLASSES = 10
ACCURACY_MARGIN = 0.005
"""Our robust accuracy may exceed the reference's by at most half a point."""
TIME_RATIO_TARGET = {"cpu": 1 / 2, "cuda": 1 / 3}
"""Our wall time over the reference's, at most."""
PACKAGES = ("torch", "torchattacks", "numpy", "scipy")
FULL_SUITE_COUNTS = (
    "apgd_iterations",
    "n_targets",
    "fab_iterations",
    "square_queries",
    "square_p_init",
)
"""The ``SuiteParams`` fields the ``full`` suite (and so the reference) uses."""


# --- The reference: torchattacks' attacks composed the AutoAttack way ---------------------------


@dataclass
class ReferenceAttackStats:
    """One reference attack's share of a run, with what our own checks found in its outputs."""

    name: str
    points_attacked: int
    points_broken: int
    seconds: float
    outside_ball: int = 0
    """Outputs not exactly inside the ball and [0, 1]; projected back before they are scored."""
    max_excess: float = 0.0
    """Largest distance (in the ball's norm) by which a raw output exceeded eps."""
    not_finite: int = 0


@dataclass
class ReferenceRun:
    """torchattacks' AutoAttack-standard composition, scored by the grader's own checks."""

    n_points: int
    clean_accuracy: float
    robust_accuracy: float
    broken_by: list[str | None]
    attacks: list[ReferenceAttackStats]
    seconds: float


def reference_attacks(
    model: nn.Module, ball: Ball, params: SuiteParams, *, seed: int
) -> list[tuple[AttackName, Callable[[Tensor, Tensor], Tensor]]]:
    """torchattacks' APGD-CE, APGD-T, FAB-T and Square with ``params``' counts, every one set
    explicitly (torchattacks' own AutoAttack runs 10 APGD and FAB steps, not 100)."""
    norm = "Linf" if ball.norm is Norm.LINF else "L2"
    apgd_ce = torchattacks.APGD(
        model,
        norm=norm,
        eps=ball.eps,
        steps=params.apgd_iterations,
        n_restarts=1,
        seed=seed,
        loss="ce",
        rho=0.75,
    )
    apgd_t = torchattacks.APGDT(
        model,
        norm=norm,
        eps=ball.eps,
        steps=params.apgd_iterations,
        n_restarts=1,
        seed=seed,
        rho=0.75,
        n_classes=N_CLASSES,
    )
    fab_t = torchattacks.FAB(
        model,
        norm=norm,
        eps=ball.eps,
        steps=params.fab_iterations,
        n_restarts=1,
        seed=seed,
        multi_targeted=True,
        n_classes=N_CLASSES,
    )
    square = torchattacks.Square(
        model,
        norm=norm,
        eps=ball.eps,
        n_queries=params.square_queries,
        n_restarts=1,
        p_init=params.square_p_init,
        loss="margin",
        seed=seed,
    )
    # Both targeted attacks read their target count from this attribute (n_classes - 1 = 9 by
    # default, the top-2..top-10 classes).
    apgd_t.n_target_classes = params.n_targets
    fab_t.n_target_classes = params.n_targets
    return [
        (AttackName.APGD_CE, apgd_ce),
        (AttackName.APGD_T, apgd_t),
        (AttackName.FAB_T, fab_t),
        (AttackName.SQUARE, square),
    ]


def run_reference(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    ball: Ball,
    params: SuiteParams,
    *,
    seed: int,
    batch_size: int,
) -> ReferenceRun:
    """Robust accuracy under torchattacks' attacks, composed as AutoAttack standard does.

    Each attack runs only on the points no earlier attack broke, from their clean images. Its
    outputs are not trusted: each is checked against the ball, projected back where it is outside
    (that is counted), and a point is broken only if a fresh fp32 forward pass misclassifies it.
    """
    started = time.perf_counter()
    model.eval()
    verifier = TargetModel(model)
    clean_logits = predict_logits(verifier, x, batch_size)
    broken_by: list[str | None] = [
        "clean" if wrong else None for wrong in misclassified(clean_logits, y).tolist()
    ]
    stats = []
    for name, attack in reference_attacks(model, ball, params, seed=seed):
        attack_started = time.perf_counter()
        todo = [i for i, b in enumerate(broken_by) if b is None]
        entry = ReferenceAttackStats(name.value, len(todo), 0, 0.0)
        for first in range(0, len(todo), batch_size):
            rows = torch.tensor(todo[first : first + batch_size], device=x.device)
            raw = attack(x[rows], y[rows]).detach()
            finite = torch.isfinite(raw).flatten(1).all(dim=1)
            entry.not_finite += int((~finite).sum())
            inside = ball.contains(raw, x[rows])
            entry.outside_ball += int((~inside).sum())
            excess = ball.norms(torch.nan_to_num(raw).double() - x[rows].double()) - ball.eps
            entry.max_excess = max(entry.max_excess, float(excess.max()))
            candidate = ball.make_exact(torch.nan_to_num(raw), x[rows])
            feasible = ball.contains(candidate, x[rows])
            wrong = misclassified(verifier.verify_logits(candidate), y[rows])
            for row, ok in zip(rows.tolist(), (feasible & wrong).tolist(), strict=True):
                if ok:
                    broken_by[row] = name.value
                    entry.points_broken += 1
        entry.seconds = time.perf_counter() - attack_started
        stats.append(entry)
    n = len(y)
    return ReferenceRun(
        n_points=n,
        clean_accuracy=sum(b != "clean" for b in broken_by) / n if n else 0.0,
        robust_accuracy=sum(b is None for b in broken_by) / n if n else 0.0,
        broken_by=broken_by,
        attacks=stats,
        seconds=time.perf_counter() - started,
    )


# --- Measuring -----------------------------------------------------------------------------------


@dataclass
class Measured:
    """Wall and CPU time and peak memory of one suite run."""

    wall_s: float = 0.0
    cpu_s: float = 0.0
    peak_memory_mib: float = 0.0
    others_cpu_share: float = 0.0


def _status_kib(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field_name}:"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field_name}")


def _busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot (all processes, all cores)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle, iowait
    return (sum(values[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def memory_method(device: torch.device) -> str:
    """How :func:`measure` reads peak memory on ``device``."""
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated() above the memory allocated at the start"
    return (
        "peak resident set size above the start: Linux VmHWM, reset through /proc/self/clear_refs "
        "after malloc_trim(0) returned freed heap pages (tracemalloc does not see tensor memory)"
    )


@contextmanager
def measure(device: torch.device) -> Iterator[Measured]:
    """Time the block and record its peak memory above what was in use when it started."""
    result = Measured()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        base = _status_kib("VmRSS") * 1024
    busy, cpu, wall = _busy_seconds(), time.process_time(), time.perf_counter()
    yield result
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = _status_kib("VmHWM") * 1024
    result.wall_s = time.perf_counter() - wall
    result.cpu_s = time.process_time() - cpu
    others = max(0.0, _busy_seconds() - busy - result.cpu_s)
    result.others_cpu_share = others / (result.wall_s * (os.cpu_count() or 1))
    result.peak_memory_mib = (peak - base) / 2**20


# --- Model and points ----------------------------------------------------------------------------


def trained_model(args: argparse.Namespace, device: torch.device) -> tuple[nn.Module, str]:
    """PreActResNet-18, either loaded from ``--checkpoint`` or trained briefly on synthetic data."""
    if args.checkpoint is not None:
        manifest = parse_manifest(
            architecture=Architecture.PREACT_RESNET18.value,
            normalization=args.normalization,
            allowed=[Architecture.PREACT_RESNET18],
        )
        model = load_defense(args.checkpoint, manifest).to(device)
        return model.eval(), f"checkpoint {args.checkpoint} (normalization {args.normalization})"
    torch.manual_seed(args.seed)
    model = build_model(Architecture.PREACT_RESNET18).to(device)
    images, labels = make_synthetic(args.train_per_class, seed=args.seed)
    report = train_classifier(
        model,
        images,
        labels,
        epochs=args.epochs,
        batch_size=128,
        lr=0.1,
        seed=args.seed,
        time_budget_s=args.train_seconds,
    )
    description = (
        f"trained on synthetic data: {len(images)} images, {report.epochs_run} epochs in "
        f"{report.seconds:.0f} s, final train accuracy {report.final_train_accuracy:.3f}"
        + (" (stopped by the time budget)" if report.stopped_early else "")
    )
    return model.eval(), description


def bench_points(args: argparse.Namespace, device: torch.device) -> tuple[Tensor, Tensor, str]:
    """The first ``--points`` test images: CIFAR-10's with ``--data``, else synthetic ones."""
    if args.data is not None:
        images, labels = load_cifar10(args.data)
        source = f"CIFAR-10 test split from {args.data}"
    else:
        images, labels = make_synthetic(math.ceil(args.points / N_CLASSES), seed=args.seed + 1)
        source = "synthetic test images (graders.datasets.make_synthetic, a different seed)"
    x = images_to_tensor(images[: args.points]).to(device)
    y = torch.from_numpy(labels[: args.points]).to(device)
    return x, y, f"first {len(y)} {source}"


# --- The run -------------------------------------------------------------------------------------


def machine(device: torch.device) -> dict[str, Any]:
    """What the figures were measured on."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "load_average": list(os.getloadavg()),
        "packages": {name: metadata.version(name) for name in PACKAGES},
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    else:
        model_names = [
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ]
        info["cpu"] = model_names[0] if model_names else platform.processor()
    return info


@dataclass
class Side:
    """One suite's figures in the result file."""

    robust_accuracy: float
    clean_accuracy: float
    measured: Measured
    attacks: list[dict[str, Any]] = field(default_factory=list)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build the model and points, run both suites on them, and compare."""
    device = torch.device(args.device)
    bf16 = device.type == "cuda" if args.bf16 is None else args.bf16
    batch_size = args.batch_size or (500 if device.type == "cuda" else 100)
    ball = Ball(Norm.LINF, EPS)
    params = SuiteParams(
        apgd_iterations=args.iterations,
        n_targets=args.n_targets,
        fab_iterations=args.iterations,
        square_queries=args.square_queries,
        square_p_init=0.8,
    )
    started = time.perf_counter()
    model, model_source = trained_model(args, device)
    for p in model.parameters():
        p.requires_grad_(False)
    x, y, points_source = bench_points(args, device)
    print(f"model: PreActResNet-18, {model_source} ({time.perf_counter() - started:.0f} s)")
    print(f"points: {points_source}; device {device}, batch {batch_size}, bf16 {bf16}")
    print(f"counts: {params.model_dump(include=set(FULL_SUITE_COUNTS))}")

    order = ["ours", "reference"] if not args.reference_first else ["reference", "ours"]
    sides: dict[str, Side] = {}
    for which in order:
        print(f"running {which} ...", flush=True)
        if which == "ours":
            with measure(device) as m:
                ours = run_suite(
                    model,
                    x,
                    y,
                    ball,
                    SuiteKind.FULL,
                    params,
                    seed=args.seed,
                    batch_size=batch_size,
                    bf16=bf16,
                )
            sides["ours"] = Side(
                ours.report.robust_accuracy,
                ours.report.clean_accuracy,
                m,
                [a.model_dump() for a in ours.report.attacks],
            )
        else:
            with measure(device) as m:
                ref = run_reference(
                    model, x, y, ball, params, seed=args.seed, batch_size=batch_size
                )
            sides["reference"] = Side(
                ref.robust_accuracy, ref.clean_accuracy, m, [asdict(a) for a in ref.attacks]
            )
        side = sides[which]
        print(
            f"  robust accuracy {side.robust_accuracy:.4f} (clean {side.clean_accuracy:.4f}), "
            f"{side.measured.wall_s:.1f} s wall, {side.measured.cpu_s:.1f} s CPU, peak memory "
            f"{side.measured.peak_memory_mib:.0f} MiB, other processes "
            f"{side.measured.others_cpu_share:.0%} of the CPU"
        )
        for a in side.attacks:
            print(
                f"    {a['name']:8s} attacked {a['points_attacked']:4d}, broke "
                f"{a['points_broken']:4d}, {a['seconds']:7.1f} s"
            )

    ours_side, ref_side = sides["ours"], sides["reference"]
    pairs = list(zip(ours.report.broken_by, ref.broken_by, strict=True))
    disagreements = {
        "robust_only_under_ours": [i for i, (o, r) in enumerate(pairs) if o is None and r],
        "robust_only_under_reference": [i for i, (o, r) in enumerate(pairs) if r is None and o],
    }
    ratio = ours_side.measured.wall_s / ref_side.measured.wall_s
    cpu_ratio = ours_side.measured.cpu_s / ref_side.measured.cpu_s
    limit = TIME_RATIO_TARGET["cuda" if device.type == "cuda" else "cpu"]
    gap = ours_side.robust_accuracy - ref_side.robust_accuracy
    targets = {
        "robust_accuracy": {
            "target": f"ours <= reference + {ACCURACY_MARGIN}",
            "ours": ours_side.robust_accuracy,
            "reference": ref_side.robust_accuracy,
            "met": gap <= ACCURACY_MARGIN + 1e-12,
        },
        "time_ratio": {
            "target": f"ours / reference wall time <= {limit:.3f} on {device.type}",
            "value": ratio,
            "cpu_time_ratio": cpu_ratio,
            "met": ratio <= limit,
        },
    }
    print(
        f"points robust under one suite only: {len(disagreements['robust_only_under_ours'])} "
        f"under ours, {len(disagreements['robust_only_under_reference'])} under the reference"
    )
    print(
        f"time ratio ours / reference: {ratio:.3f} wall, {cpu_ratio:.3f} CPU "
        f"(target <= {limit:.3f}): {'met' if targets['time_ratio']['met'] else 'NOT met'}"
    )
    print(
        f"robust accuracy ours {ours_side.robust_accuracy:.4f} vs reference "
        f"{ref_side.robust_accuracy:.4f} (target: at most +{ACCURACY_MARGIN}): "
        f"{'met' if targets['robust_accuracy']['met'] else 'NOT met'}"
    )
    return {
        "benchmark": "defense_suite",
        "recorded_at": datetime.now(UTC).isoformat(),
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "setup": {
            "model": f"PreActResNet-18, {model_source}",
            "points": points_source,
            "threat_model": "L-inf 8/255",
            "params": params.model_dump(include=set(FULL_SUITE_COUNTS)),
            "batch_size": batch_size,
            "bf16": bf16,
            "seed": args.seed,
            "order": order,
            "memory_method": memory_method(device),
        },
        "machine": machine(device),
        "targets": targets,
        "disagreements": disagreements,
        "ours": asdict(ours_side),
        "reference": asdict(ref_side),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=200, help="points to attack (default 200)")
    parser.add_argument(
        "--iterations",
        type=int,
        default=100,
        help="APGD-CE, APGD-T (per target) and FAB-T (per target) iterations, "
        "the same for both suites (default 100, AutoAttack standard)",
    )
    parser.add_argument(
        "--n-targets", type=int, default=9, help="target classes of APGD-T and FAB-T (default 9)"
    )
    parser.add_argument(
        "--square-queries", type=int, default=5000, help="Square queries (default 5000)"
    )
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="device for the model and both suites (default: cuda if available)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        help="attack batch size of both suites (default 500 on CUDA, 100 on CPU)",
    )
    parser.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bf16 autocast for our attack steps (default: on for CUDA only; "
        "breaks are re-verified in fp32)",
    )
    parser.add_argument(
        "--checkpoint",
        type=Path,
        help="PreActResNet-18 state_dict (.safetensors/.pt) instead of training",
    )
    parser.add_argument(
        "--normalization",
        choices=[n.value for n in NormalizationName],
        help="input normalization the checkpoint expects (needed with it)",
    )
    parser.add_argument(
        "--data", type=Path, help="CIFAR-10 folder (cifar-10-batches-py); default: synthetic points"
    )
    parser.add_argument(
        "--train-per-class",
        type=int,
        default=100,
        help="synthetic training images per class (default 100)",
    )
    parser.add_argument("--epochs", type=int, default=5, help="training epochs (default 5)")
    parser.add_argument(
        "--train-seconds",
        type=float,
        help="training time budget in seconds (default none: a budget makes the model depend "
        "on the machine's speed; 5 epochs of 1000 images took about 200 s on 2 cores)",
    )
    parser.add_argument(
        "--reference-first",
        action="store_true",
        help="run the reference before our suite (default: ours first)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of training, points, attacks")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON results file")
    args = parser.parse_args(argv)
    if args.checkpoint is not None and args.normalization is None:
        parser.error("--checkpoint needs --normalization none|cifar10")
    if args.points < 1 or args.iterations < 1 or args.square_queries < 1:
        parser.error("--points, --iterations and --square-queries must be at least 1")
    report = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
