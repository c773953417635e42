"""Logging in and out in the browser: the login form (username and password) and logout."""

from __future__ import annotations

import hmac
import secrets
from typing import Annotated

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
from server.security import end_session, login, session_for_cookie, start_session
from server.web.common import CSRF_FIELD, CheckedForm, Flash, redirect, render, safe_next, sign

router = APIRouter(include_in_schema=False)

LOGIN_COOKIE = "autograder_login"
LOGIN_COOKIE_MAX_AGE_S = 2 * 3600
_LOGIN_PURPOSE = "login-form"


def _login_nonce(request: Request) -> str:
    """The browser's login-form nonce: the one it already holds (so two open tabs both work),
    else a new one."""
    held = request.cookies.get(LOGIN_COOKIE, "")
    return held if 16 <= len(held) <= 64 and held.isascii() else secrets.token_urlsafe(24)


def _login_form_ok(request: Request, sent: str, settings: Settings) -> bool:
    """Whether a posted login form carries the signature of the nonce in the browser's cookie.

    The login form is the one form posted before there is a session to hold a CSRF token, so it
    uses a signed double-submit cookie: the page sets a random nonce in a cookie (HttpOnly,
    SameSite=Strict, path /login) and puts ``HMAC(secret_key, nonce)`` in a hidden field; a post
    must bring both and they must match. Another site can make a browser post the form, but it
    cannot read our page to learn the field, and the cookie is not sent on its cross-site post.
    The signature (rather than a plain copy of the nonce) means a cookie planted by a sibling
    site is useless without a matching field issued by this server, and no server-side state is
    kept for visitors who never log in. What this prevents is login CSRF: a victim silently
    logged into the attacker's account and uploading work there.
    """
    nonce = request.cookies.get(LOGIN_COOKIE, "")
    if not nonce or not sent:
        return False
    expected = sign(nonce, purpose=_LOGIN_PURPOSE, secret_key=settings.secret_key)
    return hmac.compare_digest(sent, expected)


def _login_page(
    request: Request,
    settings: Settings,
    *,
    next_url: str,
    username: str = "",
    error: str | None = None,
    status_code: int = 200,
) -> HTMLResponse:
    nonce = _login_nonce(request)
    response = render(
        request,
        "login.html",
        {
            "next_url": next_url,
            "username": username,
            "error": error,
            "login_token": sign(nonce, purpose=_LOGIN_PURPOSE, secret_key=settings.secret_key),
            "login_field": CSRF_FIELD,
        },
        viewer=None,
        status_code=status_code,
    )
    response.set_cookie(
        LOGIN_COOKIE,
        nonce,
        max_age=LOGIN_COOKIE_MAX_AGE_S,
        httponly=True,
        samesite="strict",
        secure=bool(settings.secure_cookies),
        path="/login",
    )
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
    if not _login_form_ok(request, csrf_token, settings):
        return _login_page(
            request,
            settings,
            next_url=next_url,
            username=username,
            status_code=403,
            error="The login form had expired or your browser did not send its cookie. Make "
            "sure cookies are allowed for this site, then log in again.",
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
    user = login(session, username=username, password=password)
    if user is None:
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
    response.delete_cookie(LOGIN_COOKIE, path="/login")
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
