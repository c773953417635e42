"""Reading submissions (your own, or every one for course staff) and cancelling them."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from server.deps import CurrentUser, SessionDep
from server.models import SubmissionStatus
from server.schemas import ReasonIn, SubmissionPublic, SubmissionsPublic
from server.services import staff, submissions

router = APIRouter(prefix="/submissions", tags=["submissions"])


@router.get("", response_model=SubmissionsPublic)
def list_submissions(
    session: SessionDep,
    user: CurrentUser,
    assignment: str | None = None,
    phase: str | None = None,
    status: SubmissionStatus | None = None,
    username: Annotated[str | None, Query(description="staff: one student's")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> SubmissionsPublic:
    rows, total = submissions.list_submissions(
        session=session,
        user=user,
        assignment=assignment,
        phase=phase,
        status=status,
        username=username,
        limit=limit,
        offset=offset,
    )
    return SubmissionsPublic(
        data=[submissions.to_public(session, row, viewer=user) for row in rows], count=total
    )


@router.get("/{submission_id}", response_model=SubmissionPublic)
def get_submission(submission_id: str, session: SessionDep, user: CurrentUser) -> SubmissionPublic:
    row = submissions.get_visible_submission(
        session=session, user=user, submission_id=submission_id
    )
    return submissions.to_public(session, row, viewer=user)


@router.post("/{submission_id}/cancel", response_model=SubmissionPublic)
def cancel_submission(
    submission_id: str, body: ReasonIn, session: SessionDep, user: CurrentUser
) -> SubmissionPublic:
    """Cancel a submission: your own while it is queued; staff any queued or running one (with a
    reason). A cancelled submission is not charged."""
    row = staff.cancel_submission(
        session, actor=user, submission_id=submission_id, reason=body.reason
    )
    return submissions.to_public(session, row, viewer=user)
