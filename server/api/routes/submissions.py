"""Reading submissions (your own, or every one for course staff) and cancelling them."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from sqlalchemy.orm import Session

from server.catalog import Catalog
from server.deps import CatalogDep, CurrentUser, SessionDep, SettingsDep
from server.errors import NotFound
from server.models import SubmissionStatus, User
from server.schemas import (
    ReasonIn,
    ReceiptCheck,
    ReceiptPublic,
    SubmissionPublic,
    SubmissionsPublic,
)
from server.services import boards, receipts, staff, submissions

router = APIRouter(prefix="/submissions", tags=["submissions"])
receipts_router = APIRouter(tags=["submissions"])


@router.get("", response_model=SubmissionsPublic)
def list_submissions(
    session: SessionDep,
    catalog: CatalogDep,
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
        data=[boards.submission_for(session, catalog, row, viewer=user) for row in rows],
        count=total,
    )


@router.get("/{submission_id}", response_model=SubmissionPublic)
def get_submission(
    submission_id: str, session: SessionDep, catalog: CatalogDep, user: CurrentUser
) -> SubmissionPublic:
    row = submissions.get_visible_submission(
        session=session, user=user, submission_id=submission_id
    )
    return boards.submission_for(session, catalog, row, viewer=user)


@router.put("/{submission_id}/mark", response_model=SubmissionPublic)
def mark_submission(
    submission_id: str, session: SessionDep, catalog: CatalogDep, user: CurrentUser
) -> SubmissionPublic:
    """Mark one of your scored submissions for the final selection (phases whose selection is
    `marked`; at most the phase's `max_marked`)."""
    return _set_mark(submission_id, session, catalog, user, marked=True)


@router.delete("/{submission_id}/mark", response_model=SubmissionPublic)
def unmark_submission(
    submission_id: str, session: SessionDep, catalog: CatalogDep, user: CurrentUser
) -> SubmissionPublic:
    return _set_mark(submission_id, session, catalog, user, marked=False)


def _set_mark(
    submission_id: str, session: Session, catalog: Catalog, user: User, *, marked: bool
) -> SubmissionPublic:
    row = submissions.get_visible_submission(
        session=session, user=user, submission_id=submission_id
    )
    assignment = catalog.assignments.get(row.assignment_slug)
    phase = assignment.phase(row.phase_id) if assignment is not None else None
    if assignment is None or phase is None:
        raise NotFound(f"The phase of submission {row.id} is no longer in the catalog.")
    boards.set_mark(
        session, user=user, submission=row, assignment=assignment, phase=phase, marked=marked
    )
    return boards.submission_for(session, catalog, row, viewer=user)


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
