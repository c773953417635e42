"""The student pages: home (assignments, deadlines, quotas), a phase (rules, downloads, upload,
live status), submission history and details (sample images, charts, flags, marks for the final
selection) and leaderboards. A student sees scores and results only as
:func:`server.services.boards.submission_for` gives them; staff see everything."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import HTMLResponse, Response
from sqlalchemy.orm import Session

from server.assignments import AssignmentSpec, PhaseSpec, Track
from server.catalog import Catalog
from server.config import Settings
from server.db import utcnow
from server.deps import CatalogDep, OptionalUser, SessionDep, SettingsDep, public_or_logged_in
from server.errors import Conflict, ServiceError
from server.models import Submission
from server.services import boards, staff
from server.services import submissions as submission_service
from server.services.boards import Board
from server.services.catalog_views import METRIC_DESCRIPTIONS
from server.services.leaderboard import leaderboard as build_leaderboard
from server.web import views
from server.web.common import (
    PAGE_HEADERS,
    CheckedForm,
    Flash,
    FormPost,
    PageUser,
    redirect,
    render,
    safe_next,
    submission_url,
    templates,
)
from server.web.figures import SampleKind

router = APIRouter(include_in_schema=False)

HISTORY_PAGE_SIZE = 50


def _phase_of(
    catalog: Catalog, submission: Submission
) -> tuple[AssignmentSpec | None, PhaseSpec | None]:
    """The spec a submission was made to, if the course still has it."""
    assignment = catalog.assignments.get(submission.assignment_slug)
    if assignment is None:
        return None, None
    return assignment, assignment.phase(submission.phase_id)


@router.get("/", response_class=HTMLResponse)
def home(
    request: Request, user: PageUser, session: SessionDep, catalog: CatalogDep
) -> HTMLResponse:
    """Assignments and their phases: deadlines with countdowns, submissions left."""
    now = utcnow()
    cards = views.home_cards(session=session, user=user, catalog=catalog, now=now)
    return render(request, "home.html", {"assignments": cards, "active": "home"}, viewer=user)


@router.get("/assignments/{slug}/phases/{phase_id}", response_class=HTMLResponse)
def phase_page(
    slug: str,
    phase_id: str,
    request: Request,
    user: PageUser,
    session: SessionDep,
    settings: SettingsDep,
    catalog: CatalogDep,
) -> HTMLResponse:
    """A phase's rules, the clean-image downloads, the upload form and the live status."""
    assignment = views.find_assignment(catalog, slug)
    phase = views.find_phase(assignment, phase_id)
    page = views.phase_page(
        session=session,
        settings=settings,
        catalog=catalog,
        user=user,
        assignment=assignment,
        phase=phase,
        now=utcnow(),
    )
    return render(request, "phase.html", {"page": page, "active": "home"}, viewer=user)


@router.get("/submissions", response_class=HTMLResponse)
def history(
    request: Request,
    user: PageUser,
    session: SessionDep,
    catalog: CatalogDep,
    assignment: str | None = None,
    phase: str | None = None,
    page: Annotated[int, Query(ge=1)] = 1,
) -> HTMLResponse:
    """The viewer's own submissions, newest first, with the Mark and Unmark buttons of phases
    whose final selection is ``marked``."""
    rows, total = submission_service.list_submissions(
        session=session,
        user=user,
        assignment=assignment,
        phase=phase,
        username=user.username,
        limit=HISTORY_PAGE_SIZE,
        offset=(page - 1) * HISTORY_PAGE_SIZE,
    )
    shown = views.history(session=session, catalog=catalog, user=user, rows=rows, now=utcnow())
    return render(
        request,
        "submissions.html",
        {
            "history": shown,
            "total": total,
            "page": page,
            "pages": max(1, -(-total // HISTORY_PAGE_SIZE)),
            "filter_assignment": assignment,
            "filter_phase": phase,
            "active": "submissions",
        },
        viewer=user,
    )


@router.get("/submissions/{submission_id}", response_class=HTMLResponse)
def submission_detail(
    submission_id: str,
    request: Request,
    user: PageUser,
    session: SessionDep,
    settings: SettingsDep,
    catalog: CatalogDep,
) -> HTMLResponse:
    """One submission: status, score and what it is made of (404 unless it is the viewer's own
    or the viewer is staff), and its mark in a ``marked`` phase."""
    row = submission_service.get_visible_submission(
        session=session, user=user, submission_id=submission_id
    )
    assignment, phase = _phase_of(catalog, row)
    public = boards.submission_for(session, catalog, row, viewer=user)
    track = phase.track if phase else Track.DEFENSE if row.manifest else Track.ATTACK
    attack = defense = None
    if track is Track.DEFENSE:
        defense = (
            views.defense_detail(phase=phase, results=public.results) if public.results else None
        )
    else:
        attack = views.attack_detail(
            settings=settings, phase=phase, submission=row, results=public.results
        )
    marking = None
    if assignment is not None and phase is not None and row.user_id == user.id:
        marking = views.marking(
            session=session, user=user, assignment=assignment, phase=phase, now=utcnow()
        )
    return render(
        request,
        "submission.html",
        {
            "submission": public,
            "owner": row.user,
            "assignment": assignment,
            "phase": phase,
            "status": views.status_view(public),
            "withheld": views.results_withheld(public.results),
            "attack": attack,
            "defense": defense,
            "marking": marking,
            "selection_rule": boards.SELECTION_RULES[phase.leaderboard.selection] if phase else "",
            "marked": row.marked_at is not None,
            "mark": views.mark_action(row, marking, user),
            "active": "submissions",
        },
        viewer=user,
    )


@router.post("/submissions/{submission_id}/cancel")
def cancel_submission(
    submission_id: str, posted: CheckedForm, session: SessionDep, settings: SettingsDep
) -> Response:
    """A student takes back their own queued submission (it is then not counted)."""
    here = submission_url(submission_id)
    try:
        staff.cancel_submission(
            session, actor=posted.user, submission_id=submission_id, reason=None
        )
    except Conflict as exc:
        return redirect(here, settings, Flash("error", exc.message))
    return redirect(
        here, settings, Flash("success", "Cancelled; it does not count against your quota.")
    )


@router.post("/submissions/{submission_id}/mark")
def mark_submission(
    submission_id: str,
    posted: CheckedForm,
    session: SessionDep,
    settings: SettingsDep,
    catalog: CatalogDep,
) -> Response:
    """A student marks one of their scored submissions for the final selection."""
    return _set_mark(submission_id, posted, session, settings, catalog, marked=True)


@router.post("/submissions/{submission_id}/unmark")
def unmark_submission(
    submission_id: str,
    posted: CheckedForm,
    session: SessionDep,
    settings: SettingsDep,
    catalog: CatalogDep,
) -> Response:
    """A student takes back a mark."""
    return _set_mark(submission_id, posted, session, settings, catalog, marked=False)


def _set_mark(
    submission_id: str,
    posted: FormPost,
    session: Session,
    settings: Settings,
    catalog: Catalog,
    *,
    marked: bool,
) -> Response:
    """Mark or unmark through :func:`boards.set_mark`, then back to the page the form was on
    (its ``back`` field) with what happened; after the student's deadline the service refuses
    both."""
    row = submission_service.get_visible_submission(
        session=session, user=posted.user, submission_id=submission_id
    )
    back = posted.form.get("back")
    here = safe_next(back) if isinstance(back, str) and back else submission_url(row.id)
    assignment, phase = _phase_of(catalog, row)
    if assignment is None or phase is None:
        return redirect(
            here, settings, Flash("error", "This submission's phase is no longer in the course.")
        )
    try:
        boards.set_mark(
            session,
            user=posted.user,
            submission=row,
            assignment=assignment,
            phase=phase,
            marked=marked,
        )
    except ServiceError as exc:
        return redirect(here, settings, Flash("error", exc.message))
    state = views.marking(
        session=session, user=posted.user, assignment=assignment, phase=phase, now=utcnow()
    )
    count = f" You have marked {state.marked} of {state.max_marked}." if state else ""
    done = "is marked for" if marked else "is no longer marked for"
    return redirect(
        here,
        settings,
        Flash("success", f"Submission {row.id[:8]} {done} the final selection.{count}"),
    )


@router.get("/submissions/{submission_id}/status", response_class=HTMLResponse)
def submission_status(
    submission_id: str,
    user: PageUser,
    session: SessionDep,
    catalog: CatalogDep,
    link: bool = True,
) -> HTMLResponse:
    """The live status region of a submission as an HTML fragment (what the pages poll);
    ``link=false`` leaves out the link to the detail page (the detail page itself polls)."""
    row = submission_service.get_visible_submission(
        session=session, user=user, submission_id=submission_id
    )
    status = views.status_view(boards.submission_for(session, catalog, row, viewer=user))
    html = templates.get_template("_status.html").render(status=status, status_link=link)
    return HTMLResponse(html, headers=PAGE_HEADERS)


@router.get("/submissions/{submission_id}/samples/{index}/{kind}.png")
def sample_image(
    submission_id: str,
    index: Annotated[int, Path(ge=0)],
    kind: SampleKind,
    user: PageUser,
    session: SessionDep,
    settings: SettingsDep,
    catalog: CatalogDep,
) -> Response:
    """A clean, adversarial or amplified-perturbation picture of one image of an attack batch
    (the owner's or staff's only)."""
    row = submission_service.get_visible_submission(
        session=session, user=user, submission_id=submission_id
    )
    _, phase = _phase_of(catalog, row)
    content = views.sample_png(
        settings=settings, phase=phase, submission=row, index=index, kind=kind
    )
    return Response(
        content,
        media_type="image/png",
        headers={"Cache-Control": "private, max-age=3600", "X-Content-Type-Options": "nosniff"},
    )


@router.get("/leaderboards", response_class=HTMLResponse)
def leaderboards(request: Request, user: PageUser, catalog: CatalogDep) -> HTMLResponse:
    """Links to every phase's leaderboard."""
    return render(
        request,
        "leaderboards.html",
        {"assignments": list(catalog.assignments.values()), "active": "leaderboards"},
        viewer=user,
    )


@router.get("/assignments/{slug}/phases/{phase_id}/leaderboard", response_class=HTMLResponse)
def leaderboard_page(
    slug: str,
    phase_id: str,
    request: Request,
    user: OptionalUser,
    session: SessionDep,
    catalog: CatalogDep,
    board: Board | None = None,
) -> HTMLResponse:
    """A phase's ranking under pseudonyms, the viewer's row highlighted; without a login only
    when the course makes its leaderboards public. ``board`` picks the public or the private
    board (the private one once it is revealed, or for staff)."""
    assignment = public_or_logged_in(catalog, slug, user)
    phase = views.find_phase(assignment, phase_id)
    shown = build_leaderboard(
        session=session, assignment=assignment, phase=phase, viewer=user, board=board
    )
    return render(
        request,
        "leaderboard.html",
        {
            "assignment": assignment,
            "phase": phase,
            "board": shown,
            "can_switch": shown.revealed or (user is not None and user.role.is_staff),
            "metric_description": METRIC_DESCRIPTIONS[shown.metric],
            "active": "leaderboards",
        },
        viewer=user,
    )
