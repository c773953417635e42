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
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import select, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from graders.attack_scoring import score_attack_batch
from graders.errors import ArtifactError, GraderError
from graders.version import EVALUATOR_VERSION
from server.artifacts import load_verified_eval_set
from server.assignments import AssignmentSpec, PhaseSpec, Track, load_assignment
from server.config import Settings
from server.db import is_unreachable, run_with_retry, utcnow
from server.models import FailureCause, Submission, SubmissionStatus
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
    session.commit()  # grading may take hours: hold no transaction (nor connection) meanwhile
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
    """Record the outcome only if this run still holds the row (not cancelled, not taken over).

    A database restart meanwhile does not lose the result: the write is retried on a new
    connection until the database is back (for up to :data:`server.db.DB_RETRY_S`).
    """

    def write() -> bool:
        result = session.execute(
            update(Submission)
            .where(_mine(submission_id, token))
            .values(finished_at=utcnow(), progress=None, lease_expires_at=None, **values)
            .execution_options(synchronize_session=False)
        )
        session.commit()
        if result.rowcount == 1:  # type: ignore[attr-defined]
            return True
        # A retry after a commit whose reply was lost finds this run's outcome already there.
        recorded = session.scalar(
            select(Submission.id).where(
                Submission.id == submission_id,
                Submission.worker == token,
                Submission.status == values["status"],
            )
        )
        session.commit()
        return recorded is not None

    return run_with_retry(session, write, what=f"recording the outcome of {submission_id}")


def _set_progress(
    session: Session, submission_id: str, token: str, progress: dict[str, Any]
) -> None:
    """Show how far the grader got. Best effort: a write the database cannot take (restarting,
    locked) is dropped, not retried, and the next report replaces it; grading goes on. It is
    written in a session of its own, so a failed write rolls back nothing of the grader's."""
    try:
        with Session(session.get_bind()) as own, own.begin():
            own.execute(
                update(Submission)
                .where(_mine(submission_id, token))
                .values(progress=progress)
                .execution_options(synchronize_session=False)
            )
    except DBAPIError as exc:
        if not is_unreachable(exc):
            raise
        log.warning("progress of %s not saved: database unreachable (%r)", submission_id, exc.orig)


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
        results = grade_defense(
            session=session,
            settings=settings,
            assignment=assignment,
            phase=phase,
            submission=submission,
            report_progress=lambda state: _set_progress(session, submission_id, token, state),
        )
    else:
        results = _grade_attack(session, settings, submission_id, token, claim, assignment, phase)
    results["scoring_key"] = phase.scoring_key
    return results


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


def _duration(seconds: float) -> str:
    """``90 s``, ``5 min``, ``3 h 10 min``: a time limit as a student reads it."""
    if seconds < 120:
        return f"{seconds:g} s"
    minutes = round(seconds / 60)
    if minutes < 120:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if minutes else f"{hours} h"


def time_limit_reason(limit_s: float | None) -> str:
    """What the student is told when scoring ran past the phase's time limit."""
    limit = f" of {_duration(limit_s)}" if limit_s else ""
    return (
        f"Time limit exceeded: scoring this submission took longer than the phase's limit{limit} "
        "and was stopped. It was not counted; tell the course staff if it happens again."
    )


def _interrupted_by_time_limit(exc: BaseException) -> bool:
    """True when the soft time limit cut the grader short, also where grading code wrapped the
    interruption in an error of its own (reading a hidden file cut short is an ArtifactError)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, SoftTimeLimitExceeded):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def _soft_time_limit(settings: Settings, claim: _Claim) -> float | None:
    try:
        return _phase(settings, claim.assignment_slug, claim.phase_id)[1].time_limits.soft_s
    except Exception:  # the spec changed under us: the reason goes without the number
        return None


def _failure(exc: Exception, settings: Settings, claim: _Claim) -> tuple[FailureCause, str]:
    """Why grading failed and what the student is told; the full traceback is kept for the TA
    in ``error_log``. No cause is charged to the student's quota."""
    if _interrupted_by_time_limit(exc):
        return FailureCause.TIME_LIMIT, time_limit_reason(_soft_time_limit(settings, claim))
    if isinstance(exc, ArtifactError):
        return FailureCause.ARTIFACT, (
            "The grader could not load a hidden artifact of this phase. This is not a problem "
            "with your upload and it was not counted; the course staff can see the details."
        )
    if isinstance(exc, GraderError):
        return FailureCause.GRADER, f"The grader could not score this submission: {exc}"
    return FailureCause.INTERNAL, (
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
    lease runs out and :func:`server.queue.sweep` puts the submission back in the queue. The
    phase's soft time limit interrupts the grader with ``SoftTimeLimitExceeded``, which fails the
    submission like any other error, with cause ``time_limit``.
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
            if is_unreachable(exc):  # not the upload's fault: the lease runs out, sweep requeues
                raise
            cause, reason = _failure(exc, settings, claim)
            _finish(
                session,
                submission_id,
                token,
                status=SubmissionStatus.FAILED,
                failure_cause=cause,
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
            scoring_key=results["scoring_key"],
        )
        if recorded:
            _request_transfer(settings, claim, submission_id)
        return Outcome.SCORED if recorded else Outcome.SKIPPED


def record_hard_time_limit(
    submission_id: str,
    task_id: str,
    limit_s: float | None,
    *,
    session_factory: sessionmaker[Session],
) -> bool:
    """Fail the submission whose scoring process the pool killed at the hard time limit.

    Called in the worker's main process (the scoring process is gone). Without it the lease would
    run out and the sweep would start the same doomed run again, ``max_attempts`` times. Only
    the run of task ``task_id`` is failed: a later delivery that owns the row is left alone.
    """
    with session_factory() as session:
        result = session.execute(
            update(Submission)
            .where(
                Submission.id == submission_id,
                Submission.status == SubmissionStatus.RUNNING,
                Submission.task_id == task_id,
            )
            .values(
                status=SubmissionStatus.FAILED,
                failure_cause=FailureCause.TIME_LIMIT,
                error_message=time_limit_reason(limit_s),
                error_log=f"task {task_id}: the worker process was killed at the hard time limit"
                + (f" ({limit_s:g} s)" if limit_s else ""),
                evaluator_version=EVALUATOR_VERSION,
                finished_at=utcnow(),
                worker=None,
                lease_expires_at=None,
                progress=None,
            )
            .execution_options(synchronize_session=False)
        )
        session.commit()
        return bool(result.rowcount == 1)  # type: ignore[attr-defined]


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
