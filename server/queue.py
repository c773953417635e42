"""Handing submissions to Celery, always after the row is committed."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from server.config import Settings
from server.db import utcnow
from server.models import Submission, SubmissionStatus

log = logging.getLogger(__name__)


def send_scoring_task(settings: Settings, submission_id: str, queue: str) -> str:
    """Publish the scoring message to ``queue``; raises if the broker cannot be reached."""
    from worker.celery_app import SCORE_TASK, celery_for

    result = celery_for(settings).send_task(
        SCORE_TASK,
        args=[submission_id],
        queue=queue,
        retry=True,
        retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.5},
    )
    return str(result.id)


def enqueue(session: Session, settings: Settings, submission_id: str) -> bool:
    """Send a committed, queued submission to the broker and record the task id.

    If the broker is down the submission stays queued without a task id and is sent by
    :func:`enqueue_pending` later; nothing is lost.
    """
    queue = session.scalar(select(Submission.queue).where(Submission.id == submission_id))
    try:
        task_id = send_scoring_task(settings, submission_id, queue or "cpu")
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


def enqueue_pending(session: Session, settings: Settings) -> int:
    """Send every queued submission that never reached the broker; returns how many were sent."""
    pending = session.scalars(
        select(Submission.id)
        .where(Submission.status == SubmissionStatus.QUEUED, Submission.task_id.is_(None))
        .order_by(Submission.created_at)
    ).all()
    sent = 0
    for submission_id in pending:
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


def recover_stale(session: Session, settings: Settings) -> tuple[int, int]:
    """Requeue running submissions whose lease ran out (their worker died).

    After ``settings.max_attempts`` attempts a submission fails with an infrastructure error
    instead, which is not charged to the student. Returns (requeued, failed).
    """
    now = utcnow()
    stale = session.execute(
        select(Submission.id, Submission.worker, Submission.attempts).where(
            Submission.status == SubmissionStatus.RUNNING, Submission.lease_expires_at < now
        )
    ).all()
    requeued = failed = 0
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
                requeued += 1
            log.warning(
                "submission %s: lease of %s expired (attempt %d)", submission_id, worker, attempts
            )
    return requeued, failed


def sweep(session: Session, settings: Settings) -> SweepReport:
    """Recover what a dead worker or a broker outage left behind; safe to run anywhere, often."""
    requeued, failed = recover_stale(session, settings)
    return SweepReport(requeued=requeued, failed=failed, sent=enqueue_pending(session, settings))
