"""Error answers for browsers: an HTML page that says what to do next, or the login form for a
page that needs a login. The REST API keeps its JSON errors (:mod:`server.errors`)."""

from __future__ import annotations

from urllib.parse import quote

from fastapi import Request
from fastapi.responses import Response
from sqlalchemy.exc import SQLAlchemyError

from server.config import Settings
from server.deps import SESSION_COOKIE, clear_session_cookie
from server.models import User
from server.security import session_for_cookie
from server.web.common import Flash, redirect, render

JSON_PREFIXES = ("/api/", "/metrics", "/static/", "/docs", "/redoc")
"""Paths whose errors stay JSON (the API, Prometheus, static files, the API docs)."""

TITLES = {
    400: "This request cannot be handled",
    403: "You cannot do this",
    404: "Not found",
    405: "Not possible here",
    409: "This conflicts with the current state",
    413: "The upload is too large",
    422: "Something in the request is invalid",
    429: "Too many submissions",
    503: "Temporarily unavailable",
}

ADVICE = {
    403: "If you think you should be able to do this, ask the course staff.",
    404: "The address may be mistyped, or it points at something that is not yours to see. "
    "Start again from your assignments or your submissions.",
    422: "Check the address (or the form you sent) and try again.",
    503: "Try again in a few minutes; if it keeps happening, tell the course staff.",
}
CSRF_ADVICE = "Go back, reload the page (so that it carries a fresh token) and try again."


def _viewer(request: Request, settings: Settings) -> User | None:
    """Who is looking, for the nav of an error page (the dependencies may not have run)."""
    cookie = request.cookies.get(SESSION_COOKIE)
    if not cookie:
        return None
    try:
        with request.app.state.session_factory() as session:
            web_session = session_for_cookie(session, token=cookie, secret_key=settings.secret_key)
            if web_session is None:
                return None
            user = web_session.user
    except SQLAlchemyError:
        return None
    request.state.web_session = web_session
    return user


def page_error(request: Request, status: int, code: str, message: str) -> Response | None:
    """The browser's answer to an error on a page, or ``None`` where the JSON answer stays.

    A page that needs a login (401) sends the visitor to the login form, which comes back here
    afterwards; other errors render ``error.html`` with the message and what to do next.
    """
    if request.url.path.startswith(JSON_PREFIXES):
        return None
    settings: Settings = request.app.state.settings
    if status == 401:
        target = "/login"
        if request.method == "GET":
            here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            target = f"/login?next={quote(here, safe='')}"
        response: Response = redirect(target, settings, Flash("info", message))
        if SESSION_COOKIE in request.cookies:
            clear_session_cookie(response)
        return response
    if status == 404 and message == "Not Found":  # no route matched: Starlette's own words
        message = f"There is no page at {request.url.path}."
    return render(
        request,
        "error.html",
        {
            "status": status,
            "title": TITLES.get(status, "Something went wrong"),
            "message": message,
            "advice": CSRF_ADVICE if code == "csrf_failed" else ADVICE.get(status),
        },
        viewer=_viewer(request, settings),
        status_code=status,
    )
