"""Course staff actions over the API: regrades, score overrides, extensions, the score export and
the audit log. Every change needs a reason and is recorded with who made it."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import Response

from server.deps import AssignmentDep, CatalogDep, SessionDep, SettingsDep, StaffUser
from server.models import AuditEvent, Extension
from server.schemas import (
    AuditEventPublic,
    AuditLogPublic,
    ExtensionIn,
    ExtensionPublic,
    ExtensionsPublic,
    OverrideIn,
    QuotaGrantIn,
    QuotaPublic,
    ReasonIn,
    RegradeCount,
    RegradePhaseIn,
    SubmissionPublic,
)
from server.services import boards, staff, submissions

router = APIRouter(tags=["staff"])
PHASE = "/assignments/{slug}/phases/{phase_id}"


@router.post("/submissions/{submission_id}/regrade", response_model=SubmissionPublic)
def regrade_submission(
    submission_id: str,
    body: ReasonIn,
    session: SessionDep,
    settings: SettingsDep,
    user: StaffUser,
) -> SubmissionPublic:
    """Queue a scored, failed or cancelled submission again (the earlier outcome is kept in the
    audit log; a score override stays)."""
    row = staff.regrade_submission(
        session, settings, actor=user, submission_id=submission_id, reason=body.reason
    )
    return submissions.to_public(session, row, viewer=user)


@router.post("/submissions/{submission_id}/override", response_model=SubmissionPublic)
def override_score(
    submission_id: str, body: OverrideIn, session: SessionDep, user: StaffUser
) -> SubmissionPublic:
    """Set the score that counts for a submission (`score: null` clears the override)."""
    row = staff.override_score(
        session, actor=user, submission_id=submission_id, score=body.score, reason=body.reason
    )
    return submissions.to_public(session, row, viewer=user)


@router.post(f"{PHASE}/regrade", response_model=RegradeCount)
def regrade_phase(
    phase_id: str,
    body: RegradePhaseIn,
    assignment: AssignmentDep,
    catalog: CatalogDep,
    session: SessionDep,
    settings: SettingsDep,
    user: StaffUser,
) -> RegradeCount:
    """Queue again every finished submission of the phase, or only the failed ones."""
    queued = staff.regrade_phase(
        session,
        settings,
        actor=user,
        assignment=assignment,
        phase=catalog.phase(assignment, phase_id),
        reason=body.reason,
        only_failed=body.only_failed,
    )
    return RegradeCount(queued=queued)


def _extension_public(extension: Extension) -> ExtensionPublic:
    return ExtensionPublic(
        username=extension.user.username,
        due_at=extension.due_at,
        reason=extension.reason,
        granted_by=extension.granted_by.username,
        created_at=extension.created_at,
    )


@router.get(f"{PHASE}/extensions", response_model=ExtensionsPublic)
def list_extensions(
    phase_id: str,
    assignment: AssignmentDep,
    catalog: CatalogDep,
    session: SessionDep,
    _: StaffUser,
) -> ExtensionsPublic:
    rows = staff.list_extensions(session, assignment, catalog.phase(assignment, phase_id))
    return ExtensionsPublic(data=[_extension_public(row) for row in rows])


@router.put(f"{PHASE}/extensions/{{username}}", response_model=ExtensionPublic)
def grant_extension(
    phase_id: str,
    username: str,
    body: ExtensionIn,
    assignment: AssignmentDep,
    catalog: CatalogDep,
    session: SessionDep,
    user: StaffUser,
) -> ExtensionPublic:
    """Give one student a later deadline for this phase (replaces an earlier extension)."""
    extension = staff.grant_extension(
        session,
        actor=user,
        assignment=assignment,
        phase=catalog.phase(assignment, phase_id),
        username=username,
        due_at=body.due_at,
        reason=body.reason,
    )
    return _extension_public(extension)


@router.delete(f"{PHASE}/extensions/{{username}}", status_code=204)
def revoke_extension(
    phase_id: str,
    username: str,
    assignment: AssignmentDep,
    catalog: CatalogDep,
    session: SessionDep,
    user: StaffUser,
    reason: Annotated[str, Query(max_length=2000, description="recorded in the audit log")] = "",
) -> Response:
    staff.revoke_extension(
        session,
        actor=user,
        assignment=assignment,
        phase=catalog.phase(assignment, phase_id),
        username=username,
        reason=reason,
    )
    return Response(status_code=204)


@router.get(
    f"{PHASE}/scores.csv", responses={200: {"content": {"text/csv": {}}}}, response_class=Response
)
def export_scores(
    phase_id: str,
    assignment: AssignmentDep,
    catalog: CatalogDep,
    session: SessionDep,
    _: StaffUser,
) -> Response:
    """Each student's best scored submission by final score, as CSV (columns: see the README)."""
    text = staff.export_scores_csv(
        session, assignment=assignment, phase=catalog.phase(assignment, phase_id)
    )
    return _csv(text, f"{assignment.slug}-{phase_id}-scores.csv")


def _event_public(event: AuditEvent) -> AuditEventPublic:
    return AuditEventPublic(
        id=event.id,
        at=event.created_at,
        actor=event.actor.username,
        action=event.action.value,
        assignment=event.assignment_slug,
        phase=event.phase_id,
        submission_id=event.submission_id,
        subject=event.subject.username if event.subject is not None else None,
        reason=event.reason,
        details=event.details,
    )


@router.get("/audit", response_model=AuditLogPublic)
def audit_log(
    session: SessionDep,
    _: StaffUser,
    limit: Annotated[int, Query(ge=1, le=1000)] = 200,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> AuditLogPublic:
    """Every staff action (and students' own cancels), newest first."""
    events = staff.audit_log(session, limit=limit, offset=offset)
    return AuditLogPublic(data=[_event_public(event) for event in events])


@router.put(f"{PHASE}/quota/{{username}}", response_model=QuotaPublic)
def raise_quota(
    phase_id: str,
    username: str,
    body: QuotaGrantIn,
    assignment: AssignmentDep,
    catalog: CatalogDep,
    session: SessionDep,
    user: StaffUser,
) -> QuotaPublic:
    """Give one student extra submissions in this phase (per day and in total; zeros take the
    grant back); answers with the student's quota as it is now."""
    phase = catalog.phase(assignment, phase_id)
    grant = staff.raise_quota(
        session,
        actor=user,
        assignment=assignment,
        phase=phase,
        username=username,
        extra_per_day=body.extra_per_day,
        extra_total=body.extra_total,
        reason=body.reason,
    )
    return submissions.quota(session=session, user=grant.user, assignment=assignment, phase=phase)


@router.post(f"{PHASE}/reveal", status_code=204)
def reveal_private_board(
    phase_id: str,
    body: ReasonIn,
    assignment: AssignmentDep,
    catalog: CatalogDep,
    session: SessionDep,
    user: StaffUser,
) -> Response:
    """Open the phase's private board to students now (it opens by itself when the phase and
    every extension have closed, unless the spec says `reveal = "manual"`)."""
    boards.reveal(
        session,
        actor=user,
        assignment=assignment,
        phase=catalog.phase(assignment, phase_id),
        reason=body.reason,
    )
    return Response(status_code=204)


def _csv(text: str, name: str) -> Response:
    return Response(
        text,
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="{name}"'},
    )


@router.get(
    f"{PHASE}/grades.csv", responses={200: {"content": {"text/csv": {}}}}, response_class=Response
)
def export_phase_grades(
    phase_id: str,
    assignment: AssignmentDep,
    catalog: CatalogDep,
    session: SessionDep,
    _: StaffUser,
) -> Response:
    """Every student's final (private) score, rank and points for the phase, as CSV; students
    without a scored submission get no score, no rank and 0 points (columns: see the README)."""
    phase = catalog.phase(assignment, phase_id)
    return _csv(
        boards.grades_csv(session, assignment, phase), f"{assignment.slug}-{phase_id}-grades.csv"
    )


@router.get(
    "/assignments/{slug}/grades.csv",
    responses={200: {"content": {"text/csv": {}}}},
    response_class=Response,
)
def export_assignment_grades(
    assignment: AssignmentDep, session: SessionDep, _: StaffUser
) -> Response:
    """One row per student: each phase's final score, rank and points, and the total."""
    return _csv(boards.assignment_grades_csv(session, assignment), f"{assignment.slug}-grades.csv")
