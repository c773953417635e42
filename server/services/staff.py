"""Course staff actions: cancel, regrade, score overrides, deadline extensions, score export and
the audit log. Every action is recorded with who, when and why; a student may only cancel their
own queued submission."""

from __future__ import annotations

import csv
import io
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from server.assignments import AssignmentSpec, PhaseSpec
from server.config import Settings
from server.db import utcnow
from server.errors import Conflict, Forbidden, NotFound, ServiceError
from server.models import (
    AuditAction,
    AuditEvent,
    Extension,
    QuotaGrant,
    Submission,
    SubmissionStatus,
    User,
)
from server.queue import enqueue
from server.services.deadlines import extension_for, quota_grant_for
from server.services.submissions import get_visible_submission, scored_in_phase

CANCELLABLE = (SubmissionStatus.QUEUED, SubmissionStatus.RUNNING)
REGRADABLE = (SubmissionStatus.SCORED, SubmissionStatus.FAILED, SubmissionStatus.CANCELLED)
MAX_REASON_LENGTH = 2000

_CLEARED_OUTCOME: dict[str, Any] = {
    "status": SubmissionStatus.QUEUED,
    "task_id": None,
    "attempts": 0,
    "score": None,
    "results": None,
    "progress": None,
    "error_message": None,
    "error_log": None,
    "failure_cause": None,
    "evaluator_version": None,
    "scoring_key": None,
    "worker": None,
    "lease_expires_at": None,
    "started_at": None,
    "finished_at": None,
}
"""What a regrade resets: the submission is queued as if just accepted (its upload is kept);
``enqueued_at`` becomes the time it was queued again, so the sweeper leaves the sending to the
request for :data:`server.queue.UNSENT_GRACE_S`."""


class MissingReason(ServiceError):
    status, code = 422, "reason_required"


def require_reason(reason: str | None) -> str:
    text = (reason or "").strip()
    if not text:
        raise MissingReason("Give a reason; it is recorded in the audit log with your name.")
    if len(text) > MAX_REASON_LENGTH:
        raise MissingReason(f"Keep the reason under {MAX_REASON_LENGTH} characters.")
    return text


def _record(
    session: Session,
    actor: User,
    action: AuditAction,
    reason: str,
    *,
    submission: Submission | None = None,
    assignment: str | None = None,
    phase: str | None = None,
    subject: User | None = None,
    details: dict[str, Any] | None = None,
) -> AuditEvent:
    event = AuditEvent(
        actor_id=actor.id,
        action=action,
        reason=reason,
        submission_id=submission.id if submission is not None else None,
        assignment_slug=submission.assignment_slug if submission is not None else assignment,
        phase_id=submission.phase_id if submission is not None else phase,
        subject_id=submission.user_id if submission is not None else (subject and subject.id),
        details=details,
    )
    session.add(event)
    return event


def _outcome(submission: Submission) -> dict[str, Any]:
    """The part of a submission an action replaces, kept in the audit log."""
    return {
        "status": submission.status.value,
        "score": submission.score,
        "evaluator_version": submission.evaluator_version,
        "error_message": submission.error_message,
        "finished_at": submission.finished_at.isoformat() if submission.finished_at else None,
    }


def cancel_submission(
    session: Session, *, actor: User, submission_id: str, reason: str | None
) -> Submission:
    """Stop a queued or running submission. Staff may cancel any; a student only their own
    queued one (a reason is optional for them). A worker still running it records nothing."""
    submission = get_visible_submission(session=session, user=actor, submission_id=submission_id)
    staff = actor.role.is_staff
    text = require_reason(reason) if staff else (reason or "").strip() or "cancelled by the student"
    allowed = CANCELLABLE if staff else (SubmissionStatus.QUEUED,)
    if submission.status not in allowed:
        raise Conflict(
            f"Submission {submission.id} is {submission.status.value}; only "
            f"{' or '.join(s.value for s in allowed)} submissions can be cancelled"
            + ("" if staff else " by their owner (ask a TA to stop a running one).")
        )
    before = _outcome(submission)
    who = "a TA" if staff and actor.id != submission.user_id else "you"
    changed = session.execute(
        update(Submission)
        .where(Submission.id == submission.id, Submission.status.in_(allowed))
        .values(
            status=SubmissionStatus.CANCELLED,
            error_message=f"Cancelled by {who}: {text}",
            finished_at=utcnow(),
            worker=None,
            lease_expires_at=None,
            progress=None,
        )
        .execution_options(synchronize_session=False)
    )
    if changed.rowcount != 1:  # type: ignore[attr-defined]
        session.rollback()
        raise Conflict(f"Submission {submission.id} finished meanwhile; it was not cancelled.")
    _record(session, actor, AuditAction.CANCEL, text, submission=submission, details=before)
    session.commit()
    session.refresh(submission)
    return submission


def _staff(actor: User) -> None:
    if not actor.role.is_staff:
        raise Forbidden("Only course staff (TAs, instructors) can do this.")


def regrade_submission(
    session: Session, settings: Settings, *, actor: User, submission_id: str, reason: str | None
) -> Submission:
    """Queue a finished submission again with the current evaluator and spec; its previous
    outcome is kept in the audit log, a staff score override is kept."""
    _staff(actor)
    text = require_reason(reason)
    submission = get_visible_submission(session=session, user=actor, submission_id=submission_id)
    _requeue(session, actor, submission, text)
    session.commit()
    enqueue(session, settings, submission.id)
    session.refresh(submission)
    return submission


def _requeue(session: Session, actor: User, submission: Submission, reason: str) -> None:
    if submission.status not in REGRADABLE:
        raise Conflict(
            f"Submission {submission.id} is {submission.status.value}; it is already waiting for "
            "or being scored (cancel it first to start over)."
        )
    before = _outcome(submission)
    changed = session.execute(
        update(Submission)
        .where(Submission.id == submission.id, Submission.status.in_(REGRADABLE))
        .values(**_CLEARED_OUTCOME, enqueued_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    if changed.rowcount != 1:  # type: ignore[attr-defined]
        session.rollback()
        raise Conflict(f"Submission {submission.id} changed meanwhile; try again.")
    _record(session, actor, AuditAction.REGRADE, reason, submission=submission, details=before)


def regrade_phase(
    session: Session,
    settings: Settings,
    *,
    actor: User,
    assignment: AssignmentSpec,
    phase: PhaseSpec,
    reason: str | None,
    only_failed: bool = False,
) -> int:
    """Queue again every finished submission of a phase (or only the failed ones), e.g. after
    the evaluator or a hidden model changed; returns how many were queued."""
    _staff(actor)
    text = require_reason(reason)
    statuses = (SubmissionStatus.FAILED,) if only_failed else REGRADABLE
    rows = session.scalars(
        select(Submission)
        .where(
            Submission.assignment_slug == assignment.slug,
            Submission.phase_id == phase.id,
            Submission.status.in_(statuses),
        )
        .order_by(Submission.created_at)
    ).all()
    for row in rows:
        _requeue(session, actor, row, text)
    session.commit()
    for row in rows:
        enqueue(session, settings, row.id)
    return len(rows)


def override_score(
    session: Session,
    *,
    actor: User,
    submission_id: str,
    score: float | None,
    reason: str | None,
) -> Submission:
    """Set (or with ``None`` clear) the score that counts for a submission, with a reason."""
    _staff(actor)
    text = require_reason(reason)
    submission = get_visible_submission(session=session, user=actor, submission_id=submission_id)
    if score is not None and not 0.0 <= score <= 1.0:
        raise ServiceError(f"A score is a fraction between 0 and 1, got {score}.")
    details = {"previous_override": submission.score_override, "score": submission.score}
    details["new_override"] = score
    submission.score_override = score
    submission.override_reason = text if score is not None else None
    submission.override_by_id = actor.id if score is not None else None
    submission.override_at = utcnow() if score is not None else None
    _record(session, actor, AuditAction.OVERRIDE, text, submission=submission, details=details)
    session.commit()
    session.refresh(submission)
    return submission


def _student(session: Session, username: str) -> User:
    user = session.scalar(select(User).where(User.username == username))
    if user is None:
        raise NotFound(f"No user {username!r}.")
    return user


def grant_extension(
    session: Session,
    *,
    actor: User,
    assignment: AssignmentSpec,
    phase: PhaseSpec,
    username: str,
    due_at: datetime,
    reason: str | None,
) -> Extension:
    """Give one student a later deadline for a phase (replacing an earlier extension)."""
    _staff(actor)
    text = require_reason(reason)
    if due_at.tzinfo is None:
        raise ServiceError(
            "Give the new deadline with its UTC offset, e.g. 2026-12-01T23:59:00-05:00."
        )
    if due_at <= phase.due_at:
        raise ServiceError(
            f"An extension must end after the phase's deadline ({phase.due_at.isoformat()}); "
            f"got {due_at.isoformat()}."
        )
    student = _student(session, username)
    extension = extension_for(session, student, assignment, phase)
    previous = extension.due_at.isoformat() if extension is not None else None
    if extension is None:
        extension = Extension(
            user_id=student.id, assignment_slug=assignment.slug, phase_id=phase.id
        )
        session.add(extension)
    extension.due_at = due_at
    extension.reason = text
    extension.granted_by_id = actor.id
    _record(
        session,
        actor,
        AuditAction.EXTENSION_GRANTED,
        text,
        assignment=assignment.slug,
        phase=phase.id,
        subject=student,
        details={"due_at": due_at.isoformat(), "previous_due_at": previous},
    )
    session.commit()
    session.refresh(extension)
    return extension


def revoke_extension(
    session: Session,
    *,
    actor: User,
    assignment: AssignmentSpec,
    phase: PhaseSpec,
    username: str,
    reason: str | None,
) -> None:
    _staff(actor)
    text = require_reason(reason)
    student = _student(session, username)
    extension = extension_for(session, student, assignment, phase)
    if extension is None:
        raise NotFound(f"{username} has no extension for phase {phase.id!r}.")
    _record(
        session,
        actor,
        AuditAction.EXTENSION_REVOKED,
        text,
        assignment=assignment.slug,
        phase=phase.id,
        subject=student,
        details={"due_at": extension.due_at.isoformat()},
    )
    session.delete(extension)
    session.commit()


def list_extensions(
    session: Session, assignment: AssignmentSpec, phase: PhaseSpec
) -> list[Extension]:
    return list(
        session.scalars(
            select(Extension)
            .where(Extension.assignment_slug == assignment.slug, Extension.phase_id == phase.id)
            .order_by(Extension.due_at)
        ).all()
    )


MAX_EXTRA_SUBMISSIONS = 1000


def raise_quota(
    session: Session,
    *,
    actor: User,
    assignment: AssignmentSpec,
    phase: PhaseSpec,
    username: str,
    extra_per_day: int,
    extra_total: int,
    reason: str | None,
) -> QuotaGrant:
    """Give one student extra submissions in a phase, per day and in total (replacing an
    earlier grant; zeros take it back)."""
    _staff(actor)
    text = require_reason(reason)
    for name, value in (("extra_per_day", extra_per_day), ("extra_total", extra_total)):
        if not 0 <= value <= MAX_EXTRA_SUBMISSIONS:
            raise ServiceError(
                f"{name} must be between 0 and {MAX_EXTRA_SUBMISSIONS}, got {value}."
            )
    student = _student(session, username)
    grant = quota_grant_for(session, student, assignment, phase)
    previous = (grant.extra_per_day, grant.extra_total) if grant is not None else (0, 0)
    if grant is None:
        grant = QuotaGrant(user_id=student.id, assignment_slug=assignment.slug, phase_id=phase.id)
        session.add(grant)
    grant.extra_per_day, grant.extra_total = extra_per_day, extra_total
    grant.reason, grant.granted_by_id, grant.created_at = text, actor.id, utcnow()
    _record(
        session,
        actor,
        AuditAction.QUOTA_RAISED,
        text,
        assignment=assignment.slug,
        phase=phase.id,
        subject=student,
        details={
            "extra_per_day": extra_per_day,
            "extra_total": extra_total,
            "previous": list(previous),
        },
    )
    session.commit()
    session.refresh(grant)
    return grant


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def csv_text(value: str) -> str:
    """A text cell a spreadsheet will not run as a formula: a leading ``= + - @`` (or tab, CR)
    gets a ``'`` in front. The roster refuses such names; accounts made otherwise may have them."""
    return "'" + value if value.startswith(FORMULA_STARTS) else value


EXPORT_COLUMNS = (
    "username",
    "pseudonym",
    "submission_id",
    "score",
    "final_score",
    "overridden",
    "submissions",
    "scored_at",
)


def export_scores_csv(session: Session, *, assignment: AssignmentSpec, phase: PhaseSpec) -> str:
    """One row per student with a scored submission: their best by final score (the phase's
    metric decides the direction; ties go to the earlier submission)."""
    higher = phase.scoring_metric.higher_is_better
    best: dict[int, Submission] = {}
    counts: dict[int, int] = {}
    for row in scored_in_phase(session, assignment.slug, phase.id):
        if row.final_score is None:
            continue
        counts[row.user_id] = counts.get(row.user_id, 0) + 1
        current = best.get(row.user_id)
        score, held = row.final_score, current.final_score if current is not None else None
        if held is None or (score > held if higher else score < held):
            best[row.user_id] = row
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(EXPORT_COLUMNS)
    for row in sorted(best.values(), key=lambda r: r.user.username):
        writer.writerow(
            [
                csv_text(row.user.username),
                csv_text(row.user.pseudonym),
                row.id,
                "" if row.score is None else f"{row.score:.6f}",
                f"{row.final_score:.6f}",
                "yes" if row.score_override is not None else "no",
                counts[row.user_id],
                row.finished_at.isoformat() if row.finished_at else "",
            ]
        )
    return out.getvalue()


def audit_log(session: Session, *, limit: int = 200, offset: int = 0) -> list[AuditEvent]:
    return list(
        session.scalars(
            select(AuditEvent)
            .order_by(AuditEvent.created_at.desc(), AuditEvent.id.desc())
            .limit(limit)
            .offset(offset)
        ).all()
    )
