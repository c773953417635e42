"""Phase leaderboards (each student's best scored submission, under a pseudonym) and the
defense x attack transfer matrix."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from server.assignments import AssignmentSpec, Metric, PhaseSpec
from server.models import Submission, TransferResult, User
from server.schemas import (
    LeaderboardEntry,
    LeaderboardPublic,
    TransferCell,
    TransferMatrixPublic,
    TransferRow,
)
from server.services.submissions import latest_scored_per_student, scored_in_phase

SELECTION = {
    Metric.MEAN_ACCURACY: (
        "Best scored submission per student: the lowest mean accuracy of the hidden models on "
        "the submitted images (lower is better); ties go to the earlier submission. Only scored "
        "submissions are ranked."
    ),
    Metric.ROBUST_ACCURACY: (
        "Best scored submission per student: the highest robust accuracy under the phase's "
        "leaderboard attack suite (higher is better); ties go to the earlier submission. Only "
        "scored submissions are ranked."
    ),
}


@dataclass
class _Standing:
    user: User
    best: Submission
    count: int
    last_at: datetime


def leaderboard(
    *, session: Session, assignment: AssignmentSpec, phase: PhaseSpec, viewer: User | None
) -> LeaderboardPublic:
    """The phase's ranking by final score (a staff override replaces the grader's score); staff
    also see usernames and submission ids, anonymous viewers (public boards) only pseudonyms."""
    rows = scored_in_phase(session, assignment.slug, phase.id)
    sign = -1.0 if phase.scoring_metric.higher_is_better else 1.0
    standings: dict[int, _Standing] = {}
    for row in rows:
        if row.final_score is None:
            continue
        standing = standings.get(row.user_id)
        if standing is None:
            standings[row.user_id] = _Standing(row.user, row, 1, row.created_at)
            continue
        standing.count += 1
        standing.last_at = row.created_at
        if sign * (row.final_score or 0.0) < sign * (standing.best.final_score or 0.0):
            standing.best = row
    ordered = sorted(
        standings.values(), key=lambda s: (sign * (s.best.final_score or 0.0), s.best.created_at)
    )
    staff = viewer is not None and viewer.role.is_staff
    viewer_id = viewer.id if viewer is not None else None
    entries = [
        LeaderboardEntry(
            rank=rank,
            pseudonym=s.user.pseudonym,
            username=s.user.username if staff else None,
            score=float(s.best.final_score or 0.0),
            submission_id=s.best.id if staff or s.user.id == viewer_id else None,
            submissions=s.count,
            best_submitted_at=s.best.created_at,
            last_submitted_at=s.last_at,
            is_you=s.user.id == viewer_id,
        )
        for rank, s in enumerate(ordered, start=1)
    ]
    return LeaderboardPublic(
        assignment=assignment.slug,
        phase=phase.id,
        metric=phase.scoring_metric.value,
        selection=SELECTION[phase.scoring_metric],
        entries=entries,
    )


TRANSFER_DESCRIPTION = (
    "Accuracy of each student's latest scored defense (rows) on each student's latest scored "
    "attack batch of the phases listed in transfer_from (cells); lower means the batch transfers "
    "better. Cells are added as new submissions are scored."
)


def transfer_matrix(
    *, session: Session, assignment: AssignmentSpec, phase: PhaseSpec, viewer: User
) -> TransferMatrixPublic:
    """The defense x attack matrix of a defense phase. Staff see every row; a student sees the
    rows of their own defenses, with attackers under their pseudonyms."""
    staff = viewer.role.is_staff
    rows = []
    for defense in latest_scored_per_student(session, assignment.slug, phase.id):
        if not staff and defense.user_id != viewer.id:
            continue
        cells = session.execute(
            select(TransferResult, Submission)
            .join(Submission, Submission.id == TransferResult.attack_submission_id)
            .where(TransferResult.defense_submission_id == defense.id)
            .order_by(Submission.phase_id, Submission.created_at)
        ).all()
        rows.append(
            TransferRow(
                defense_submission_id=defense.id,
                defender=defense.user.username if staff else defense.user.pseudonym,
                robust_accuracy=defense.score,
                cells=[
                    TransferCell(
                        attack_submission_id=attack.id if staff else None,
                        attack_phase=attack.phase_id,
                        attacker=attack.user.username if staff else attack.user.pseudonym,
                        accuracy=result.accuracy,
                        n_points=result.n_points,
                    )
                    for result, attack in cells
                ],
            )
        )
    return TransferMatrixPublic(
        assignment=assignment.slug, phase=phase.id, description=TRANSFER_DESCRIPTION, rows=rows
    )
