"""What the TA pages show: the dashboard's filters and counts, a failure in words with what to do
about it, a phase's quota grants, invitation links, the audit log in plain sentences, and
deadlines typed in the course timezone. The pages call these; they read the database and never
write (the services do)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode
from zoneinfo import ZoneInfo

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from server.assignments import AssignmentSpec, PhaseSpec
from server.catalog import Catalog
from server.config import Settings
from server.db import utcnow
from server.models import (
    AuditAction,
    AuditEvent,
    Extension,
    FailureCause,
    QuotaGrant,
    Role,
    Submission,
    SubmissionStatus,
    User,
)
from server.services import staff
from server.web.common import local_time, percent

UTC_ZONE = ZoneInfo("UTC")

# --- Failures -------------------------------------------------------------------------------

FAILURE_TEXT: dict[FailureCause, tuple[str, str]] = {
    FailureCause.INFRASTRUCTURE: (
        "A worker stopped while scoring it, every attempt",
        "Check on the dashboard that workers are alive and that the machine has the memory "
        "the phase needs; once they are, regrade it.",
    ),
    FailureCause.ARTIFACT: (
        "A hidden file of the phase is missing or does not match its pinned hash",
        "Fix the data directory (the file must match the sha256 in the assignment spec), "
        "then use \u201cregrade failed only\u201d on the phase page.",
    ),
    FailureCause.GRADER: (
        "The grader refused the upload",
        "The error message says what is wrong with the file. The student can fix it and submit "
        "again; failed submissions do not count against the quota.",
    ),
    FailureCause.INTERNAL: (
        "The grader crashed",
        "Read the log below for the exception. Once the cause is fixed, regrade it.",
    ),
    FailureCause.TIME_LIMIT: (
        "Scoring ran past the phase's time limit",
        "Raise the phase's time limit in the spec or give the workers more capacity, then "
        "regrade it.",
    ),
}
"""Per failure cause: what happened, and what staff can do about it."""


def failure_title(cause: FailureCause | None) -> str:
    if cause is None:
        return "No cause recorded"
    return FAILURE_TEXT[cause][0]


def failure_advice(cause: FailureCause | None) -> str:
    if cause is None:
        return "Read the error message and the log below."
    return FAILURE_TEXT[cause][1]


# --- The dashboard ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PhaseOption:
    value: str
    """``slug`` for a whole assignment, ``slug/phase_id`` for one phase."""
    label: str


def phase_options(catalog: Catalog) -> list[tuple[AssignmentSpec, list[PhaseOption]]]:
    """The choices of the dashboard's phase filter, grouped by assignment."""
    return [
        (
            assignment,
            [PhaseOption(assignment.slug, f"{assignment.title}: all phases")]
            + [
                PhaseOption(f"{assignment.slug}/{phase.id}", f"{assignment.title}: {phase.title}")
                for phase in assignment.phases
            ],
        )
        for assignment in catalog.assignments.values()
    ]


@dataclass(frozen=True)
class Filters:
    """The dashboard's filters as the table applies them, and what was wrong with the rest."""

    assignment: str | None = None
    phase: str | None = None
    status: SubmissionStatus | None = None
    username: str | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def phase_value(self) -> str:
        if self.assignment is None:
            return ""
        return self.assignment if self.phase is None else f"{self.assignment}/{self.phase}"

    @property
    def active(self) -> bool:
        return any((self.assignment, self.status, self.username))

    def url(self, page: int = 1) -> str:
        """The dashboard with these filters (and ``page``), for links and the pager."""
        params = {
            "phase": self.phase_value,
            "status": self.status.value if self.status else "",
            "student": self.username or "",
            "page": str(page) if page > 1 else "",
        }
        query = urlencode({key: value for key, value in params.items() if value})
        return f"/ta?{query}" if query else "/ta"


def parse_filters(
    *, session: Session, catalog: Catalog, phase: str, status: str, student: str
) -> Filters:
    """Check the dashboard's query parameters; one that is wrong is dropped and explained."""
    problems = []
    assignment_slug = phase_id = None
    phase = phase.strip()
    if phase:
        slug, _, wanted = phase.partition("/")
        assignment = catalog.assignments.get(slug)
        if assignment is None or (wanted and assignment.phase(wanted) is None):
            problems.append(
                f"There is no phase {phase!r}; pick one from the list. Showing every phase."
            )
        else:
            assignment_slug, phase_id = slug, wanted or None
    status_value = None
    if status.strip():
        try:
            status_value = SubmissionStatus(status.strip().lower())
        except ValueError:
            known = ", ".join(s.value for s in SubmissionStatus)
            problems.append(
                f"There is no status {status.strip()!r} (the statuses are {known}). "
                "Showing every status."
            )
    username = student.strip() or None
    if (
        username is not None
        and session.scalar(select(User.id).where(User.username == username)) is None
    ):
        problems.append(
            f"There is no user {username!r}. Check the spelling: usernames are exact "
            "(the list of students is in the form's suggestions)."
        )
    return Filters(assignment_slug, phase_id, status_value, username, problems)


def usernames(session: Session, role: Role = Role.STUDENT) -> list[str]:
    """Every username with ``role``, for the forms' suggestions."""
    return list(
        session.scalars(select(User.username).where(User.role == role).order_by(User.username))
    )


def status_counts(session: Session) -> dict[SubmissionStatus, int]:
    """Submissions per status over the whole course, every status listed."""
    rows = session.execute(select(Submission.status, func.count()).group_by(Submission.status))
    counts = dict.fromkeys(SubmissionStatus, 0)
    counts.update({status: count for status, count in rows})
    return counts


@dataclass(frozen=True)
class PhaseSummary:
    assignment: AssignmentSpec
    phase: PhaseSpec
    counts: dict[SubmissionStatus, int]
    extensions: int

    @property
    def finished(self) -> int:
        """What "regrade all" queues again."""
        return sum(self.counts[status] for status in staff.REGRADABLE)

    @property
    def filter_value(self) -> str:
        return f"{self.assignment.slug}/{self.phase.id}"


def phase_summaries(
    session: Session, catalog: Catalog, only: tuple[AssignmentSpec, PhaseSpec] | None = None
) -> list[PhaseSummary]:
    """Every phase of the course (or ``only`` one) with its submissions per status and its
    extensions."""
    count_query = select(
        Submission.assignment_slug, Submission.phase_id, Submission.status, func.count()
    ).group_by(Submission.assignment_slug, Submission.phase_id, Submission.status)
    extension_query = select(Extension.assignment_slug, Extension.phase_id, func.count()).group_by(
        Extension.assignment_slug, Extension.phase_id
    )
    phases = [(a, p) for a in catalog.assignments.values() for p in a.phases]
    if only is not None:
        phases = [only]
        slug, phase_id = only[0].slug, only[1].id
        count_query = count_query.where(
            Submission.assignment_slug == slug, Submission.phase_id == phase_id
        )
        extension_query = extension_query.where(
            Extension.assignment_slug == slug, Extension.phase_id == phase_id
        )
    counts: dict[tuple[str, str], dict[SubmissionStatus, int]] = {}
    for slug, phase_id, status, count in session.execute(count_query):
        counts.setdefault((slug, phase_id), dict.fromkeys(SubmissionStatus, 0))[status] = count
    extensions = {(slug, phase_id): n for slug, phase_id, n in session.execute(extension_query)}
    return [
        PhaseSummary(
            assignment=assignment,
            phase=phase,
            counts=counts.get((assignment.slug, phase.id), dict.fromkeys(SubmissionStatus, 0)),
            extensions=extensions.get((assignment.slug, phase.id), 0),
        )
        for assignment, phase in phases
    ]


@dataclass(frozen=True)
class SubmissionRow:
    """A row of the dashboard's table: the submission, its course's timezone and phase title."""

    submission: Submission
    zone: ZoneInfo
    phase_title: str


def submission_rows(catalog: Catalog, rows: list[Submission]) -> list[SubmissionRow]:
    result = []
    for row in rows:
        assignment = catalog.assignments.get(row.assignment_slug)
        phase = assignment.phase(row.phase_id) if assignment is not None else None
        title = phase.title if phase is not None else f"{row.assignment_slug}/{row.phase_id}"
        result.append(SubmissionRow(row, course_zone(catalog, row.assignment_slug), title))
    return result


# --- Quotas and invitations -------------------------------------------------------------------


def quota_grants(
    session: Session, assignment: AssignmentSpec, phase: PhaseSpec
) -> list[QuotaGrant]:
    """The phase's quota grants (extra submissions for one student), by username."""
    return list(
        session.scalars(
            select(QuotaGrant)
            .join(User, User.id == QuotaGrant.user_id)
            .where(QuotaGrant.assignment_slug == assignment.slug, QuotaGrant.phase_id == phase.id)
            .order_by(User.username)
        )
    )


def invite_url(settings: Settings) -> str:
    """Where invitation links point (the code goes after it), as ``autograder roster import``
    writes them."""
    return f"{settings.public_url}/invite?code="


def invitation_expiry(settings: Settings) -> datetime:
    """When invitation codes issued now stop working."""
    return utcnow() + timedelta(seconds=settings.invitation_lifetime_s)


# --- Deadlines typed in a form ----------------------------------------------------------------


class DeadlineInvalid(ValueError):
    """A deadline typed into a form that cannot be read; the message says how to fix it."""


def local_input_value(moment: datetime, zone: ZoneInfo) -> str:
    """``moment`` as a ``datetime-local`` input shows it in ``zone``: ``2026-10-19T23:59``."""
    return moment.astimezone(zone).strftime("%Y-%m-%dT%H:%M")


def parse_local_deadline(text: str, zone: ZoneInfo) -> datetime:
    """A ``datetime-local`` value (``2026-10-19T23:59``), read as a wall-clock time in the
    course timezone ``zone``; a value with its own UTC offset keeps it."""
    text = text.strip()
    if not text:
        raise DeadlineInvalid("Give the new deadline (date and time).")
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise DeadlineInvalid(
            f"{text!r} is not a date and time; use the picker or type it as "
            "2026-12-01T23:59 (course time)."
        ) from None
    if moment.tzinfo is not None:
        return moment.astimezone(UTC)
    local = moment.replace(tzinfo=zone)
    if local.astimezone(UTC).astimezone(zone).replace(tzinfo=None) != moment:
        raise DeadlineInvalid(
            f"{moment:%Y-%m-%d %H:%M} does not exist in {zone.key}: the clocks skip it when "
            "summer time starts. Pick a time an hour later."
        )
    return local.astimezone(UTC)


# --- The audit log ----------------------------------------------------------------------------

ACTION_NAMES = {
    AuditAction.CANCEL: "Cancelled",
    AuditAction.REGRADE: "Regraded",
    AuditAction.OVERRIDE: "Score override",
    AuditAction.EXTENSION_GRANTED: "Extension granted",
    AuditAction.EXTENSION_REVOKED: "Extension revoked",
    AuditAction.QUOTA_RAISED: "Quota raised",
    AuditAction.ROSTER_IMPORTED: "Roster imported",
    AuditAction.REVEAL: "Private board revealed",
}


def course_zone(catalog: Catalog, slug: str | None) -> ZoneInfo:
    """The timezone of the assignment ``slug``; UTC when there is none or it is gone."""
    assignment = catalog.assignments.get(slug or "")
    return assignment.zone if assignment is not None else UTC_ZONE


def _iso_local(value: Any, zone: ZoneInfo) -> str:
    try:
        return local_time(datetime.fromisoformat(str(value)), zone)
    except ValueError:
        return str(value)


def audit_details(event: AuditEvent, zone: ZoneInfo) -> str:
    """What an action changed, in words, from the details the staff service recorded."""
    details: dict[str, Any] = event.details or {}
    if event.action is AuditAction.OVERRIDE:
        new, grader = details.get("new_override"), details.get("score")
        change = f"set to {percent(new, 2)}" if new is not None else "cleared"
        return f"{change} (the grader's score: {percent(grader, 2)})"
    if event.action in (AuditAction.CANCEL, AuditAction.REGRADE):
        words = f"was {details.get('status', 'unknown')}"
        if details.get("score") is not None:
            words += f" with {percent(details['score'], 2)}"
        if details.get("error_message"):
            words += f": {details['error_message']}"
        return words
    if event.action is AuditAction.EXTENSION_GRANTED:
        words = f"until {_iso_local(details.get('due_at'), zone)}"
        previous = details.get("previous_due_at")
        return words + (f" (replaces {_iso_local(previous, zone)})" if previous else "")
    if event.action is AuditAction.EXTENSION_REVOKED:
        return f"had until {_iso_local(details.get('due_at'), zone)}"
    if event.action is AuditAction.QUOTA_RAISED:
        words = (
            f"+{details.get('extra_per_day', 0)} per day, +{details.get('extra_total', 0)} in total"
        )
        previous = details.get("previous") or [0, 0]
        if any(previous):
            words += f" (was +{previous[0]} per day, +{previous[1]} in total)"
        return words
    if event.action is AuditAction.ROSTER_IMPORTED:
        return (
            f"{details.get('students', 0)} students ({details.get('created', 0)} new), "
            f"{details.get('invitations', 0)} invitation codes issued"
        )
    return "the private board opened to students"


@dataclass(frozen=True)
class AuditRow:
    event: AuditEvent
    zone: ZoneInfo
    action: str
    details: str


def audit_rows(
    session: Session, catalog: Catalog, *, limit: int, offset: int = 0
) -> list[AuditRow]:
    """A page of the audit log, newest first, each action in words and its time in course time."""
    return [
        _audit_row(catalog, event) for event in staff.audit_log(session, limit=limit, offset=offset)
    ]


def submission_history(
    session: Session, catalog: Catalog, submission: Submission
) -> list[AuditRow]:
    """Every staff action recorded on one submission, newest first."""
    events = session.scalars(
        select(AuditEvent)
        .where(AuditEvent.submission_id == submission.id)
        .order_by(AuditEvent.created_at.desc(), AuditEvent.id.desc())
    )
    return [_audit_row(catalog, event) for event in events]


def _audit_row(catalog: Catalog, event: AuditEvent) -> AuditRow:
    zone = course_zone(catalog, event.assignment_slug)
    return AuditRow(event, zone, ACTION_NAMES[event.action], audit_details(event, zone))
