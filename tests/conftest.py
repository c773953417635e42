"""Shared fixtures: a tiny course (data dir, spec, users) on its own SQLite file per test."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from graders.architectures import Architecture, build_model
from graders.checkpoints import sha256_file, write_safetensors
from graders.datasets import SYNTHETIC_CLASSES, EvalSet, make_synthetic, save_eval_set
from server.config import Settings
from server.db import session_factory_for
from server.main import create_app
from server.migrations import upgrade
from server.models import Role, User
from server.security import create_user, issue_token

SLUG = "course"
PHASE = "attack"
DEFENSE_PHASE = "defense"


@dataclass(frozen=True)
class Artifacts:
    """Hidden files of the tiny course: an evaluation set and two ResNet-20 weight files."""

    data_dir: Path
    eval_set: EvalSet
    eval_sha: str
    weights: dict[str, str]  # name -> sha256


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Artifacts:
    data_dir = tmp_path_factory.mktemp("data")
    images, labels = make_synthetic(2, seed=5)
    eval_set = EvalSet(images, labels, SYNTHETIC_CLASSES, True, "synthetic, tests")
    save_eval_set(eval_set, data_dir / "eval.npz")
    weights = {}
    for seed, name in enumerate(("net-a", "net-b")):
        torch.manual_seed(seed)
        path = data_dir / f"{name}.safetensors"
        write_safetensors(build_model(Architecture.RESNET20), path)
        weights[name] = sha256_file(path)
    return Artifacts(data_dir, eval_set, sha256_file(data_dir / "eval.npz"), weights)


def spec_toml(
    artifacts: Artifacts,
    *,
    opens_at: datetime | None = None,
    due_at: datetime | None = None,
    max_per_day: int = 5,
    max_total: int = 20,
    timezone: str = "America/New_York",
    jpeg_on: str | None = "net-b",
    defense: str | None = None,
) -> str:
    """A valid spec for the tiny course; keyword arguments change one rule at a time.

    ``defense`` adds a defense phase with those extra lines in its ``[phases.defense]`` table
    (``""`` for none): tiny attack budgets, transfer from the attack phase.
    """
    now = datetime.now(UTC)
    opens_at = opens_at or now - timedelta(days=1)
    due_at = due_at or now + timedelta(days=1)
    lines = [
        'title = "Test course"',
        f'timezone = "{timezone}"',
        "[[phases]]",
        f'id = "{PHASE}"',
        'title = "Attack"',
        'track = "attack"',
        f"opens_at = {opens_at.isoformat()}",
        f"due_at = {due_at.isoformat()}",
        'threat_model = { norm = "linf", eps = 8 }',
        f'evaluation_set = {{ file = "eval.npz", sha256 = "{artifacts.eval_sha}" }}',
        f"limits = {{ max_per_day = {max_per_day}, max_total = {max_total}, max_upload_mb = 1 }}",
    ]
    for name, sha in artifacts.weights.items():
        lines += [
            "[[phases.hidden_models]]",
            f'name = "{name}"',
            'architecture = "resnet20"',
            f'weights = {{ file = "{name}.safetensors", sha256 = "{sha}" }}',
        ]
        if name == jpeg_on:
            lines.append('preprocessing = { kind = "jpeg", quality = 75 }')
    if defense is not None:
        lines += [
            "[[phases]]",
            f'id = "{DEFENSE_PHASE}"',
            'title = "Defense"',
            'track = "defense"',
            f"opens_at = {opens_at.isoformat()}",
            f"due_at = {due_at.isoformat()}",
            'threat_model = { norm = "linf", eps = 8 }',
            f'evaluation_set = {{ file = "eval.npz", sha256 = "{artifacts.eval_sha}" }}',
            f"limits = {{ max_per_day = {max_per_day}, max_total = {max_total} }}",
            "[phases.defense]",
            'allowed_architectures = ["resnet20"]',
            "max_checkpoint_mb = 4",
            'leaderboard_suite = "quick"',
            'final_suite = "full"',
            f'transfer_from = ["{PHASE}"]',
            "params = { apgd_iterations = 3, pgd_steps = 2, pgd_restarts = 1, n_targets = 2, "
            "fab_iterations = 3, square_queries = 10 }",
            defense,
        ]
    return "\n".join(lines) + "\n"


def write_spec(assignments_dir: Path, text: str, slug: str = SLUG) -> Path:
    folder = assignments_dir / slug
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "assignment.toml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def settings(tmp_path: Path, artifacts: Artifacts) -> Settings:
    home = tmp_path / "home"
    assignments = tmp_path / "assignments"
    write_spec(assignments, spec_toml(artifacts))
    return Settings(
        home=home,
        data_dir=artifacts.data_dir,
        assignments_dir=assignments,
        database_url=f"sqlite:///{tmp_path / 'test.db'}",
        celery_broker_url=f"sqla+sqlite:///{tmp_path / 'broker.db'}",
    )


@pytest.fixture
def db(settings: Settings) -> Iterator[sessionmaker[Session]]:
    upgrade(settings.db_url)
    yield session_factory_for(settings.db_url)


@dataclass(frozen=True)
class Account:
    user_id: int
    username: str
    token: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def make_account(
    factory: sessionmaker[Session], settings: Settings, username: str, role: Role = Role.STUDENT
) -> Account:
    with factory() as session:
        user: User = create_user(session, username=username, role=role)
        token = issue_token(session, user=user, secret_key=settings.secret_key)
        session.commit()
        return Account(user.id, username, token)


@pytest.fixture
def accounts(db: sessionmaker[Session], settings: Settings) -> dict[str, Account]:
    return {
        "alice": make_account(db, settings, "alice"),
        "bob": make_account(db, settings, "bob"),
        "ta": make_account(db, settings, "ta", Role.TA),
    }


@pytest.fixture
def client(settings: Settings, db: sessionmaker[Session]) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def perturbed(images: np.ndarray, delta: int = 8, seed: int = 0) -> np.ndarray:
    """``images`` moved by +-``delta`` on every channel, clipped to [0, 255]."""
    rng = np.random.default_rng(seed)
    signs = rng.choice(np.array([-delta, delta]), size=images.shape)
    return np.clip(images.astype(np.int32) + signs, 0, 255).astype(np.uint8)
