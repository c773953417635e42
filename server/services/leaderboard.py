"""Phase leaderboards: each student's best scored submission, under a pseudonym."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from server.assignments import AssignmentSpec, PhaseSpec
from server.models import Submission, SubmissionStatus, User
from server.schemas import LeaderboardEntry, LeaderboardPublic

SELECTION = (
    "Best scored submission per student: the lowest mean accuracy of the hidden models on the "
    "submitted images (lower is better); ties go to the earlier submission. Only scored "
    "submissions are ranked."
)


@dataclass
class _Standing:
    user: User
    best: Submission
    count: int
    last_at: datetime


def leaderboard(
    *, session: Session, assignment: AssignmentSpec, phase: PhaseSpec, viewer: User
) -> LeaderboardPublic:
    """The phase's ranking; staff also see usernames and submission ids."""
    rows = session.scalars(
        select(Submission)
        .where(
            Submission.assignment_slug == assignment.slug,
            Submission.phase_id == phase.id,
            Submission.status == SubmissionStatus.SCORED,
        )
        .order_by(Submission.created_at)
    ).all()
    standings: dict[int, _Standing] = {}
    for row in rows:
        if row.score is None:
            continue
        standing = standings.get(row.user_id)
        if standing is None:
            standings[row.user_id] = _Standing(row.user, row, 1, row.created_at)
            continue
        standing.count += 1
        standing.last_at = row.created_at
        if row.score < (standing.best.score or 0.0):
            standing.best = row
    ordered = sorted(standings.values(), key=lambda s: (s.best.score or 0.0, s.best.created_at))
    staff = viewer.role.is_staff
    entries = [
        LeaderboardEntry(
            rank=rank,
            pseudonym=s.user.pseudonym,
            username=s.user.username if staff else None,
            score=float(s.best.score or 0.0),
            submission_id=s.best.id if staff or s.user.id == viewer.id else None,
            submissions=s.count,
            best_submitted_at=s.best.created_at,
            last_submitted_at=s.last_at,
            is_you=s.user.id == viewer.id,
        )
        for rank, s in enumerate(ordered, start=1)
    ]
    return LeaderboardPublic(
        assignment=assignment.slug,
        phase=phase.id,
        metric=phase.metric.value,
        selection=SELECTION,
        entries=entries,
    )
