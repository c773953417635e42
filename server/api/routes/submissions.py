"""Reading submissions (your own, or every one for course staff) and cancelling them."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from server.deps import CurrentUser, SessionDep, SettingsDep
from server.models import SubmissionStatus
from server.schemas import (
    ReasonIn,
    ReceiptCheck,
    ReceiptPublic,
    SubmissionPublic,
    SubmissionsPublic,
)
from server.services import receipts, staff, submissions

router = APIRouter(prefix="/submissions", tags=["submissions"])
receipts_router = APIRouter(tags=["submissions"])


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


@router.get("/{submission_id}/receipt", response_model=ReceiptPublic)
def get_receipt(
    submission_id: str, session: SessionDep, settings: SettingsDep, user: CurrentUser
) -> ReceiptPublic:
    """A signed receipt of a scored submission (file hash, evaluator version, seed, hidden-model
    hashes, score) to keep for an appeal; `POST /api/v1/receipts/verify` checks it."""
    row = submissions.get_visible_submission(
        session=session, user=user, submission_id=submission_id
    )
    return ReceiptPublic(**receipts.issue_receipt(row, settings.secret_key))


@receipts_router.post("/receipts/verify", response_model=ReceiptCheck)
def verify_receipt(
    body: ReceiptPublic, session: SessionDep, settings: SettingsDep, _: CurrentUser
) -> ReceiptCheck:
    """Check a receipt: was it signed by this server, and does the record still say the same?"""
    return ReceiptCheck(
        **receipts.verify_receipt(session, body.receipt, body.signature, settings.secret_key)
    )
