"""Phase leaderboards (public and private boards, under pseudonyms; see
:mod:`server.services.boards`) and the defense x attack transfer matrix."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from server.assignments import AssignmentSpec, Metric, PhaseSpec
from server.errors import Forbidden
from server.models import Submission, TransferResult, User
from server.schemas import (
    LeaderboardEntry,
    LeaderboardPublic,
    TransferCell,
    TransferMatrixPublic,
    TransferRow,
)
from server.services.boards import (
    SELECTION_RULES,
    Board,
    is_revealed,
    ranked,
    rounded,
    standings,
)
from server.services.submissions import latest_scored_per_student

BOARD_RULES = {
    Metric.MEAN_ACCURACY: "the mean accuracy of the hidden models on the submitted images (lower "
    "is better)",
    Metric.ROBUST_ACCURACY: "robust accuracy under the phase's attack suite (higher is better)",
}


def _describe(phase: PhaseSpec, board: Board, revealed: bool) -> str:
    metric = BOARD_RULES[phase.scoring_metric]
    if board is Board.PUBLIC:
        subset = ""
        if phase.leaderboard.public_models is not None:
            subset = f" on the public models ({', '.join(phase.leaderboard.public_models)})"
        elif phase.leaderboard.public_fraction is not None:
            share = phase.leaderboard.public_fraction
            subset = f" on the public {share:.0%} of the evaluation points"
        opens = "is open" if revealed else "opens when the phase closes"
        if not revealed and phase.leaderboard.reveal.value == "manual":
            opens = "opens when the course staff reveal it"
        return (
            f"Public board: each student's best score{subset}, {metric}; ties go to the earlier "
            f"submission. The private board, which decides grades, {opens}."
        )
    return (
        f"Private board: for each student {SELECTION_RULES[phase.leaderboard.selection]}, scored "
        f"on everything ({metric}); ties go to the earlier submission; students without a "
        "scored submission come last."
    )


def leaderboard(
    *,
    session: Session,
    assignment: AssignmentSpec,
    phase: PhaseSpec,
    viewer: User | None,
    board: Board | None = None,
) -> LeaderboardPublic:
    """The phase's public board, or its private board once revealed (staff may ask for either);
    staff also see usernames and submission ids, anonymous viewers (public courses) only
    pseudonyms. Students see scores rounded as the phase says until the private board opens."""
    staff = viewer is not None and viewer.role.is_staff
    revealed = is_revealed(session, assignment, phase)
    if board is None:
        board = Board.PRIVATE if revealed else Board.PUBLIC
    if board is Board.PRIVATE and not (revealed or staff):
        raise Forbidden(
            f"The private board of phase {phase.id!r} opens when the phase closes; until then "
            "only the public board is shown."
        )
    viewer_id = viewer.id if viewer is not None else None
    entries = []
    for rank, standing, score in ranked(phase, standings(session, assignment, phase), board):
        shown = standing.best_public if board is Board.PUBLIC else standing.selected
        entries.append(
            LeaderboardEntry(
                rank=rank,
                pseudonym=standing.user.pseudonym,
                username=standing.user.username if staff else None,
                score=rounded(phase, score, staff=staff, revealed=revealed),
                submission_id=(
                    shown.id
                    if shown is not None and (staff or standing.user.id == viewer_id)
                    else None
                ),
                submissions=standing.submissions,
                best_submitted_at=shown.created_at if shown is not None else None,
                last_submitted_at=standing.last_at,
                is_you=standing.user.id == viewer_id,
            )
        )
    return LeaderboardPublic(
        assignment=assignment.slug,
        phase=phase.id,
        metric=phase.scoring_metric.value,
        board=board.value,
        revealed=revealed,
        selection=_describe(phase, board, revealed),
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
