"""What every page shares: the Jinja2 environment and :func:`render` (the base layout with its
nav, flash messages and CSRF token), the page dependencies (:data:`PageUser`,
:data:`StaffPageUser`, :data:`CheckedForm`), times in the course timezone and safe redirects.

A new page (the TA dashboard, say) is a route that resolves :data:`PageUser` or
:data:`StaffPageUser` and returns ``render(request, "its.html", {...}, viewer=user)`` with a
template that starts ``{% extends "base.html" %}``. Forms that change something post their
fields plus ``{{ csrf_field() }}`` and take :data:`CheckedForm`; page scripts calling the REST API
send the token from ``<meta name="csrf-token">`` as the ``X-CSRF-Token`` header.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any
from zoneinfo import ZoneInfo

from fastapi import Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from jinja2 import Environment, FileSystemLoader, StrictUndefined, pass_context, select_autoescape
from jinja2.runtime import Context
from markupsafe import Markup
from starlette.datastructures import FormData

from server.config import Settings
from server.db import utcnow
from server.deps import SESSION_COOKIE, OptionalUser, SessionDep, SettingsDep
from server.errors import CsrfFailed, Forbidden, NotAuthenticated
from server.models import User, WebSession
from server.security import session_for_cookie

TEMPLATES_DIR = Path(__file__).parent / "templates"
CSRF_FIELD = "csrf_token"
FLASH_COOKIE = "autograder_flash"

PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "Referrer-Policy": "same-origin",
    "X-Content-Type-Options": "nosniff",
}
"""Sent with every page: pages hold personal data (never cached) and load only our own files."""


# --- Formatting -----------------------------------------------------------------------------


def local_time(moment: datetime, zone: ZoneInfo) -> str:
    """``moment`` as a person in ``zone`` reads it: ``Mon 19 Oct 2026, 23:59 CEST``."""
    local = moment.astimezone(zone)
    return f"{local:%a} {local.day} {local:%b %Y, %H:%M %Z}"


def duration_text(seconds: float) -> str:
    """A rounded-down duration in words: ``2 days 3 hours``, ``4 hours 5 minutes``, ``1 minute``."""
    seconds = int(abs(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes = rest // 60
    units = [(days, "day"), (hours, "hour"), (minutes, "minute")]
    parts = [f"{n} {unit}{'' if n == 1 else 's'}" for n, unit in units if n]
    if not parts:
        return "less than a minute"
    return " ".join(parts[:2])


def relative_text(moment: datetime, now: datetime) -> str:
    """``in 2 days 3 hours`` or ``5 minutes ago``."""
    seconds = (moment - now).total_seconds()
    return f"in {duration_text(seconds)}" if seconds > 0 else f"{duration_text(seconds)} ago"


def time_tag(moment: datetime, zone: ZoneInfo) -> Markup:
    """A ``<time>`` element: the local time as text, the UTC instant as its ``datetime``."""
    return Markup('<time datetime="{}">{}</time>').format(
        moment.astimezone(UTC).isoformat(), local_time(moment, zone)
    )


def countdown(moment: datetime, now: datetime, past: str = "passed") -> Markup:
    """How long until ``moment``, as a ``<time data-countdown>`` that app.js keeps up to date;
    ``past`` is the text once it has passed."""
    text = relative_text(moment, now) if moment > now else past
    return Markup('<time datetime="{}" data-countdown data-past="{}">{}</time>').format(
        moment.astimezone(UTC).isoformat(), past, text
    )


def percent(fraction: float | None, digits: int = 1) -> str:
    """``0.4123`` as ``41.2 %``; an em dash when there is no value."""
    if fraction is None:
        return "\u2014"
    return f"{fraction * 100:.{digits}f} %"


def mebibytes(size: int) -> str:
    """A byte count as people read it: ``512 KiB``, ``16.0 MiB``."""
    if size < 1024 * 1024:
        return f"{max(1, round(size / 1024))} KiB"
    return f"{size / 2**20:.1f} MiB"


@pass_context
def csrf_field(context: Context) -> Markup:
    """The hidden CSRF input of a form that changes something (see :data:`CheckedForm`)."""
    token = context.get("csrf_token")
    if not token:
        return Markup("")
    return Markup('<input type="hidden" name="{}" value="{}">').format(CSRF_FIELD, token)


def phase_url(slug: str, phase_id: str) -> str:
    return f"/assignments/{slug}/phases/{phase_id}"


def leaderboard_url(slug: str, phase_id: str) -> str:
    return f"/assignments/{slug}/phases/{phase_id}/leaderboard"


def submission_url(submission_id: str) -> str:
    return f"/submissions/{submission_id}"


def _environment() -> Environment:
    env = Environment(
        loader=FileSystemLoader(TEMPLATES_DIR),
        autoescape=select_autoescape(("html", "svg", "xml")),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.globals.update(
        csrf_field=csrf_field,
        time_tag=time_tag,
        countdown=countdown,
        phase_url=phase_url,
        leaderboard_url=leaderboard_url,
        submission_url=submission_url,
    )
    env.filters.update(percent=percent, mebibytes=mebibytes, duration=duration_text)
    return env


templates = _environment()
"""The one Jinja2 environment of the pages; autoescaping is on for .html and .svg templates."""


# --- Signed values and flash messages ---------------------------------------------------------


def sign(value: str, *, purpose: str, secret_key: str) -> str:
    """An HMAC of ``value`` bound to ``purpose`` (so a signature made for one use fits no other)."""
    message = f"{purpose}\n{value}".encode()
    return hmac.new(secret_key.encode(), message, hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class Flash:
    """A one-time message shown at the top of the next page: ``info``, ``success`` or ``error``."""

    level: str
    message: str


def redirect(url: str, settings: Settings, flash: Flash | None = None) -> RedirectResponse:
    """A 303 redirect (a form post becomes a GET), carrying ``flash`` to the next page in a
    short-lived signed cookie."""
    response = RedirectResponse(url, status_code=303)
    if flash is not None:
        payload = base64.urlsafe_b64encode(json.dumps([flash.level, flash.message]).encode())
        value = payload.decode()
        signature = sign(value, purpose="flash", secret_key=settings.secret_key)
        response.set_cookie(
            FLASH_COOKIE,
            f"{value}.{signature}",
            max_age=60,
            httponly=True,
            samesite="lax",
            secure=bool(settings.secure_cookies),
            path="/",
        )
    return response


def _read_flash(request: Request, settings: Settings) -> list[Flash]:
    raw = request.cookies.get(FLASH_COOKIE, "")
    value, _, signature = raw.rpartition(".")
    expected = sign(value, purpose="flash", secret_key=settings.secret_key)
    if not value or not hmac.compare_digest(signature, expected):
        return []
    try:
        level, message = json.loads(base64.urlsafe_b64decode(value))
    except ValueError:
        return []
    return [Flash(str(level), str(message))]


# --- Rendering --------------------------------------------------------------------------------


def render(
    request: Request,
    template: str,
    context: Mapping[str, Any],
    *,
    viewer: User | None,
    status_code: int = 200,
) -> HTMLResponse:
    """A page: ``template`` (which extends ``base.html``) with ``context``, plus what the layout
    needs: the viewer (nav, logout), the web session's CSRF token, the pending flash message."""
    settings: Settings = request.app.state.settings
    web_session: WebSession | None = getattr(request.state, "web_session", None)
    html = templates.get_template(template).render(
        {
            **context,
            "request": request,
            "viewer": viewer,
            "csrf_token": web_session.csrf_token if web_session is not None else None,
            "flashes": _read_flash(request, settings),
            "now": utcnow(),
        }
    )
    response = HTMLResponse(html, status_code, headers=PAGE_HEADERS)
    if FLASH_COOKIE in request.cookies:
        response.delete_cookie(FLASH_COOKIE, path="/")
    return response


def safe_next(target: str | None) -> str:
    """Where to go after logging in: a path on this site, else the home page (an open redirect
    to another site would let a link send a fresh login anywhere)."""
    if (
        not target
        or not target.startswith("/")
        or target.startswith(("//", "/\\"))
        or any(ord(c) < 32 for c in target)
        or target.startswith(("/login", "/logout"))
    ):
        return "/"
    return target


# --- Page dependencies ------------------------------------------------------------------------


def require_page_user(user: OptionalUser) -> User:
    """The logged-in user of a page; anonymous visitors are sent to /login (see
    :func:`server.web.errors.page_error`)."""
    if user is None:
        raise NotAuthenticated("Log in to see this page.")
    return user


PageUser = Annotated[User, Depends(require_page_user)]


def require_page_staff(user: PageUser) -> User:
    if not user.role.is_staff:
        raise Forbidden("Only course staff (TAs, instructors) can open this page.")
    return user


StaffPageUser = Annotated[User, Depends(require_page_staff)]


@dataclass(frozen=True)
class FormPost:
    """A form posted by a logged-in user, its CSRF field checked against the web session."""

    user: User
    web_session: WebSession
    form: FormData


async def checked_form(request: Request, session: SessionDep, settings: SettingsDep) -> FormPost:
    """The posted form of a logged-in user, refused (403 ``csrf_failed``) unless its
    ``csrf_token`` field is the web session's token.

    HTML forms cannot send the ``X-CSRF-Token`` header that the REST API asks cookie callers
    for, so page forms carry the same per-session token as a hidden field instead (synchronizer
    token pattern): another site can make a browser post here with the cookie, but cannot read
    the token from our pages.
    """
    cookie = request.cookies.get(SESSION_COOKIE)
    web_session = (
        session_for_cookie(session, token=cookie, secret_key=settings.secret_key)
        if cookie
        else None
    )
    if web_session is None:
        raise NotAuthenticated("Your login has expired or ended; log in again.")
    form = await request.form()
    sent = form.get(CSRF_FIELD)
    if not isinstance(sent, str) or not hmac.compare_digest(sent, web_session.csrf_token):
        raise CsrfFailed(
            "This form was not sent from a page of this site, or it is older than your "
            "login. Go back, reload the page and send it again."
        )
    request.state.web_session = web_session
    return FormPost(web_session.user, web_session, form)


CheckedForm = Annotated[FormPost, Depends(checked_form)]
