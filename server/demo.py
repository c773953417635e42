"""The demo course: an evaluation set, three trained hidden models, a baseline defense checkpoint
for students to upload, a spec with an attack and a defense phase, and four accounts.

CIFAR-10 is used when found on disk; otherwise a procedural 10-class data set is generated and
labelled synthetic everywhere it is shown. A second run reuses what the first one built.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch

from graders.architectures import Architecture, build_model
from graders.checkpoints import sha256_file, write_safetensors
from graders.datasets import (
    CIFAR10_CLASSES,
    SYNTHETIC_CLASSES,
    EvalSet,
    find_cifar10,
    load_cifar10,
    make_synthetic,
    save_eval_set,
    select_balanced,
)
from graders.errors import ArtifactError
from graders.training import accuracy, train_classifier
from server.artifacts import artifact_path
from server.assignments import SpecError, load_assignment
from server.config import Settings
from server.db import session_factory_for
from server.migrations import upgrade
from server.models import Role, User
from server.security import (
    create_user,
    issue_token,
    set_password,
    user_for_token,
    verify_password,
)

DEMO_SLUG = "demo"
ATTACK_PHASE = "attack"
DEFENSE_PHASE = "defense"
BASELINE_SEED = 4
BASELINE_FILE = "demo-baseline-defense.safetensors"
BASELINE_MANIFEST = "demo-baseline-defense.json"
TA_USERNAME = "ta"
STUDENT_USERNAMES = ("alice", "bob", "carol")
HIDDEN_MODELS = (  # name, training seed, preprocessing in TOML
    ("resnet20-a", 1, None),
    ("resnet20-b", 2, None),
    ("resnet20-jpeg", 3, '{ kind = "jpeg", quality = 75 }'),
)


@dataclass(frozen=True)
class DemoOptions:
    """How much the demo trains; tests shrink these, `make demo` uses the defaults."""

    train_per_class: int = 200
    epochs: int = 6
    eval_images: int = 500
    seconds_per_model: float = 25.0
    defense_iterations: int = 100
    """APGD and FAB iterations of the defense phase's suites (AutoAttack standard: 100)."""


def _log(message: str) -> None:
    print(f"demo: {message}", flush=True)


def _training_and_eval_data(
    settings: Settings, options: DemoOptions
) -> tuple[np.ndarray, np.ndarray, EvalSet]:
    cifar = find_cifar10(
        [p for p in (settings.cifar10_dir, settings.data_path, settings.home, Path("data")) if p]
    )
    if cifar is not None:
        _log(f"using CIFAR-10 from {cifar}")
        train_x, train_y = load_cifar10(cifar, "train")
        test_x, test_y = load_cifar10(cifar, "test")
        eval_set = select_balanced(
            test_x,
            test_y,
            n=options.eval_images,
            seed=0,
            class_names=CIFAR10_CLASSES,
            source=f"CIFAR-10 test split, seed 0, {options.eval_images // 10} per class",
        )
        rng = np.random.default_rng(0)
        keep = rng.permutation(len(train_x))[: options.train_per_class * 10]
        return train_x[keep], train_y[keep], eval_set
    _log("CIFAR-10 not found: generating a SYNTHETIC 10-class data set (not CIFAR-10)")
    train_x, train_y = make_synthetic(options.train_per_class, seed=1)
    pool_x, pool_y = make_synthetic(options.eval_images // 10, seed=2)
    eval_set = select_balanced(
        pool_x,
        pool_y,
        n=options.eval_images,
        seed=0,
        class_names=SYNTHETIC_CLASSES,
        synthetic=True,
        source="synthetic procedural shapes (not CIFAR-10), seed 2",
    )
    return train_x, train_y, eval_set


def _spec_text(
    eval_sha: str,
    models: list[tuple[str, str, str | None]],
    synthetic: bool,
    defense_iterations: int,
) -> str:
    now = datetime.now(UTC).replace(microsecond=0, second=0)
    opens, due = now - timedelta(days=1), now + timedelta(days=90)
    data = "synthetic images (not CIFAR-10)" if synthetic else "CIFAR-10 test images"
    lines = [
        "# Written by `autograder demo`; rebuilt when its artifacts change.",
        f'title = "Demo course: adversarial examples on {data}"',
        'timezone = "UTC"',
        f'description = "A demo assignment built offline. Images: {data}."',
        "",
        "[[phases]]",
        f'id = "{ATTACK_PHASE}"',
        'title = "Phase 1: untargeted gray-box attack"',
        'track = "attack"',
        'description = "Perturb every clean image within L-inf 8 (0-255 scale) so that the '
        'hidden models misclassify it. Score: their mean accuracy, lower is better."',
        f"opens_at = {opens.strftime('%Y-%m-%dT%H:%M:%SZ')}",
        f"due_at = {due.strftime('%Y-%m-%dT%H:%M:%SZ')}",
        'threat_model = { norm = "linf", eps = 8 }',
        f'evaluation_set = {{ file = "demo/eval-set.npz", sha256 = "{eval_sha}" }}',
        "limits = { max_per_day = 50, max_total = 500, max_upload_mb = 16 }",
    ]
    for name, sha, preprocessing in models:
        lines += [
            "",
            "[[phases.hidden_models]]",
            f'name = "{name}"',
            'architecture = "resnet20"',
            f'weights = {{ file = "demo/{name}.safetensors", sha256 = "{sha}" }}',
        ]
        if preprocessing:
            lines.append(f"preprocessing = {preprocessing}")
    lines += [
        "",
        "[[phases]]",
        f'id = "{DEFENSE_PHASE}"',
        'title = "Phase 2: a robust classifier"',
        'track = "defense"',
        'description = "Upload a ResNet-20 checkpoint (safetensors or a PyTorch state_dict). '
        "Score: robust accuracy under L-inf 8 (0-255 scale), measured on hidden points by the "
        'quick suite for the leaderboard and by the full suite for the final grade."',
        f"opens_at = {opens.strftime('%Y-%m-%dT%H:%M:%SZ')}",
        f"due_at = {due.strftime('%Y-%m-%dT%H:%M:%SZ')}",
        'threat_model = { norm = "linf", eps = 8 }',
        f'evaluation_set = {{ file = "demo/eval-set.npz", sha256 = "{eval_sha}" }}',
        "limits = { max_per_day = 20, max_total = 100 }",
        "",
        "[phases.defense]",
        'allowed_architectures = ["resnet20", "resnet56"]',
        "max_checkpoint_mb = 50",
        'leaderboard_suite = "quick"',
        'final_suite = "full"',
        "min_clean_accuracy = 0.5",
        "eps_sweep = [2, 4, 16, 64]",
        "sweep_points = 100",
        "sweep_iterations = 10",
        f'transfer_from = ["{ATTACK_PHASE}"]',
        "# Sized for a laptop CPU (3 targets instead of 9, Square 1000 queries instead of 5000);",
        "# a course on a GPU keeps AutoAttack's defaults by leaving `params` out.",
        f"params = {{ apgd_iterations = {defense_iterations}, "
        f"fab_iterations = {defense_iterations}, n_targets = 3, square_queries = 1000 }}",
    ]
    return "\n".join(lines) + "\n"


def _spec_path(settings: Settings) -> Path:
    return settings.assignments_dir / DEMO_SLUG / "assignment.toml"


def demo_is_built(settings: Settings) -> bool:
    """True when the demo spec exists and every artifact it pins is present and unchanged."""
    try:
        spec = load_assignment(_spec_path(settings).parent)
    except SpecError:
        return False
    refs = [p.evaluation_set for p in spec.phases]
    refs += [m.weights for p in spec.phases for m in p.hidden_models]
    if not (settings.home / BASELINE_FILE).is_file():
        return False
    try:
        for ref in refs:
            path = artifact_path(settings.data_path, ref)
            if not path.is_file() or sha256_file(path) != ref.sha256:
                return False
    except ArtifactError:
        return False
    return True


def _train_resnet20(
    name: str,
    seed: int,
    train_x: np.ndarray,
    train_y: np.ndarray,
    eval_set: EvalSet,
    options: DemoOptions,
    path: Path,
) -> None:
    torch.manual_seed(seed)
    model = build_model(Architecture.RESNET20)
    report = train_classifier(
        model,
        train_x,
        train_y,
        epochs=options.epochs,
        seed=seed,
        time_budget_s=options.seconds_per_model,
    )
    held_out = accuracy(model, eval_set.images, eval_set.labels)
    _log(
        f"trained {name}: {report.epochs_run} epochs in {report.seconds:.1f} s, "
        f"clean accuracy on the evaluation set {held_out:.1%}"
    )
    write_safetensors(model, path)


def build_artifacts(settings: Settings, options: DemoOptions) -> None:
    """Make the evaluation set, train and save the hidden models, and write the spec."""
    started = time.perf_counter()
    out = settings.data_path / "demo"
    out.mkdir(parents=True, exist_ok=True)
    train_x, train_y, eval_set = _training_and_eval_data(settings, options)
    save_eval_set(eval_set, out / "eval-set.npz")
    models = []
    for name, seed, preprocessing in HIDDEN_MODELS:
        path = out / f"{name}.safetensors"
        _train_resnet20(name, seed, train_x, train_y, eval_set, options, path)
        models.append((name, sha256_file(path), preprocessing))
    # The baseline defense is public: a student's starting point, not a hidden artifact.
    _train_resnet20(
        "the baseline defense",
        BASELINE_SEED,
        train_x,
        train_y,
        eval_set,
        options,
        settings.home / BASELINE_FILE,
    )
    manifest = {"architecture": Architecture.RESNET20.value, "normalization": "cifar10"}
    (settings.home / BASELINE_MANIFEST).write_text(json.dumps(manifest) + "\n", encoding="utf-8")
    spec_path = _spec_path(settings)
    spec_path.parent.mkdir(parents=True, exist_ok=True)
    spec_path.write_text(
        _spec_text(
            sha256_file(out / "eval-set.npz"),
            models,
            eval_set.synthetic,
            options.defense_iterations,
        ),
        encoding="utf-8",
    )
    load_assignment(spec_path.parent)  # the spec we wrote must validate
    _log(f"artifacts built in {time.perf_counter() - started:.0f} s")


def _account(
    session: Any,
    settings: Settings,
    username: str,
    role: Role,
    previous: dict[str, Any],
) -> dict[str, str]:
    """The account's username, API token and password; a token or password from an earlier
    build is kept while it still works."""
    user = session.query(User).filter_by(username=username).one_or_none()
    if user is None:
        user = create_user(session, username=username, role=role)
    token = previous.get("token")
    found = user_for_token(session, token=token, secret_key=settings.secret_key) if token else None
    if found is None or found.id != user.id:
        token = issue_token(session, user=user, secret_key=settings.secret_key, name="demo")
    password = previous.get("password")
    if not password or not verify_password(user, password):
        password = f"demo-{secrets.token_urlsafe(9)}"
        set_password(user, password)
    return {"username": username, "token": str(token), "password": password}


def ensure_accounts(settings: Settings, credentials_path: Path) -> dict[str, Any]:
    """One TA and three students with API tokens and passwords; existing ones are kept."""
    previous: dict[str, Any] = {}
    if credentials_path.is_file():
        previous = json.loads(credentials_path.read_text(encoding="utf-8"))
    earlier = {previous.get("ta", {}).get("username"): previous.get("ta", {})}
    for student in previous.get("students", []):
        earlier[student.get("username")] = student
    upgrade(settings.db_url)
    with session_factory_for(settings.db_url)() as session:
        ta = _account(session, settings, TA_USERNAME, Role.TA, earlier.get(TA_USERNAME, {}))
        students = [
            _account(session, settings, name, Role.STUDENT, earlier.get(name, {}))
            for name in STUDENT_USERNAMES
        ]
        session.commit()
    credentials = {
        "base_url": settings.public_url,
        "login_url": f"{settings.public_url}/login",
        "ta": ta,
        "students": students,
        "assignment": DEMO_SLUG,
        "attack_phase": ATTACK_PHASE,
        "defense_phase": DEFENSE_PHASE,
        "baseline_defense": {
            "checkpoint": str(settings.home / BASELINE_FILE),
            "manifest": str(settings.home / BASELINE_MANIFEST),
        },
    }
    credentials_path.parent.mkdir(parents=True, exist_ok=True)
    credentials_path.write_text(json.dumps(credentials, indent=2) + "\n", encoding="utf-8")
    credentials_path.chmod(0o600)
    return credentials


def build_demo(
    settings: Settings, options: DemoOptions, *, rebuild: bool = False
) -> dict[str, Any]:
    """Build (or reuse) the demo course; returns the credentials written to the home folder."""
    if rebuild or not demo_is_built(settings):
        build_artifacts(settings, options)
    else:
        _log(f"reusing the demo course in {settings.home}")
    return ensure_accounts(settings, settings.home / "demo-credentials.json")
