"""Handing submissions to Celery, always after the row is committed."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from server.assignments import PhaseSpec, SpecError, TimeLimits, load_assignment
from server.config import Settings
from server.db import utcnow
from server.models import FailureCause, Submission, SubmissionStatus

log = logging.getLogger(__name__)


def phase_time_limits(settings: Settings, assignment_slug: str, phase_id: str) -> TimeLimits | None:
    """The phase's time limits, read from its spec file as the worker reads it.

    ``None`` when the spec or the phase is gone: the task is sent without limits and the worker
    fails the submission at once with a reason, instead of it waiting in the queue for ever.
    """
    try:
        phase = load_assignment(settings.assignments_dir / assignment_slug).phase(phase_id)
    except (SpecError, OSError):
        log.warning("no valid spec for %s/%s; sent without time limits", assignment_slug, phase_id)
        return None
    return phase.time_limits if phase is not None else None


def send_scoring_task(
    settings: Settings, submission_id: str, queue: str, time_limits: TimeLimits | None
) -> str:
    """Publish the scoring message to ``queue`` with the phase's soft and hard time limits
    (enforced by the worker's prefork pool); raises if the broker cannot be reached."""
    from worker.celery_app import SCORE_TASK, celery_for

    limits = (
        {"soft_time_limit": time_limits.soft_s, "time_limit": time_limits.hard_s}
        if time_limits is not None
        else {}
    )
    result = celery_for(settings).send_task(
        SCORE_TASK,
        args=[submission_id],
        queue=queue,
        retry=True,
        retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.5},
        **limits,
    )
    return str(result.id)


def enqueue(
    session: Session,
    settings: Settings,
    submission_id: str,
    *,
    phase: PhaseSpec | None = None,
    queue: str | None = None,
) -> bool:
    """Send a committed, queued submission to the broker and record the task id.

    ``phase`` and ``queue`` are the submission's phase and queue when the caller holds them (the
    API has just checked the upload against the phase), which spares reading the row and the
    spec file again; otherwise both are read.
    If the broker is down the submission stays queued without a task id and is sent by
    :func:`enqueue_pending` later; nothing is lost.
    """
    if phase is not None and queue is not None:
        time_limits: TimeLimits | None = phase.time_limits
    else:
        row = session.execute(
            select(Submission.queue, Submission.assignment_slug, Submission.phase_id).where(
                Submission.id == submission_id
            )
        ).one()
        queue = row.queue or "cpu"
        time_limits = phase_time_limits(settings, row.assignment_slug, row.phase_id)
    try:
        task_id = send_scoring_task(settings, submission_id, queue, time_limits)
    except Exception:
        log.warning("broker unreachable; submission %s stays queued", submission_id, exc_info=True)
        return False
    session.execute(
        update(Submission)
        .where(Submission.id == submission_id)
        .values(task_id=task_id, enqueued_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return True


UNSENT_GRACE_S = 15.0
"""A queued submission without a task id is left to the request that is sending it this long
(the API sends right after its commit); only after that does the sweeper send it."""


def enqueue_pending(session: Session, settings: Settings) -> int:
    """Send every queued submission that never reached the broker, and again every one still
    queued ``settings.requeue_queued_after_s`` after it was sent (its message may have been lost
    with a broker that restarted without persistence; a duplicate is skipped by the worker's
    conditional claim). Returns how many were sent."""
    now = utcnow()
    cutoff = now - timedelta(seconds=settings.requeue_queued_after_s)
    unsent_cutoff = now - timedelta(seconds=UNSENT_GRACE_S)
    pending = session.execute(
        select(Submission.id, Submission.task_id)
        .where(
            Submission.status == SubmissionStatus.QUEUED,
            or_(
                (Submission.task_id.is_(None))
                & (func.coalesce(Submission.enqueued_at, Submission.created_at) < unsent_cutoff),
                Submission.task_id.is_not(None) & (Submission.enqueued_at < cutoff),
            ),
        )
        .order_by(Submission.created_at)
    ).all()
    sent = 0
    for submission_id, task_id in pending:
        if task_id is not None:
            log.warning(
                "submission %s still queued over %.0f s after task %s was sent; sending it again",
                submission_id,
                settings.requeue_queued_after_s,
                task_id,
            )
        if not enqueue(session, settings, submission_id):
            break
        sent += 1
    return sent


INFRASTRUCTURE_ERROR = (
    "Infrastructure error: the worker scoring this submission stopped {attempts} times before "
    "finishing. This is not a problem with your upload and it was not counted; resubmit, and "
    "tell the course staff if it happens again."
)


@dataclass(frozen=True)
class SweepReport:
    requeued: int
    failed: int
    sent: int


def recover_stale(session: Session, settings: Settings) -> tuple[list[str], int]:
    """Requeue running submissions whose lease ran out (their worker died).

    After ``settings.max_attempts`` attempts a submission fails with an infrastructure error
    instead, which is not charged to the student. Returns (the requeued ids, how many failed).
    """
    now = utcnow()
    stale = session.execute(
        select(Submission.id, Submission.worker, Submission.attempts).where(
            Submission.status == SubmissionStatus.RUNNING, Submission.lease_expires_at < now
        )
    ).all()
    requeued: list[str] = []
    failed = 0
    for submission_id, worker, attempts in stale:
        still_stale = (
            (Submission.id == submission_id)
            & (Submission.status == SubmissionStatus.RUNNING)
            & (Submission.worker == worker)
            & (Submission.lease_expires_at < now)
        )
        if attempts >= settings.max_attempts:
            values = {
                "status": SubmissionStatus.FAILED,
                "error_message": INFRASTRUCTURE_ERROR.format(attempts=attempts),
                "error_log": f"lease of {worker} expired {attempts} times; last at {now}",
                "failure_cause": FailureCause.INFRASTRUCTURE,
                "finished_at": now,
            }
        else:
            values = {"status": SubmissionStatus.QUEUED, "task_id": None}
        result = session.execute(
            update(Submission)
            .where(still_stale)
            .values(worker=None, lease_expires_at=None, progress=None, **values)
            .execution_options(synchronize_session=False)
        )
        session.commit()
        if result.rowcount == 1:  # type: ignore[attr-defined]
            if values["status"] is SubmissionStatus.FAILED:
                failed += 1
            else:
                requeued.append(submission_id)
            log.warning(
                "submission %s: lease of %s expired (attempt %d)", submission_id, worker, attempts
            )
    return requeued, failed


def sweep(session: Session, settings: Settings) -> SweepReport:
    """Recover what a dead worker or a broker outage left behind; safe to run anywhere, often."""
    requeued, failed = recover_stale(session, settings)
    sent = sum(enqueue(session, settings, submission_id) for submission_id in requeued)
    sent += enqueue_pending(session, settings)
    return SweepReport(requeued=len(requeued), failed=failed, sent=sent)
