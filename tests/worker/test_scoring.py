"""The scoring task called as a plain function: results, idempotence and failure reasons."""

from __future__ import annotations

import time
from datetime import timedelta

import numpy as np
import pytest
from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded
from celery.signals import task_failure
from sqlalchemy.orm import Session, sessionmaker

from graders.architectures import build_model
from graders.attack_scoring import predict
from graders.checkpoints import load_weights, read_state_dict
from graders.errors import ArtifactError, GraderError
from server.assignments import load_assignment
from server.config import Settings
from server.db import utcnow
from server.models import FailureCause, Submission, SubmissionStatus, User
from server.queue import sweep
from server.services.submissions import CHARGED, quota
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
        assert row.failure_cause is FailureCause.ARTIFACT


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
        assert row.failure_cause is FailureCause.INTERNAL


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
        assert row.failure_cause is FailureCause.INFRASTRUCTURE
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


def _used(factory: sessionmaker[Session], settings: Settings, account: Account) -> int:
    """The student's submissions charged to the phase's quota today."""
    assignment = load_assignment(settings.assignments_dir / SLUG)
    with factory() as session:
        user = session.get(User, account.user_id)
        used = quota(session=session, user=user, assignment=assignment, phase=assignment.phases[0])
        return used.used_today


@pytest.mark.parametrize(
    ("limits", "named"),
    [("", "limit of 5 min"), ("soft_time_limit_s = 90, time_limit_s = 100", "limit of 90 s")],
)
def test_soft_time_limit_fails_the_submission_without_charging_it(
    db,
    settings: Settings,
    accounts: dict[str, Account],
    artifacts: Artifacts,
    monkeypatch,
    limits: str,
    named: str,
) -> None:
    if limits:
        spec = spec_toml(artifacts).replace(
            "max_upload_mb = 1 }", f"max_upload_mb = 1, {limits} }}"
        )
        write_spec(settings.assignments_dir, spec)
    submission_id = queued(db, settings, accounts["alice"], artifacts.eval_set.images)
    assert _used(db, settings, accounts["alice"]) == 1  # queued: charged
    real_load = scoring.load_verified_eval_set

    def interrupted_load(*args, **kwargs):
        real_load(*args, **kwargs)
        raise SoftTimeLimitExceeded()  # what the pool's SIGUSR1 handler raises mid-grading

    monkeypatch.setattr(scoring, "load_verified_eval_set", interrupted_load)
    assert run_scoring(submission_id, settings=settings, session_factory=db) is Outcome.FAILED
    with db() as session:
        row = session.get(Submission, submission_id)
        assert row.status is SubmissionStatus.FAILED and row.status not in CHARGED
        assert row.failure_cause is FailureCause.TIME_LIMIT
        assert row.error_message.startswith("Time limit exceeded")
        assert named in row.error_message and "not counted" in row.error_message
        assert "SoftTimeLimitExceeded" in row.error_log
        assert row.finished_at is not None and row.lease_expires_at is None
    assert _used(db, settings, accounts["alice"]) == 0


def test_time_limit_wrapped_by_grading_code_is_still_a_time_limit(
    db, settings: Settings, accounts: dict[str, Account], artifacts: Artifacts, monkeypatch
) -> None:
    submission_id = queued(db, settings, accounts["alice"], artifacts.eval_set.images)

    def wrapped(*_):
        try:
            raise SoftTimeLimitExceeded()
        except Exception as exc:  # like checkpoints.read_state_dict around torch.load
            raise ArtifactError("net-a.safetensors: could not read weights") from exc

    monkeypatch.setattr(scoring, "_grade", wrapped)
    assert run_scoring(submission_id, settings=settings, session_factory=db) is Outcome.FAILED
    with db() as session:
        assert session.get(Submission, submission_id).failure_cause is FailureCause.TIME_LIMIT


def test_grader_error_is_told_to_the_student_with_its_cause(
    db, settings: Settings, accounts: dict[str, Account], artifacts: Artifacts, monkeypatch
) -> None:
    submission_id = queued(db, settings, accounts["alice"], artifacts.eval_set.images)

    def refuse(*_):
        raise GraderError("the stored checkpoint could not be loaded again")

    monkeypatch.setattr(scoring, "_grade", refuse)
    assert run_scoring(submission_id, settings=settings, session_factory=db) is Outcome.FAILED
    with db() as session:
        row = session.get(Submission, submission_id)
        assert row.failure_cause is FailureCause.GRADER
        assert row.error_message.endswith("the stored checkpoint could not be loaded again")


def test_hard_time_limit_signal_fails_the_run_of_that_task_only(
    db, settings: Settings, accounts: dict[str, Account], artifacts: Artifacts, monkeypatch
) -> None:
    from worker import tasks

    monkeypatch.setattr(tasks, "get_settings", lambda: settings)
    submission_id = queued(db, settings, accounts["alice"], artifacts.eval_set.images)
    _abandon(db, submission_id, attempts=1, expires_in_s=60)
    with db() as session:
        session.get(Submission, submission_id).task_id = "task-2"
        session.commit()

    def killed(task_id: str) -> None:
        """What the worker's main process sends when the pool kills a process at 360 s."""
        task_failure.send(
            sender=tasks.score_submission,
            task_id=task_id,
            exception=TimeLimitExceeded(360.0),
            args=[submission_id],
            kwargs={},
            traceback=None,
            einfo=None,
        )

    killed("task-1")  # an earlier delivery: the row is no longer its run
    with db() as session:
        assert session.get(Submission, submission_id).status is SubmissionStatus.RUNNING
    killed("task-2")
    with db() as session:
        row = session.get(Submission, submission_id)
        assert row.status is SubmissionStatus.FAILED
        assert row.failure_cause is FailureCause.TIME_LIMIT
        assert "limit of 6 min" in row.error_message and "360 s" in row.error_log
        assert row.worker is None and row.lease_expires_at is None
        assert sweep(session, settings).requeued == 0  # nothing left for the sweep to retry
    assert _used(db, settings, accounts["alice"]) == 0
