"""The TA pages: the dashboard (queues, workers, every submission with filters, the roster
import), one submission with its log and the cancel, regrade and override forms, a phase's
regrade-all, extensions, quota grants, private-board reveal and the score and grade exports, and
the audit log. Every action goes through a service (:mod:`server.services.staff`,
:mod:`~server.services.boards`, :mod:`~server.services.accounts`), which records it; the forms
answer with a redirect and a flash message (post/redirect/get), except the roster import, whose
invitation codes are shown on the page that answers it, once."""

from __future__ import annotations

import math
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.datastructures import FormData, UploadFile

from server.config import Settings
from server.deps import CatalogDep, SessionDep, SettingsDep
from server.errors import Conflict, Forbidden, NotFound, ServiceError
from server.services import accounts, boards, staff
from server.services import submissions as submission_service
from server.services.health import health
from server.web import staff_views, views
from server.web.common import (
    CheckedForm,
    Flash,
    FormPost,
    StaffPageUser,
    local_time,
    percent,
    redirect,
    render,
)

router = APIRouter(prefix="/ta", include_in_schema=False)

PAGE_SIZE = 50
AUDIT_PAGE_SIZE = 100
ROSTER_URL = "/ta#roster-heading"


def require_staff_form(posted: CheckedForm) -> FormPost:
    """A form posted by staff (its CSRF token checked first)."""
    if not posted.user.role.is_staff:
        raise Forbidden("Only course staff (TAs, instructors) can do this.")
    return posted


StaffForm = Annotated[FormPost, Depends(require_staff_form)]


def submission_page_url(submission_id: str) -> str:
    return f"/ta/submissions/{submission_id}"


def phase_page_url(slug: str, phase_id: str) -> str:
    return f"/ta/assignments/{slug}/phases/{phase_id}"


def _field(form: FormData, name: str) -> str:
    value = form.get(name)
    return value.strip() if isinstance(value, str) else ""


def _refused(url: str, settings: Settings, exc: ServiceError) -> RedirectResponse:
    """Back to the form's page with why nothing was changed and what to do instead."""
    reason = exc.message if exc.message.endswith((".", "?", ")")) else f"{exc.message}."
    if isinstance(exc, staff.MissingReason):
        message = f"Nothing was changed. {reason}"
    elif isinstance(exc, Conflict):
        message = f"Nothing was changed: {reason} The page now shows its current state."
    elif isinstance(exc, NotFound):
        message = f"Nothing was changed: {reason} Check the spelling and try again."
    else:
        message = f"Nothing was changed: {reason}"
    return redirect(url, settings, Flash("error", message))


def _refuse(url: str, settings: Settings, message: str) -> RedirectResponse:
    return redirect(url, settings, Flash("error", f"Nothing was changed: {message}"))


# --- Dashboard --------------------------------------------------------------------------------


@router.get("", response_class=HTMLResponse)
def dashboard(
    request: Request,
    user: StaffPageUser,
    session: SessionDep,
    settings: SettingsDep,
    catalog: CatalogDep,
    phase: str = "",
    status: str = "",
    student: str = "",
    page: int = 1,
) -> HTMLResponse:
    """Queues and live workers, submissions per status, each phase's actions, and every
    submission (filtered by phase, status and student)."""
    filters = staff_views.parse_filters(
        session=session, catalog=catalog, phase=phase, status=status, student=student
    )
    page = max(1, page)
    rows, total = submission_service.list_submissions(
        session=session,
        user=user,
        assignment=filters.assignment,
        phase=filters.phase,
        status=filters.status,
        username=filters.username,
        limit=PAGE_SIZE,
        offset=(page - 1) * PAGE_SIZE,
    )
    return render(
        request,
        "ta_dashboard.html",
        {
            "health": health(session=session, settings=settings),
            "counts": staff_views.status_counts(session),
            "phases": staff_views.phase_summaries(session, catalog),
            "options": staff_views.phase_options(catalog),
            "students": staff_views.usernames(session),
            "filters": filters,
            "rows": staff_views.submission_rows(catalog, rows),
            "total": total,
            "page": page,
            "pages": max(1, -(-total // PAGE_SIZE)),
            "failure_title": staff_views.failure_title,
            "submission_page_url": submission_page_url,
            "phase_page_url": phase_page_url,
            "active": "ta",
        },
        viewer=user,
    )


# --- One submission ---------------------------------------------------------------------------


@router.get("/submissions/{submission_id}", response_class=HTMLResponse)
def submission_page(
    submission_id: str,
    request: Request,
    user: StaffPageUser,
    session: SessionDep,
    catalog: CatalogDep,
) -> HTMLResponse:
    """Everything about one submission for staff (owner, scores, attempts, failure, the full
    grader log, its audit history) and the forms that act on it."""
    row = submission_service.get_visible_submission(
        session=session, user=user, submission_id=submission_id
    )
    public = submission_service.to_public(session, row, viewer=user)
    assignment = catalog.assignments.get(row.assignment_slug)
    return render(
        request,
        "ta_submission.html",
        {
            "row": row,
            "public": public,
            "assignment": assignment,
            "phase": assignment.phase(row.phase_id) if assignment is not None else None,
            "zone": staff_views.course_zone(catalog, row.assignment_slug),
            "status": views.status_view(public),
            "cancellable": row.status in staff.CANCELLABLE,
            "regradable": row.status in staff.REGRADABLE,
            "failure_title": staff_views.failure_title(row.failure_cause),
            "failure_advice": staff_views.failure_advice(row.failure_cause),
            "history": staff_views.submission_history(session, catalog, row),
            "phase_page_url": phase_page_url,
            "active": "ta",
        },
        viewer=user,
    )


@router.post("/submissions/{submission_id}/cancel")
def cancel(
    submission_id: str, posted: StaffForm, session: SessionDep, settings: SettingsDep
) -> RedirectResponse:
    url = submission_page_url(submission_id)
    try:
        row = staff.cancel_submission(
            session,
            actor=posted.user,
            submission_id=submission_id,
            reason=_field(posted.form, "reason"),
        )
    except ServiceError as exc:
        return _refused(url, settings, exc)
    return redirect(
        url,
        settings,
        Flash(
            "success",
            f"Submission {row.id[:8]} is cancelled. The student sees: "
            f"\u201c{row.error_message}\u201d",
        ),
    )


@router.post("/submissions/{submission_id}/regrade")
def regrade(
    submission_id: str, posted: StaffForm, session: SessionDep, settings: SettingsDep
) -> RedirectResponse:
    url = submission_page_url(submission_id)
    try:
        row = staff.regrade_submission(
            session,
            settings,
            actor=posted.user,
            submission_id=submission_id,
            reason=_field(posted.form, "reason"),
        )
    except ServiceError as exc:
        return _refused(url, settings, exc)
    return redirect(
        url,
        settings,
        Flash(
            "success",
            f"Submission {row.id[:8]} is queued again. Its previous outcome is kept in the "
            "audit log; a score override stays until you clear it.",
        ),
    )


@router.post("/submissions/{submission_id}/override")
def override(
    submission_id: str, posted: StaffForm, session: SessionDep, settings: SettingsDep
) -> RedirectResponse:
    url = submission_page_url(submission_id)
    raw = _field(posted.form, "score").replace(",", ".")
    score: float | None = None
    if raw:
        try:
            score = float(raw)
        except ValueError:
            score = math.nan
        if not math.isfinite(score):
            return _refuse(
                url,
                settings,
                f"{raw!r} is not a score. Type a fraction between 0 and 1 (0.42 means 42 %), "
                "or leave it empty to clear the override.",
            )
    else:
        row = submission_service.get_visible_submission(
            session=session, user=posted.user, submission_id=submission_id
        )
        if row.score_override is None:
            return _refuse(
                url,
                settings,
                "type the score that should count, a fraction between 0 and 1 (0.42 means "
                "42 %). An empty score clears an override, and this submission has none.",
            )
    try:
        row = staff.override_score(
            session,
            actor=posted.user,
            submission_id=submission_id,
            score=score,
            reason=_field(posted.form, "reason"),
        )
    except ServiceError as exc:
        return _refused(url, settings, exc)
    grader = percent(row.score, 2)
    if score is None:
        message = f"The override is cleared; the grader's score ({grader}) counts again."
    else:
        message = (
            f"The score that counts for submission {row.id[:8]} is now {percent(score, 2)} "
            f"(the grader's: {grader}); leaderboards and the score export use it."
        )
    return redirect(url, settings, Flash("success", message))


# --- A phase ----------------------------------------------------------------------------------


@router.get("/assignments/{slug}/phases/{phase_id}", response_class=HTMLResponse)
def phase_page(
    slug: str,
    phase_id: str,
    request: Request,
    user: StaffPageUser,
    session: SessionDep,
    catalog: CatalogDep,
) -> HTMLResponse:
    """A phase's staff actions: regrade all or the failed ones, extensions, quota grants, the
    private board's reveal, the score and grade exports."""
    assignment = views.find_assignment(catalog, slug)
    phase = catalog.phase(assignment, phase_id)
    (summary,) = staff_views.phase_summaries(session, catalog, only=(assignment, phase))
    api = f"/api/v1/assignments/{slug}/phases/{phase_id}"
    return render(
        request,
        "ta_phase.html",
        {
            "summary": summary,
            "assignment": assignment,
            "phase": phase,
            "extensions": staff.list_extensions(session, assignment, phase),
            "quota_grants": staff_views.quota_grants(session, assignment, phase),
            "students": staff_views.usernames(session),
            "deadline_min": staff_views.local_input_value(phase.due_at, assignment.zone),
            "export_url": f"{api}/scores.csv",
            "export_columns": staff.EXPORT_COLUMNS,
            "grades_url": f"{api}/grades.csv",
            "grade_columns": boards.GRADE_COLUMNS,
            "revealed": boards.is_revealed(session, assignment, phase),
            "closes_at": boards.closes_at(session, assignment, phase),
            "selection_rule": boards.SELECTION_RULES[phase.leaderboard.selection],
            "max_extra": staff.MAX_EXTRA_SUBMISSIONS,
            "phase_page_url": phase_page_url,
            "active": "ta",
        },
        viewer=user,
    )


@router.post("/assignments/{slug}/phases/{phase_id}/reveal")
def reveal_board(
    slug: str,
    phase_id: str,
    posted: StaffForm,
    session: SessionDep,
    settings: SettingsDep,
    catalog: CatalogDep,
) -> RedirectResponse:
    assignment = views.find_assignment(catalog, slug)
    phase = catalog.phase(assignment, phase_id)
    url = phase_page_url(slug, phase_id)
    try:
        boards.reveal(
            session,
            actor=posted.user,
            assignment=assignment,
            phase=phase,
            reason=_field(posted.form, "reason"),
        )
    except ServiceError as exc:
        return _refused(url, settings, exc)
    return redirect(
        url,
        settings,
        Flash(
            "success",
            f"The private board of {phase.title} is open: students now see it, their final "
            "selection and their full results.",
        ),
    )


@router.post("/assignments/{slug}/phases/{phase_id}/quota")
def raise_quota(
    slug: str,
    phase_id: str,
    posted: StaffForm,
    session: SessionDep,
    settings: SettingsDep,
    catalog: CatalogDep,
) -> RedirectResponse:
    assignment = views.find_assignment(catalog, slug)
    phase = catalog.phase(assignment, phase_id)
    url = phase_page_url(slug, phase_id)
    username = _field(posted.form, "username")
    if not username:
        return _refuse(url, settings, "give the username of the student.")
    extra: dict[str, int] = {}
    for name, words in (("extra_per_day", "extra per day"), ("extra_total", "extra in total")):
        raw = _field(posted.form, name) or "0"
        try:
            extra[name] = int(raw)
        except ValueError:
            return _refuse(
                url, settings, f"{words} must be a whole number of submissions, not {raw!r}."
            )
    try:
        grant = staff.raise_quota(
            session,
            actor=posted.user,
            assignment=assignment,
            phase=phase,
            username=username,
            reason=_field(posted.form, "reason"),
            **extra,
        )
    except ServiceError as exc:
        return _refused(url, settings, exc)
    quota = submission_service.quota(
        session=session, user=grant.user, assignment=assignment, phase=phase
    )
    per_day = "no daily limit" if quota.max_per_day is None else f"{quota.max_per_day} per day"
    total = "no limit in total" if quota.max_total is None else f"{quota.max_total} in total"
    return redirect(
        url,
        settings,
        Flash(
            "success",
            f"{username} may now submit {per_day} and {total} to {phase.title} "
            f"(+{grant.extra_per_day} per day, +{grant.extra_total} in total).",
        ),
    )


@router.post("/assignments/{slug}/phases/{phase_id}/regrade")
def regrade_phase(
    slug: str,
    phase_id: str,
    posted: StaffForm,
    session: SessionDep,
    settings: SettingsDep,
    catalog: CatalogDep,
) -> RedirectResponse:
    assignment = views.find_assignment(catalog, slug)
    phase = catalog.phase(assignment, phase_id)
    url = phase_page_url(slug, phase_id)
    which = _field(posted.form, "which")
    if which not in ("failed", "all"):
        return _refuse(url, settings, "choose which submissions to regrade: failed only, or all.")
    if _field(posted.form, "confirm") != "yes":
        return _refuse(
            url,
            settings,
            "tick the box that confirms the regrade; it queues the submissions again and "
            "their scores leave the leaderboard until they are scored anew.",
        )
    try:
        queued = staff.regrade_phase(
            session,
            settings,
            actor=posted.user,
            assignment=assignment,
            phase=phase,
            reason=_field(posted.form, "reason"),
            only_failed=which == "failed",
        )
    except ServiceError as exc:
        return _refused(url, settings, exc)
    if queued == 0:
        nothing = "failed" if which == "failed" else "finished"
        return redirect(
            url, settings, Flash("info", f"{phase.title} has no {nothing} submissions to regrade.")
        )
    counted = "1 submission" if queued == 1 else f"{queued} submissions"
    verb = "is" if queued == 1 else "are"
    return redirect(
        url,
        settings,
        Flash(
            "success",
            f"{counted} of {phase.title} {verb} queued again; the dashboard shows their progress.",
        ),
    )


@router.post("/assignments/{slug}/phases/{phase_id}/extensions")
def grant_extension(
    slug: str,
    phase_id: str,
    posted: StaffForm,
    session: SessionDep,
    settings: SettingsDep,
    catalog: CatalogDep,
) -> RedirectResponse:
    assignment = views.find_assignment(catalog, slug)
    phase = catalog.phase(assignment, phase_id)
    url = phase_page_url(slug, phase_id)
    username = _field(posted.form, "username")
    if not username:
        return _refuse(url, settings, "give the username of the student to extend.")
    try:
        due_at = staff_views.parse_local_deadline(_field(posted.form, "due_at"), assignment.zone)
    except staff_views.DeadlineInvalid as exc:
        return _refuse(url, settings, str(exc))
    try:
        extension = staff.grant_extension(
            session,
            actor=posted.user,
            assignment=assignment,
            phase=phase,
            username=username,
            due_at=due_at,
            reason=_field(posted.form, "reason"),
        )
    except ServiceError as exc:
        return _refused(url, settings, exc)
    when = local_time(extension.due_at, assignment.zone)
    return redirect(
        url, settings, Flash("success", f"{username}'s deadline for {phase.title} is now {when}.")
    )


@router.post("/assignments/{slug}/phases/{phase_id}/extensions/{username}/revoke")
def revoke_extension(
    slug: str,
    phase_id: str,
    username: str,
    posted: StaffForm,
    session: SessionDep,
    settings: SettingsDep,
    catalog: CatalogDep,
) -> RedirectResponse:
    assignment = views.find_assignment(catalog, slug)
    phase = catalog.phase(assignment, phase_id)
    url = phase_page_url(slug, phase_id)
    try:
        staff.revoke_extension(
            session,
            actor=posted.user,
            assignment=assignment,
            phase=phase,
            username=username,
            reason=_field(posted.form, "reason"),
        )
    except ServiceError as exc:
        return _refused(url, settings, exc)
    when = local_time(phase.due_at, assignment.zone)
    return redirect(
        url,
        settings,
        Flash(
            "success",
            f"{username}'s extension is revoked; their deadline for {phase.title} "
            f"is the phase's again, {when}.",
        ),
    )


# --- Roster -----------------------------------------------------------------------------------


@router.post("/roster", response_class=HTMLResponse)
def import_roster(
    request: Request,
    posted: StaffForm,
    session: SessionDep,
    settings: SettingsDep,
    catalog: CatalogDep,
) -> Response:
    """Create or update the students of a CSV roster and show each new invitation code with its
    link, on this page only (the codes are stored hashed). A bad roster imports nobody and goes
    back to the dashboard with every problem named."""
    upload = posted.form.get("file")
    if not isinstance(upload, UploadFile) or not upload.filename:
        return _refuse(ROSTER_URL, settings, "choose the roster's CSV file.")
    content = upload.file.read(accounts.MAX_ROSTER_BYTES + 1)
    try:
        imported = accounts.import_roster(
            session,
            actor=posted.user,
            content=content,
            secret_key=settings.secret_key,
            lifetime_s=settings.invitation_lifetime_s,
            reissue=_field(posted.form, "reissue") == "yes",
        )
    except ServiceError as exc:
        return _refused(ROSTER_URL, settings, exc)
    return render(
        request,
        "ta_roster.html",
        {
            "file_name": upload.filename,
            "imported": imported,
            "invite_url": staff_views.invite_url(settings),
            "created": sum(entry.created for entry in imported),
            "invitations": sum(entry.invitation_code is not None for entry in imported),
            "expires_at": staff_views.invitation_expiry(settings),
            "zone": views.catalog_zone(catalog),
            "active": "ta",
        },
        viewer=posted.user,
    )


# --- Audit log --------------------------------------------------------------------------------


@router.get("/audit", response_class=HTMLResponse)
def audit_page(
    request: Request,
    user: StaffPageUser,
    session: SessionDep,
    catalog: CatalogDep,
    page: int = 1,
) -> HTMLResponse:
    """Every recorded action, newest first: who, when (course time), what, on whom, and why."""
    page = max(1, page)
    rows = staff_views.audit_rows(
        session, catalog, limit=AUDIT_PAGE_SIZE + 1, offset=(page - 1) * AUDIT_PAGE_SIZE
    )
    return render(
        request,
        "ta_audit.html",
        {
            "rows": rows[:AUDIT_PAGE_SIZE],
            "page": page,
            "has_next": len(rows) > AUDIT_PAGE_SIZE,
            "submission_page_url": submission_page_url,
            "phase_page_url": phase_page_url,
            "active": "ta",
        },
        viewer=user,
    )
