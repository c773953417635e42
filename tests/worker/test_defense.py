"""Defense evaluation and the transfer matrix, with the tasks called as plain functions on
submissions made through the API."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from graders.architectures import Architecture, build_model
from graders.checkpoints import write_safetensors
from server.config import Settings
from server.main import create_app
from server.models import Submission, SubmissionStatus, TransferResult
from tests.conftest import (
    DEFENSE_PHASE,
    PHASE,
    SLUG,
    Account,
    Artifacts,
    perturbed,
    spec_toml,
    write_spec,
)
from tests.server.test_api import npy_bytes
from worker import scoring
from worker.scoring import Outcome, run_scoring, run_transfer


@pytest.fixture
def client(settings: Settings, db: Any, artifacts: Artifacts) -> Iterator[TestClient]:
    write_spec(settings.assignments_dir, spec_toml(artifacts, defense=""))
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def submit_defense(client: TestClient, account: Account, tmp_path: Path, seed: int = 0) -> str:
    torch.manual_seed(seed)
    path = tmp_path / f"model-{seed}.safetensors"
    write_safetensors(build_model(Architecture.RESNET20), path)
    response = client.post(
        f"/api/v1/assignments/{SLUG}/phases/{DEFENSE_PHASE}/submissions",
        headers=account.headers,
        files={"file": (path.name, path.read_bytes())},
        data={"architecture": "resnet20", "normalization": "cifar10"},
    )
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def submit_attack(client: TestClient, account: Account, batch: np.ndarray) -> str:
    response = client.post(
        f"/api/v1/assignments/{SLUG}/phases/{PHASE}/submissions",
        headers=account.headers,
        files={"file": ("adv.npy", npy_bytes(batch))},
    )
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def row(factory: sessionmaker[Session], submission_id: str) -> Submission:
    with factory() as session:
        found = session.get(Submission, submission_id)
        assert found is not None
        session.expunge(found)
        return found


def test_defense_is_scored_by_both_suites_with_checks_and_transfer(
    client: TestClient,
    db: sessionmaker[Session],
    settings: Settings,
    accounts: dict[str, Account],
    artifacts: Artifacts,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    attack_id = submit_attack(client, accounts["bob"], perturbed(artifacts.eval_set.images))
    assert run_scoring(attack_id, settings=settings, session_factory=db) is Outcome.SCORED
    defense_id = submit_defense(client, accounts["alice"], tmp_path)

    stages: list[dict[str, Any]] = []
    original = scoring._set_progress

    def record(session: Session, sid: str, token: str, progress: dict[str, Any]) -> None:
        stages.append(progress)
        original(session, sid, token, progress)

    monkeypatch.setattr(scoring, "_set_progress", record)
    assert run_scoring(defense_id, settings=settings, session_factory=db) is Outcome.SCORED

    scored = row(db, defense_id)
    results = scored.results
    assert scored.status is SubmissionStatus.SCORED
    assert scored.evaluator_version == "defense-1.0.0"
    assert set(results["suites"]) == {"quick", "full"}
    assert scored.score == results["suites"]["quick"]["robust_accuracy"]
    assert results["final_robust_accuracy"] <= min(
        s["robust_accuracy"] for s in results["suites"].values()
    )
    assert results["robust_accuracy"] <= results["clean_accuracy"]
    full_attacks = [a["name"] for a in results["suites"]["full"]["attacks"]]
    assert full_attacks == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert results["architecture"]["architecture"] == "resnet20"
    assert len(results["hashes"]["checkpoint"]) == 64
    assert any(stage.get("stage") == "attack" for stage in stages)

    (cell,) = results["transfer"]
    assert cell["attack_submission_id"] == attack_id and cell["same_points"] is True
    with db() as session:
        stored = session.scalars(select(TransferResult)).all()
        assert [(t.defense_submission_id, t.attack_submission_id) for t in stored] == [
            (defense_id, attack_id)
        ]
        assert stored[0].accuracy == pytest.approx(cell["accuracy"])


def test_a_newly_scored_batch_joins_the_matrix_once(
    client: TestClient,
    db: sessionmaker[Session],
    settings: Settings,
    accounts: dict[str, Account],
    artifacts: Artifacts,
    tmp_path: Path,
) -> None:
    defense_id = submit_defense(client, accounts["alice"], tmp_path)
    assert run_scoring(defense_id, settings=settings, session_factory=db) is Outcome.SCORED
    assert row(db, defense_id).results["transfer"] == []

    attack_id = submit_attack(client, accounts["bob"], perturbed(artifacts.eval_set.images))
    assert run_scoring(attack_id, settings=settings, session_factory=db) is Outcome.SCORED
    assert run_transfer(attack_id, settings=settings, session_factory=db) == 1
    assert run_transfer(attack_id, settings=settings, session_factory=db) == 0
    with db() as session:
        assert session.scalar(select(func.count()).select_from(TransferResult)) == 1


def test_a_stored_checkpoint_that_changed_fails_with_a_reason(
    client: TestClient,
    db: sessionmaker[Session],
    settings: Settings,
    accounts: dict[str, Account],
    tmp_path: Path,
) -> None:
    defense_id = submit_defense(client, accounts["alice"], tmp_path)
    Path(row(db, defense_id).batch_path).write_bytes(b"garbage")
    assert run_scoring(defense_id, settings=settings, session_factory=db) is Outcome.FAILED
    failed = row(db, defense_id)
    assert failed.status is SubmissionStatus.FAILED
    assert "could not be loaded again" in (failed.error_message or "")
    assert "Traceback" in (failed.error_log or "")
