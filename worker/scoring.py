"""Scoring one submission: claim the row, run the grader, persist the report (safe to run twice)."""

from __future__ import annotations

import logging
import threading
import traceback
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from graders.attack_scoring import score_attack_batch
from graders.errors import ArtifactError, GraderError
from graders.version import EVALUATOR_VERSION
from server.artifacts import load_verified_eval_set
from server.assignments import AssignmentSpec, PhaseSpec, Track, load_assignment
from server.config import Settings
from server.db import utcnow
from server.models import Submission, SubmissionStatus
from worker.defense import defense_phases_fed_by, grade_defense, transfer_new_batch
from worker.models import clean_predictions, hidden_model

log = logging.getLogger(__name__)


class Outcome(StrEnum):
    SCORED = "scored"
    FAILED = "failed"
    SKIPPED = "skipped"


@dataclass(frozen=True)
class _Claim:
    assignment_slug: str
    phase_id: str
    batch_path: str


def _claim(session: Session, submission_id: str, token: str, lease: timedelta) -> _Claim | None:
    """Move the row from queued to running under a lease held by ``token``.

    ``None`` when another delivery already claimed it: only one run ever scores a submission.
    """
    now = utcnow()
    result = session.execute(
        update(Submission)
        .where(Submission.id == submission_id, Submission.status == SubmissionStatus.QUEUED)
        .values(
            status=SubmissionStatus.RUNNING,
            started_at=now,
            attempts=Submission.attempts + 1,
            worker=token,
            lease_expires_at=now + lease,
            progress={"stage": "loading"},
        )
        .execution_options(synchronize_session=False)
    )
    session.commit()
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return None
    row = session.get(Submission, submission_id)
    if row is None:
        return None
    return _Claim(row.assignment_slug, row.phase_id, row.batch_path)


def _mine(submission_id: str, token: str) -> Any:
    return (
        (Submission.id == submission_id)
        & (Submission.status == SubmissionStatus.RUNNING)
        & (Submission.worker == token)
    )


def _finish(session: Session, submission_id: str, token: str, **values: Any) -> bool:
    """Record the outcome only if this run still holds the row (not cancelled, not taken over)."""
    result = session.execute(
        update(Submission)
        .where(_mine(submission_id, token))
        .values(finished_at=utcnow(), progress=None, lease_expires_at=None, **values)
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def _set_progress(
    session: Session, submission_id: str, token: str, progress: dict[str, Any]
) -> None:
    session.execute(
        update(Submission)
        .where(_mine(submission_id, token))
        .values(progress=progress)
        .execution_options(synchronize_session=False)
    )
    session.commit()


@contextmanager
def _lease_renewal(
    factory: sessionmaker[Session], submission_id: str, token: str, lease: timedelta
) -> Iterator[None]:
    """Keep extending the lease while the grader runs; a dead worker's lease runs out."""
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(lease.total_seconds() / 4):
            try:
                with factory() as session:
                    session.execute(
                        update(Submission)
                        .where(_mine(submission_id, token))
                        .values(lease_expires_at=utcnow() + lease)
                        .execution_options(synchronize_session=False)
                    )
                    session.commit()
            except Exception:  # the database may be restarting; the next round retries
                log.warning("lease renewal of %s failed", submission_id, exc_info=True)

    thread = threading.Thread(target=renew, name=f"lease-{submission_id[:8]}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _phase(settings: Settings, slug: str, phase_id: str) -> tuple[AssignmentSpec, PhaseSpec]:
    assignment = load_assignment(settings.assignments_dir / slug)
    phase = assignment.phase(phase_id)
    if phase is None:
        raise ArtifactError(f"phase {phase_id!r} is no longer in assignment {slug!r}")
    return assignment, phase


def _grade(
    session: Session, settings: Settings, submission_id: str, token: str, claim: _Claim
) -> dict[str, Any]:
    assignment, phase = _phase(settings, claim.assignment_slug, claim.phase_id)
    if phase.track is Track.DEFENSE:
        submission = session.get(Submission, submission_id)
        if submission is None:
            raise GraderError(f"submission {submission_id} disappeared")
        return grade_defense(
            session=session,
            settings=settings,
            assignment=assignment,
            phase=phase,
            submission=submission,
            report_progress=lambda state: _set_progress(session, submission_id, token, state),
        )
    return _grade_attack(session, settings, submission_id, token, claim, assignment, phase)


def _grade_attack(
    session: Session,
    settings: Settings,
    submission_id: str,
    token: str,
    claim: _Claim,
    assignment: AssignmentSpec,
    phase: PhaseSpec,
) -> dict[str, Any]:
    eval_set = load_verified_eval_set(settings.data_path, phase.evaluation_set)
    models, clean = [], {}
    for spec in phase.hidden_models:
        model = hidden_model(spec, assignment, settings.data_path)
        clean[spec.name] = clean_predictions(model, spec, eval_set, phase.evaluation_set.sha256)
        models.append(model)
    _set_progress(session, submission_id, token, {"stage": "scoring", "models": len(models)})
    adversarial = np.load(Path(claim.batch_path), allow_pickle=False)
    report = score_attack_batch(
        adversarial,
        eval_set.images,
        eval_set.labels,
        models,
        phase.threat_model.to_threat_model(),
        clean_predictions=clean,
    )
    results = report.model_dump(mode="json")
    results["hashes"] = {
        "evaluation_set": phase.evaluation_set.sha256,
        "hidden_models": {spec.name: spec.weights.sha256 for spec in phase.hidden_models},
    }
    return results


def _student_reason(exc: Exception) -> str:
    """What the student is told; the full traceback is kept for the TA in ``error_log``."""
    if isinstance(exc, ArtifactError):
        return (
            "The grader could not load a hidden artifact of this phase. This is not a problem "
            "with your upload and it was not counted; the course staff can see the details."
        )
    if isinstance(exc, GraderError):
        return f"The grader could not score this submission: {exc}"
    return (
        f"Internal grader error ({type(exc).__name__}). This is not a problem with your upload "
        "and it was not counted; the course staff can see the log."
    )


def run_scoring(
    submission_id: str,
    *,
    settings: Settings,
    session_factory: sessionmaker[Session],
    worker_name: str = "local",
) -> Outcome:
    """Score one submission; a second delivery of the same message does nothing.

    The run holds a lease on the row that a background thread renews; if the worker dies, the
    lease runs out and :func:`server.queue.sweep` puts the submission back in the queue.
    """
    token = f"{worker_name}/{uuid.uuid4().hex[:12]}"
    lease = timedelta(seconds=settings.lease_s)
    with session_factory() as session:
        claim = _claim(session, submission_id, token, lease)
        if claim is None:
            log.info("submission %s is not queued any more; nothing to do", submission_id)
            return Outcome.SKIPPED
        try:
            with _lease_renewal(session_factory, submission_id, token, lease):
                results = _grade(session, settings, submission_id, token, claim)
        except Exception as exc:  # every failure ends the submission with a reason
            log.exception("grading submission %s failed", submission_id)
            session.rollback()
            reason = _student_reason(exc)
            _finish(
                session,
                submission_id,
                token,
                status=SubmissionStatus.FAILED,
                error_message=reason,
                error_log=traceback.format_exc(),
                evaluator_version=EVALUATOR_VERSION,
            )
            return Outcome.FAILED
        recorded = _finish(
            session,
            submission_id,
            token,
            status=SubmissionStatus.SCORED,
            score=results["score"],
            results=results,
            evaluator_version=results["evaluator_version"],
        )
        if recorded:
            _request_transfer(settings, claim, submission_id)
        return Outcome.SCORED if recorded else Outcome.SKIPPED


def _request_transfer(settings: Settings, claim: _Claim, submission_id: str) -> None:
    """A newly scored attack batch joins the transfer matrix of the defense phases it feeds."""
    try:
        assignment, phase = _phase(settings, claim.assignment_slug, claim.phase_id)
        if phase.track is not Track.ATTACK or not defense_phases_fed_by(assignment, phase.id):
            return
        from worker.celery_app import GPU_QUEUE, TRANSFER_TASK, celery_for

        celery_for(settings).send_task(TRANSFER_TASK, args=[submission_id], queue=GPU_QUEUE)
    except Exception:  # the score is recorded; the matrix catches up with the next defense
        log.warning("could not request transfer scoring of %s", submission_id, exc_info=True)


def run_transfer(
    submission_id: str, *, settings: Settings, session_factory: sessionmaker[Session]
) -> int:
    """Score the attack batch ``submission_id`` against the latest defenses it may attack;
    cells already in the matrix are skipped, so a second delivery adds nothing."""
    with session_factory() as session:
        attack = session.get(Submission, submission_id)
        if attack is None or attack.status is not SubmissionStatus.SCORED:
            return 0
        assignment, _ = _phase(settings, attack.assignment_slug, attack.phase_id)
        return transfer_new_batch(
            session=session, settings=settings, assignment=assignment, attack=attack
        )
