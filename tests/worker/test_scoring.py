"""The scoring task called as a plain function: results, idempotence and failure reasons."""

from __future__ import annotations

import time
from datetime import timedelta

import numpy as np
import pytest
from sqlalchemy.orm import Session, sessionmaker

from graders.architectures import build_model
from graders.attack_scoring import predict
from graders.checkpoints import load_weights, read_state_dict
from server.config import Settings
from server.db import utcnow
from server.models import Submission, SubmissionStatus
from server.queue import sweep
from server.services.submissions import CHARGED
from tests.conftest import PHASE, SLUG, Account, Artifacts, perturbed, spec_toml, write_spec
from worker import scoring
from worker.scoring import Outcome, run_scoring


def queued(
    factory: sessionmaker[Session], settings: Settings, account: Account, batch: np.ndarray
) -> str:
    path = settings.upload_path / "batch.npy"
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, batch, allow_pickle=False)
    with factory() as session:
        row = Submission(
            user_id=account.user_id,
            assignment_slug=SLUG,
            phase_id=PHASE,
            status=SubmissionStatus.QUEUED,
            file_name="batch.npy",
            file_sha256="0" * 64,
            file_size=path.stat().st_size,
            batch_path=str(path),
        )
        session.add(row)
        session.commit()
        return row.id


def test_scores_match_an_independent_forward_pass(
    db, settings: Settings, accounts: dict[str, Account], artifacts: Artifacts
) -> None:
    batch = perturbed(artifacts.eval_set.images, seed=3)
    submission_id = queued(db, settings, accounts["alice"], batch)
    assert run_scoring(submission_id, settings=settings, session_factory=db) is Outcome.SCORED
    with db() as session:
        row = session.get(Submission, submission_id)
        assert row.status is SubmissionStatus.SCORED and row.attempts == 1
        results = row.results
    reference = build_model("resnet20").eval()
    load_weights(reference, read_state_dict(artifacts.data_dir / "net-a.safetensors"))
    expected = float((predict(reference, batch) == artifacts.eval_set.labels).mean())
    assert results["models"][0]["adversarial_accuracy"] == pytest.approx(expected)
    assert results["hashes"]["hidden_models"] == artifacts.weights


def test_second_delivery_does_nothing(
    db, settings: Settings, accounts: dict[str, Account], artifacts: Artifacts
) -> None:
    submission_id = queued(db, settings, accounts["alice"], artifacts.eval_set.images)
    assert run_scoring(submission_id, settings=settings, session_factory=db) is Outcome.SCORED
    with db() as session:
        first = session.get(Submission, submission_id).finished_at
    assert run_scoring(submission_id, settings=settings, session_factory=db) is Outcome.SKIPPED
    with db() as session:
        row = session.get(Submission, submission_id)
        assert row.attempts == 1 and row.finished_at == first


def test_weights_not_matching_the_pinned_hash_fail_with_a_reason_and_a_log(
    db, settings: Settings, accounts: dict[str, Account], artifacts: Artifacts
) -> None:
    spec = spec_toml(artifacts).replace(artifacts.weights["net-b"], "f" * 64)
    write_spec(settings.assignments_dir, spec)
    submission_id = queued(db, settings, accounts["alice"], artifacts.eval_set.images)
    assert run_scoring(submission_id, settings=settings, session_factory=db) is Outcome.FAILED
    with db() as session:
        row = session.get(Submission, submission_id)
        assert row.status is SubmissionStatus.FAILED and row.score is None
        assert "not a problem with your upload" in row.error_message
        assert "sha256 mismatch" in row.error_log


def test_unreadable_batch_fails_instead_of_staying_running(
    db, settings: Settings, accounts: dict[str, Account], artifacts: Artifacts
) -> None:
    submission_id = queued(db, settings, accounts["alice"], artifacts.eval_set.images)
    (settings.upload_path / "batch.npy").unlink()
    assert run_scoring(submission_id, settings=settings, session_factory=db) is Outcome.FAILED
    with db() as session:
        row = session.get(Submission, submission_id)
        assert row.status is SubmissionStatus.FAILED
        assert "FileNotFoundError" in row.error_message and row.finished_at is not None


def _abandon(factory, submission_id: str, *, attempts: int, expires_in_s: float) -> None:
    """Make the row look like a run whose worker died (or is alive, for a future lease)."""
    with factory() as session:
        row = session.get(Submission, submission_id)
        row.status, row.worker, row.attempts = SubmissionStatus.RUNNING, "dead@host/1", attempts
        row.lease_expires_at = utcnow() + timedelta(seconds=expires_in_s)
        session.commit()


def test_expired_lease_is_requeued_and_then_scored_once(
    db, settings: Settings, accounts: dict[str, Account], artifacts: Artifacts
) -> None:
    submission_id = queued(db, settings, accounts["alice"], artifacts.eval_set.images)
    _abandon(db, submission_id, attempts=1, expires_in_s=-1)
    assert run_scoring(submission_id, settings=settings, session_factory=db) is Outcome.SKIPPED
    with db() as session:
        report = sweep(session, settings)
    assert (report.requeued, report.failed, report.sent) == (1, 0, 1)
    assert run_scoring(submission_id, settings=settings, session_factory=db) is Outcome.SCORED
    with db() as session:
        row = session.get(Submission, submission_id)
        assert row.status is SubmissionStatus.SCORED and row.attempts == 2
        assert row.lease_expires_at is None


def test_live_lease_is_left_alone(
    db, settings: Settings, accounts: dict[str, Account], artifacts: Artifacts
) -> None:
    submission_id = queued(db, settings, accounts["alice"], artifacts.eval_set.images)
    _abandon(db, submission_id, attempts=1, expires_in_s=60)
    with db() as session:
        assert sweep(session, settings).requeued == 0
        assert session.get(Submission, submission_id).status is SubmissionStatus.RUNNING


def test_too_many_lost_attempts_fail_as_infrastructure_error_not_charged(
    db, settings: Settings, accounts: dict[str, Account], artifacts: Artifacts
) -> None:
    submission_id = queued(db, settings, accounts["alice"], artifacts.eval_set.images)
    _abandon(db, submission_id, attempts=settings.max_attempts, expires_in_s=-1)
    with db() as session:
        assert sweep(session, settings).failed == 1
        row = session.get(Submission, submission_id)
        assert row.status is SubmissionStatus.FAILED
        assert row.error_message.startswith("Infrastructure error")
        assert "not counted" in row.error_message
        assert row.status not in CHARGED


def test_lease_is_renewed_while_the_grader_runs(
    db, settings: Settings, accounts: dict[str, Account], artifacts: Artifacts, monkeypatch
) -> None:
    short = settings.model_copy(update={"lease_s": 0.4})
    submission_id = queued(db, settings, accounts["alice"], artifacts.eval_set.images)
    seen: list[object] = []
    real_grade = scoring._grade

    def slow_grade(session, settings_, sid, token, claim):
        time.sleep(1.2)  # three lease lengths: only renewal keeps the lease alive
        with db() as other:
            row = other.get(Submission, sid)
            seen.append(row.lease_expires_at > utcnow())
            seen.append(sweep(other, short).requeued)
        return real_grade(session, settings_, sid, token, claim)

    monkeypatch.setattr(scoring, "_grade", slow_grade)
    assert run_scoring(submission_id, settings=short, session_factory=db) is Outcome.SCORED
    assert seen == [True, 0]
