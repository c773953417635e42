"""Public and private boards, the final selection and points.

During a phase the public board ranks each student's best *public* score: for attack phases the
mean accuracy of the phase's public subset of hidden models, for defense phases the robust
accuracy on its public subset of evaluation points. The private board ranks the submission each
student's final selection picks (best public, last, or the best of those they marked) by its
*private* score: every hidden model, or the final attack suite on every point. It opens when the
phase and all its extensions have closed (or when staff reveal it). A staff override replaces
both scores of a submission.
"""

from __future__ import annotations

import csv
import hashlib
import io
import random
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, load_only, selectinload

from server.assignments import AssignmentSpec, Feedback, PhaseSpec, Selection, Track
from server.catalog import Catalog
from server.db import utcnow
from server.errors import Conflict, Forbidden, NotFound, PhaseClosed
from server.models import (
    AuditAction,
    AuditEvent,
    BoardReveal,
    Extension,
    Role,
    Submission,
    SubmissionStatus,
    User,
)
from server.schemas import SubmissionPublic
from server.services.deadlines import due_for
from server.services.staff import csv_text, require_reason
from server.services.submissions import to_public

UNSCORED_STATUSES = (SubmissionStatus.QUEUED, SubmissionStatus.RUNNING, SubmissionStatus.FAILED)


class Board(StrEnum):
    PUBLIC = "public"
    PRIVATE = "private"


SELECTION_RULES = {
    Selection.BEST: "your submission with the best public score",
    Selection.LAST: "your latest scored submission",
    Selection.MARKED: (
        "the best (by private score) of the submissions you marked, or your best public score "
        "if you marked none"
    ),
}


def public_points(assignment: AssignmentSpec, phase: PhaseSpec, n_points: int) -> list[int]:
    """The evaluation points of a defense phase's public board: a fixed pseudo-random subset,
    the same for every submission (seeded by the phase, so students cannot choose it)."""
    fraction = phase.leaderboard.public_fraction
    if fraction is None or n_points == 0:
        return list(range(n_points))
    seed = hashlib.sha256(f"{assignment.slug}/{phase.id}/public".encode()).digest()
    chosen = random.Random(seed).sample(range(n_points), max(1, round(fraction * n_points)))
    return sorted(chosen)


def public_score(
    assignment: AssignmentSpec, phase: PhaseSpec, submission: Submission
) -> float | None:
    if submission.score_override is not None:
        return submission.score_override
    if submission.score is None:
        return None
    board = phase.leaderboard
    if phase.track is Track.ATTACK and board.public_models is not None:
        results = submission.results or {}
        per_model = {m["name"]: m["adversarial_accuracy"] for m in results.get("models", [])}
        wanted = [per_model[name] for name in board.public_models if name in per_model]
        return sum(wanted) / len(wanted) if wanted else submission.score
    if phase.track is Track.DEFENSE and board.public_fraction is not None:
        results = submission.results or {}
        suite = (results.get("suites") or {}).get(results.get("leaderboard_suite", ""), {})
        broken_by = suite.get("broken_by")
        if not broken_by:
            return submission.score
        points = public_points(assignment, phase, len(broken_by))
        return sum(broken_by[i] is None for i in points) / len(points)
    return submission.score


def private_score(phase: PhaseSpec, submission: Submission) -> float | None:
    if submission.score_override is not None:
        return submission.score_override
    if submission.score is None:
        return None
    if phase.track is Track.DEFENSE:
        final = (submission.results or {}).get("final_robust_accuracy")
        return float(final) if final is not None else submission.score
    return submission.score


def closes_at(session: Session, assignment: AssignmentSpec, phase: PhaseSpec) -> datetime:
    """When the last student's window closes: the deadline or the latest extension."""
    latest = session.scalar(
        select(func.max(Extension.due_at)).where(
            Extension.assignment_slug == assignment.slug, Extension.phase_id == phase.id
        )
    )
    if latest is not None and latest.tzinfo is None:  # SQLite drops the offset in aggregates
        latest = latest.replace(tzinfo=phase.due_at.tzinfo)
    return max(phase.due_at, latest) if latest is not None else phase.due_at


def is_revealed(
    session: Session, assignment: AssignmentSpec, phase: PhaseSpec, now: datetime | None = None
) -> bool:
    """Whether the private board is open to students."""
    revealed = session.scalar(
        select(BoardReveal.id).where(
            BoardReveal.assignment_slug == assignment.slug, BoardReveal.phase_id == phase.id
        )
    )
    if revealed is not None:
        return True
    auto = phase.leaderboard.reveal.value == "auto"
    return auto and (now or utcnow()) >= closes_at(session, assignment, phase)


def reveal(
    session: Session, *, actor: User, assignment: AssignmentSpec, phase: PhaseSpec, reason: str
) -> None:
    """Open the private board now (recorded in the audit log)."""
    if not actor.role.is_staff:
        raise Forbidden("Only course staff (TAs, instructors) can do this.")
    text = require_reason(reason)
    if is_revealed(session, assignment, phase):
        raise Conflict(f"The private board of phase {phase.id!r} is already open.")
    session.add(
        BoardReveal(assignment_slug=assignment.slug, phase_id=phase.id, revealed_by_id=actor.id)
    )
    session.add(
        AuditEvent(
            actor_id=actor.id,
            action=AuditAction.REVEAL,
            assignment_slug=assignment.slug,
            phase_id=phase.id,
            reason=text,
        )
    )
    session.commit()


@dataclass
class Standing:
    """One student's place in a phase."""

    user: User
    scored: list[Submission] = field(default_factory=list)
    """Their scored submissions, oldest first."""
    unscored: int = 0
    best_public: Submission | None = None
    public: float | None = None
    selected: Submission | None = None
    private: float | None = None

    @property
    def submissions(self) -> int:
        return len(self.scored) + self.unscored

    @property
    def last_at(self) -> datetime | None:
        return self.scored[-1].created_at if self.scored else None


def _better(a: float, b: float, higher: bool) -> bool:
    return a > b if higher else a < b


def _best(
    rows: list[Submission], score_of: Any, higher: bool
) -> tuple[Submission | None, float | None]:
    """The best row by ``score_of`` (ties: the earlier, since ``rows`` is oldest first)."""
    best, best_score = None, None
    for row in rows:
        score = score_of(row)
        if score is not None and (best_score is None or _better(score, best_score, higher)):
            best, best_score = row, score
    return best, best_score


def standings(session: Session, assignment: AssignmentSpec, phase: PhaseSpec) -> list[Standing]:
    """Every student with a submission in the phase, with their public best and final pick."""
    # Only what ranking reads: a board is looked at often, and decoding every row's JSON columns
    # would cost the API more than the uploads it is accepting (a column left out loads on use).
    columns = [
        Submission.user_id,
        Submission.status,
        Submission.score,
        Submission.score_override,
        Submission.marked_at,
        Submission.created_at,
    ]
    if phase.track is Track.DEFENSE or phase.leaderboard.public_models is not None:
        columns.append(Submission.results)  # the public or final score is inside
    rows = session.scalars(
        select(Submission)
        .options(load_only(*columns), selectinload(Submission.user))
        .where(
            Submission.assignment_slug == assignment.slug,
            Submission.phase_id == phase.id,
            Submission.status.in_((SubmissionStatus.SCORED, *UNSCORED_STATUSES)),
        )
        .order_by(Submission.created_at)
    ).all()
    higher = phase.scoring_metric.higher_is_better
    by_user: dict[int, Standing] = {}
    for row in rows:
        standing = by_user.setdefault(row.user_id, Standing(user=row.user))
        if row.status is SubmissionStatus.SCORED and row.final_score is not None:
            standing.scored.append(row)
        else:
            standing.unscored += 1
    for standing in by_user.values():
        standing.best_public, standing.public = _best(
            standing.scored, lambda r: public_score(assignment, phase, r), higher
        )
        standing.selected = _select(phase, standing, higher)
        if standing.selected is not None:
            standing.private = private_score(phase, standing.selected)
    return list(by_user.values())


def _select(phase: PhaseSpec, standing: Standing, higher: bool) -> Submission | None:
    rule = phase.leaderboard.selection
    if rule is Selection.LAST:
        return standing.scored[-1] if standing.scored else None
    if rule is Selection.MARKED:
        marked = [r for r in standing.scored if r.marked_at is not None]
        if marked:
            return _best(marked, lambda r: private_score(phase, r), higher)[0]
    return standing.best_public


def ranked(
    phase: PhaseSpec, rows: list[Standing], board: Board
) -> list[tuple[int | None, Standing, float | None]]:
    """(rank, standing, score) best first; ties go to the earlier submission. The private board
    also lists students without a scored submission, last and unranked."""
    higher = phase.scoring_metric.higher_is_better
    sign = -1.0 if higher else 1.0

    def entry(s: Standing) -> tuple[Submission | None, float | None]:
        return (s.best_public, s.public) if board is Board.PUBLIC else (s.selected, s.private)

    scored = [(s, *entry(s)) for s in rows if entry(s)[1] is not None]
    scored.sort(key=lambda t: (sign * (t[2] or 0.0), t[1].created_at if t[1] else utcnow()))
    result: list[tuple[int | None, Standing, float | None]] = [
        (rank, s, score) for rank, (s, _, score) in enumerate(scored, start=1)
    ]
    if board is Board.PUBLIC:
        return result
    unscored = sorted((s for s in rows if entry(s)[1] is None), key=lambda s: s.user.username)
    return result + [(None, s, None) for s in unscored]


def rounded(phase: PhaseSpec, score: float | None, *, staff: bool, revealed: bool) -> float | None:
    """The score as a student may see it during the phase (staff and open boards: exact)."""
    digits = phase.leaderboard.round_to
    if score is None or staff or revealed or digits is None:
        return score
    return round(score, digits)


AGGREGATE_KEYS = (
    "metric",
    "score",
    "clean_accuracy",
    "evaluator_version",
    "n_images",
    "n_points",
    "flags",
)


def student_view(
    phase: PhaseSpec, results: dict[str, Any] | None, *, revealed: bool
) -> dict[str, Any] | None:
    """What a student sees of their results: everything, or with ``feedback = "aggregate"``
    and the private board closed, only aggregate numbers (no per-model or per-attack lines)."""
    if results is None or phase.leaderboard.feedback is Feedback.FULL or revealed:
        return results
    view = {key: results[key] for key in AGGREGATE_KEYS if key in results}
    view["feedback"] = "aggregate: per-model and per-attack results open with the private board"
    return view


def set_mark(
    session: Session,
    *,
    user: User,
    submission: Submission,
    assignment: AssignmentSpec,
    phase: PhaseSpec,
    marked: bool,
) -> Submission:
    """Mark (or unmark) one of your scored submissions for the final selection, before your
    deadline (unmarking changes the selection as much as marking)."""
    if submission.user_id != user.id:
        raise NotFound(f"No submission {submission.id!r} among yours.")
    if utcnow() >= due_for(session, user, assignment, phase):
        raise PhaseClosed(
            f"{phase.title} is closed for you, so your final selection can no longer change."
        )
    if phase.leaderboard.selection is not Selection.MARKED:
        raise Conflict(
            f"Phase {phase.id!r} selects {SELECTION_RULES[phase.leaderboard.selection]}; "
            "there is nothing to mark."
        )
    if marked and submission.status is not SubmissionStatus.SCORED:
        raise Conflict("Only scored submissions can be marked; wait for the score.")
    if marked and submission.marked_at is None:
        count = session.scalar(
            select(func.count())
            .select_from(Submission)
            .where(
                Submission.user_id == user.id,
                Submission.assignment_slug == submission.assignment_slug,
                Submission.phase_id == submission.phase_id,
                Submission.marked_at.is_not(None),
            )
        )
        limit = phase.leaderboard.max_marked
        if (count or 0) >= limit:
            raise Conflict(
                f"You have already marked {limit} submissions (the most this phase allows); "
                "unmark one first."
            )
        submission.marked_at = utcnow()
    elif not marked:
        submission.marked_at = None
    session.commit()
    session.refresh(submission)
    return submission


GRADE_COLUMNS = (
    "student_id",
    "name",
    "email",
    "pseudonym",
    "submission_id",
    "final_score",
    "rank",
    "points",
    "max_points",
)


def _students(session: Session) -> list[User]:
    return list(
        session.scalars(select(User).where(User.role == Role.STUDENT).order_by(User.username))
    )


def phase_grades(
    session: Session, assignment: AssignmentSpec, phase: PhaseSpec
) -> dict[int, dict[str, Any]]:
    """user id -> their grade row for the phase, for every student (no submission: no score,
    no rank, 0 points)."""
    ranks = {
        s.user.id: (rank, s, score)
        for rank, s, score in ranked(phase, standings(session, assignment, phase), Board.PRIVATE)
    }
    max_points = phase.grading.points if phase.grading is not None else None
    grades: dict[int, dict[str, Any]] = {}
    for user in _students(session):
        rank, standing, score = ranks.get(user.id, (None, None, None))
        selected = standing.selected if standing is not None else None
        points = phase.grading.points_for(score) if phase.grading is not None else None
        grades[user.id] = {
            "student_id": csv_text(user.username),
            "name": csv_text(user.full_name or ""),
            "email": csv_text(user.email or ""),
            "pseudonym": csv_text(user.pseudonym),
            "submission_id": selected.id if selected is not None else "",
            "final_score": "" if score is None else f"{score:.6f}",
            "rank": "" if rank is None else rank,
            "points": "" if points is None else f"{points:g}",
            "max_points": "" if max_points is None else f"{max_points:g}",
        }
    return grades


def grades_csv(session: Session, assignment: AssignmentSpec, phase: PhaseSpec) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=GRADE_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(phase_grades(session, assignment, phase).values())
    return out.getvalue()


def assignment_grades_csv(session: Session, assignment: AssignmentSpec) -> str:
    """One row per student: each phase's final score and points, and the total."""
    per_phase = {phase.id: phase_grades(session, assignment, phase) for phase in assignment.phases}
    columns = ["student_id", "name", "email"]
    for phase in assignment.phases:
        columns += [f"{phase.id}_final_score", f"{phase.id}_rank", f"{phase.id}_points"]
    columns += ["total_points", "max_points"]
    max_total = sum(p.grading.points for p in assignment.phases if p.grading is not None)
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for user in _students(session):
        row: dict[str, Any] = {"student_id": csv_text(user.username)}
        row["name"], row["email"] = csv_text(user.full_name or ""), csv_text(user.email or "")
        total = 0.0
        for phase in assignment.phases:
            grade = per_phase[phase.id][user.id]
            row[f"{phase.id}_final_score"] = grade["final_score"]
            row[f"{phase.id}_rank"] = grade["rank"]
            row[f"{phase.id}_points"] = grade["points"]
            total += float(grade["points"] or 0.0)
        row["total_points"] = f"{total:g}"
        row["max_points"] = f"{max_total:g}"
        writer.writerow(row)
    return out.getvalue()


def submission_for(
    session: Session, catalog: Catalog, submission: Submission, *, viewer: User
) -> SubmissionPublic:
    """The API view of a submission as ``viewer`` may see it: staff see everything; students
    see their scores rounded and, with ``feedback = "aggregate"``, only aggregate results until
    the phase's private board opens."""
    public = to_public(session, submission, viewer=viewer)
    assignment = catalog.assignments.get(submission.assignment_slug)
    phase = assignment.phase(submission.phase_id) if assignment is not None else None
    if viewer.role.is_staff or phase is None or assignment is None:
        return public
    board = phase.leaderboard
    if board.feedback is Feedback.FULL and board.round_to is None:
        return public
    revealed = is_revealed(session, assignment, phase)
    results = student_view(phase, public.results, revealed=revealed)
    if results is not None and results.get("score") is not None:
        score = rounded(phase, results["score"], staff=False, revealed=revealed)
        results = {**results, "score": score}
    return public.model_copy(
        update={
            "score": rounded(phase, public.score, staff=False, revealed=revealed),
            "final_score": rounded(phase, public.final_score, staff=False, revealed=revealed),
            "results": results,
        }
    )
