"""FastAPI dependency aliases: settings, database session, catalog and the current user (API
token or browser session, with CSRF checks for the latter)."""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from server.assignments import AssignmentSpec
from server.catalog import Catalog
from server.config import Settings
from server.errors import CsrfFailed, Forbidden, NotAuthenticated, NotFound
from server.models import User
from server.security import session_for_cookie, user_for_token

_bearer = HTTPBearer(auto_error=False, description="A personal API token: `Bearer agt_...`")


def get_settings_dep(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_catalog(request: Request) -> Catalog:
    catalog: Catalog = request.app.state.catalog
    return catalog


async def get_db(request: Request) -> AsyncIterator[Session]:
    """The request's database session, one of at most ``settings.api_db_sessions`` at once.

    A sync dependency's clean-up runs in a worker thread. Unbounded, a burst of requests takes
    every thread to wait for a connection while the requests holding the connections wait for a
    thread to close their sessions, and nothing moves until the pool's timeout. Here a request
    waits for its turn in the event loop, holding neither, and the session is closed in a thread
    that is always there: fewer sessions than threads are ever open.
    """
    async with request.app.state.db_sessions:
        session = request.app.state.session_factory()
        try:
            yield session
        finally:
            await run_in_threadpool(session.close)


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
CatalogDep = Annotated[Catalog, Depends(get_catalog)]
SessionDep = Annotated[Session, Depends(get_db)]


SESSION_COOKIE = "autograder_session"
CSRF_HEADER = "X-CSRF-Token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def set_session_cookie(response: Response, token: str, settings: Settings) -> None:
    response.set_cookie(
        SESSION_COOKIE,
        token,
        max_age=int(settings.session_lifetime_s),
        httponly=True,
        samesite="lax",
        secure=bool(settings.secure_cookies),
        path="/",
    )


def clear_session_cookie(response: Response) -> None:
    response.delete_cookie(SESSION_COOKIE, path="/")


def get_optional_user(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> User | None:
    """The caller: an API token (``Authorization: Bearer``) or a browser session cookie; ``None``
    when neither is sent. A cookie-authenticated request that changes something must also send
    the session's CSRF token (header ``X-CSRF-Token``); the web session is kept in
    ``request.state.web_session``."""
    request.state.web_session = None
    if credentials is not None:
        user = user_for_token(
            session, token=credentials.credentials, secret_key=settings.secret_key
        )
        if user is None:
            raise NotAuthenticated(
                "This API token is unknown or revoked; ask the TA for a new one."
            )
        return user
    cookie = request.cookies.get(SESSION_COOKIE)
    if not cookie:
        return None
    web_session = session_for_cookie(session, token=cookie, secret_key=settings.secret_key)
    if web_session is None:
        raise NotAuthenticated("Your login has expired or ended; log in again at /login.")
    if request.method not in SAFE_METHODS:
        sent = request.headers.get(CSRF_HEADER, "")
        if not hmac.compare_digest(sent, web_session.csrf_token):
            raise CsrfFailed(
                f"This request came with the session cookie but without the page's "
                f"{CSRF_HEADER} header; reload the page and try again."
            )
    request.state.web_session = web_session
    return web_session.user


OptionalUser = Annotated[User | None, Depends(get_optional_user)]


def get_current_user(user: OptionalUser) -> User:
    if user is None:
        raise NotAuthenticated(
            "Send your API token as `Authorization: Bearer <token>` (the TA gives you one), "
            "or log in at /login."
        )
    return user


CurrentUser = Annotated[User, Depends(get_current_user)]


def get_staff_user(user: CurrentUser) -> User:
    if not user.role.is_staff:
        raise Forbidden("Only course staff (TAs, instructors) can do this.")
    return user


StaffUser = Annotated[User, Depends(get_staff_user)]


def get_assignment(slug: str, catalog: CatalogDep, _: CurrentUser) -> AssignmentSpec:
    assignment = catalog.assignments.get(slug)
    if assignment is None:
        raise NotFound(f"No assignment {slug!r}; GET /api/v1/assignments lists them.")
    return assignment


AssignmentDep = Annotated[AssignmentSpec, Depends(get_assignment)]


def public_or_logged_in(catalog: Catalog, slug: str, user: User | None) -> AssignmentSpec:
    """The assignment, for a logged-in user or, when its leaderboards are public, for anyone."""
    assignment = catalog.assignments.get(slug)
    if user is None and (assignment is None or not assignment.public_leaderboard):
        raise NotAuthenticated(
            "This course's leaderboards are visible to its members only: log in at /login or "
            "send your API token."
        )
    if assignment is None:
        raise NotFound(f"No assignment {slug!r}; GET /api/v1/assignments lists them.")
    return assignment
