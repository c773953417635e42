"""Logging in and out in the browser (the login form, logout) and setting a first password with
an invitation code (``/invite``, where the roster's invitation links point)."""

from __future__ import annotations

import hmac
import logging
import math
import secrets
from dataclasses import dataclass
from typing import Annotated

import anyio.from_thread
from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, Response

from server.config import Settings
from server.deps import (
    SESSION_COOKIE,
    OptionalUser,
    SessionDep,
    SettingsDep,
    clear_session_cookie,
    set_session_cookie,
)
from server.errors import ServiceError
from server.ratelimit import login_locked, record_login_failure
from server.security import (
    MIN_PASSWORD_LENGTH,
    WeakPassword,
    end_session,
    login,
    session_for_cookie,
    start_session,
)
from server.services import accounts
from server.web.common import CSRF_FIELD, CheckedForm, Flash, redirect, render, safe_next, sign

log = logging.getLogger(__name__)
router = APIRouter(include_in_schema=False)

ANONYMOUS_FORM_MAX_AGE_S = 2 * 3600


@dataclass(frozen=True)
class AnonymousForm:
    """The CSRF check of a form posted before there is a session to hold a CSRF token (the
    login form, the invitation form): a signed double-submit cookie.

    The page sets a random nonce in a cookie (HttpOnly, SameSite=Strict, limited to the form's
    ``path``) and puts ``HMAC(secret_key, purpose, nonce)`` in a hidden field; a post must bring
    both and they must match. Another site can make a browser post the form, but it cannot read
    our page to learn the field, and the cookie is not sent on its cross-site post. The
    signature (rather than a plain copy of the nonce) means a cookie planted by a sibling site is
    useless without a matching field issued by this server, and no server-side state is kept for
    visitors who never post. For the login form this prevents login CSRF: a victim silently
    logged into the attacker's account and uploading work there.
    """

    cookie: str
    purpose: str
    path: str

    def nonce(self, request: Request) -> str:
        """The browser's nonce: the one it already holds (so two open tabs both work), else a
        new one."""
        held = request.cookies.get(self.cookie, "")
        return held if 16 <= len(held) <= 64 and held.isascii() else secrets.token_urlsafe(24)

    def field(self, nonce: str, settings: Settings) -> str:
        """The hidden field's value for ``nonce``."""
        return sign(nonce, purpose=self.purpose, secret_key=settings.secret_key)

    def set_cookie(self, response: Response, nonce: str, settings: Settings) -> None:
        response.set_cookie(
            self.cookie,
            nonce,
            max_age=ANONYMOUS_FORM_MAX_AGE_S,
            httponly=True,
            samesite="strict",
            secure=bool(settings.secure_cookies),
            path=self.path,
        )

    def clear_cookie(self, response: Response) -> None:
        response.delete_cookie(self.cookie, path=self.path)

    def posted_ok(self, request: Request, sent: str, settings: Settings) -> bool:
        """Whether a posted form carries the signature of the nonce in the browser's cookie."""
        nonce = request.cookies.get(self.cookie, "")
        if not nonce or not sent:
            return False
        return hmac.compare_digest(sent, self.field(nonce, settings))


LOGIN_FORM = AnonymousForm("autograder_login", "login-form", "/login")
INVITE_FORM = AnonymousForm("autograder_invite", "invite-form", "/invite")
EXPIRED_FORM = (
    "The form had expired or your browser did not send its cookie. Make sure cookies are "
    "allowed for this site, then try again."
)


def _login_page(
    request: Request,
    settings: Settings,
    *,
    next_url: str,
    username: str = "",
    error: str | None = None,
    status_code: int = 200,
) -> HTMLResponse:
    nonce = LOGIN_FORM.nonce(request)
    response = render(
        request,
        "login.html",
        {
            "next_url": next_url,
            "username": username,
            "error": error,
            "login_token": LOGIN_FORM.field(nonce, settings),
            "login_field": CSRF_FIELD,
        },
        viewer=None,
        status_code=status_code,
    )
    LOGIN_FORM.set_cookie(response, nonce, settings)
    return response


@router.get("/login", response_class=HTMLResponse)
def login_page(
    request: Request, session: SessionDep, settings: SettingsDep, next: str | None = None
) -> Response:
    """The login form; a visitor who is already logged in goes straight on to ``next``."""
    cookie = request.cookies.get(SESSION_COOKIE)
    if cookie and session_for_cookie(session, token=cookie, secret_key=settings.secret_key):
        return redirect(safe_next(next), settings)
    return _login_page(request, settings, next_url=safe_next(next))


def _locked_for(request: Request, settings: Settings, username: str) -> int | None:
    """Seconds this username must wait after too many failed logins, or ``None``. The counters
    are async (Redis); this route runs in a worker thread, hence ``from_thread``."""
    if not settings.rate_limits:
        return None
    try:
        wait = anyio.from_thread.run(
            login_locked, request.app.state.rate_windows, settings, username
        )
    except Exception:  # counters unavailable: do not lock anyone out
        log.warning("login-failure counters unavailable", exc_info=True)
        return None
    return None if wait is None else max(1, math.ceil(wait))


def _count_failure(request: Request, settings: Settings, username: str) -> None:
    if not settings.rate_limits:
        return
    try:
        anyio.from_thread.run(
            record_login_failure, request.app.state.rate_windows, settings, username
        )
    except Exception:
        log.warning("login-failure counters unavailable", exc_info=True)


@router.post("/login", response_class=HTMLResponse)
def login_submit(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    username: Annotated[str, Form()] = "",
    password: Annotated[str, Form()] = "",
    csrf_token: Annotated[str, Form()] = "",
    next: Annotated[str, Form()] = "/",
) -> Response:
    """Check the password and start a browser session (cookie), or show the form again with a
    message that does not say whether the username exists."""
    next_url = safe_next(next)
    username = username.strip()
    if not LOGIN_FORM.posted_ok(request, csrf_token, settings):
        return _login_page(
            request,
            settings,
            next_url=next_url,
            username=username,
            status_code=403,
            error=EXPIRED_FORM,
        )
    if not username or not password:
        return _login_page(
            request,
            settings,
            next_url=next_url,
            username=username,
            status_code=400,
            error="Enter both your username and your password.",
        )
    wait = _locked_for(request, settings, username)
    if wait is not None:
        page = _login_page(
            request,
            settings,
            next_url=next_url,
            username=username,
            status_code=429,
            error=f"Too many failed logins for this username. Wait {wait} s and try again; "
            "if you have forgotten your password, ask the course staff to set a new one.",
        )
        page.headers["Retry-After"] = str(wait)
        return page
    user = login(session, username=username, password=password)
    if user is None:
        _count_failure(request, settings, username)
        return _login_page(
            request,
            settings,
            next_url=next_url,
            username=username,
            status_code=401,
            error="The username or password is wrong. Check both and try again; if you have "
            "forgotten your password, ask the course staff to set a new one.",
        )
    previous = request.cookies.get(SESSION_COOKIE)
    old = (
        session_for_cookie(session, token=previous, secret_key=settings.secret_key)
        if previous
        else None
    )
    if old is not None:
        end_session(old)
    token, _ = start_session(
        session, user=user, secret_key=settings.secret_key, lifetime_s=settings.session_lifetime_s
    )
    session.commit()
    response = redirect(next_url, settings, Flash("success", f"Logged in as {user.username}."))
    set_session_cookie(response, token, settings)
    LOGIN_FORM.clear_cookie(response)
    return response


@router.get("/logout", response_class=HTMLResponse)
def logout_page(request: Request, user: OptionalUser, settings: SettingsDep) -> Response:
    """A confirmation with the logout button (logging out takes a form post, so that another
    site cannot log anyone out with a link)."""
    if user is None:
        return redirect("/login", settings)
    return render(request, "logout.html", {}, viewer=user)


@router.post("/logout")
def logout(posted: CheckedForm, session: SessionDep, settings: SettingsDep) -> Response:
    """End the browser session (the cookie stops working at once, on every device it was
    copied to) and go back to the login form."""
    end_session(posted.web_session)
    session.commit()
    response = redirect("/login", settings, Flash("info", "You are logged out."))
    clear_session_cookie(response)
    return response


# --- Invitations ------------------------------------------------------------------------------


def _invite_page(
    request: Request,
    settings: Settings,
    *,
    code: str = "",
    pseudonym: str = "",
    error: str | None = None,
    error_field: str | None = None,
    status_code: int = 200,
) -> HTMLResponse:
    nonce = INVITE_FORM.nonce(request)
    response = render(
        request,
        "invite.html",
        {
            "code": code,
            "pseudonym": pseudonym,
            "error": error,
            "error_field": error_field,
            "form_token": INVITE_FORM.field(nonce, settings),
            "form_field": CSRF_FIELD,
            "min_password_length": MIN_PASSWORD_LENGTH,
        },
        viewer=None,
        status_code=status_code,
    )
    INVITE_FORM.set_cookie(response, nonce, settings)
    return response


@router.get("/invite", response_class=HTMLResponse)
def invite_page(request: Request, settings: SettingsDep, code: str = "") -> HTMLResponse:
    """The form behind an invitation link: the code (filled in from the link), a new password
    twice and, optionally, a leaderboard pseudonym."""
    return _invite_page(request, settings, code=code.strip()[:128])


@router.post("/invite", response_class=HTMLResponse)
def invite_submit(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    code: Annotated[str, Form(max_length=128)] = "",
    password: Annotated[str, Form(max_length=1024)] = "",
    password_again: Annotated[str, Form(max_length=1024)] = "",
    pseudonym: Annotated[str, Form(max_length=64)] = "",
    csrf_token: Annotated[str, Form()] = "",
) -> Response:
    """Set the invited student's password (the code then stops working) and send them to the
    login form; a refused attempt shows the form again with why (passwords are never echoed)."""
    code, pseudonym = code.strip(), pseudonym.strip()

    def again(error: str, field: str | None, status_code: int) -> HTMLResponse:
        return _invite_page(
            request,
            settings,
            code=code,
            pseudonym=pseudonym,
            error=error,
            error_field=field,
            status_code=status_code,
        )

    if not INVITE_FORM.posted_ok(request, csrf_token, settings):
        return again(EXPIRED_FORM, None, 403)
    if not code:
        return again("Enter the invitation code from your invitation link.", "code", 400)
    if password != password_again:
        return again("The two passwords differ; type the same new password twice.", "password", 400)
    try:
        user = accounts.accept_invitation(
            session,
            code=code,
            password=password,
            pseudonym=pseudonym or None,
            secret_key=settings.secret_key,
        )
    except accounts.InvalidInvitation as exc:
        field = "password" if isinstance(exc.__cause__, WeakPassword) else "code"
        return again(exc.message, field, exc.status)
    except ServiceError as exc:  # the pseudonym: its form, or taken
        return again(exc.message, "pseudonym", exc.status)
    response = redirect(
        "/login",
        settings,
        Flash("success", f"Your password is set. Log in as {user.username} with it."),
    )
    INVITE_FORM.clear_cookie(response)
    return response
