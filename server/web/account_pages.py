"""A logged-in user's own account: their leaderboard pseudonym and their personal API tokens
(for the command-line client and scripts), created, listed and revoked here."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response
from sqlalchemy.orm import Session

from server.catalog import Catalog
from server.config import Settings
from server.deps import CatalogDep, SessionDep, SettingsDep
from server.errors import ServiceError
from server.models import User
from server.services import accounts
from server.web import views
from server.web.common import CheckedForm, Flash, PageUser, redirect, render

router = APIRouter(include_in_schema=False)

ACCOUNT_URL = "/account"


def _account_page(
    request: Request,
    session: Session,
    settings: Settings,
    catalog: Catalog,
    user: User,
    *,
    new_token: str | None = None,
    new_token_name: str | None = None,
) -> HTMLResponse:
    return render(
        request,
        "account.html",
        {
            "tokens": accounts.list_tokens(session, user),
            "max_tokens": accounts.MAX_TOKENS,
            "zone": views.catalog_zone(catalog),
            "server_url": settings.public_url or str(request.base_url).rstrip("/"),
            "new_token": new_token,
            "new_token_name": new_token_name,
            "active": "account",
        },
        viewer=user,
    )


@router.get(ACCOUNT_URL, response_class=HTMLResponse)
def account_page(
    request: Request,
    user: PageUser,
    session: SessionDep,
    settings: SettingsDep,
    catalog: CatalogDep,
) -> HTMLResponse:
    """Your pseudonym and your API tokens (names and dates; a token's value is shown only when
    it is created)."""
    return _account_page(request, session, settings, catalog, user)


@router.post(f"{ACCOUNT_URL}/pseudonym")
def change_pseudonym(posted: CheckedForm, session: SessionDep, settings: SettingsDep) -> Response:
    """Choose the name you appear under on leaderboards."""
    wanted = posted.form.get("pseudonym")
    try:
        accounts.set_pseudonym(session, posted.user, wanted if isinstance(wanted, str) else "")
    except ServiceError as exc:
        return redirect(
            ACCOUNT_URL, settings, Flash("error", f"Nothing was changed: {exc.message}")
        )
    return redirect(
        ACCOUNT_URL,
        settings,
        Flash("success", f"Leaderboards now show you as {posted.user.pseudonym}."),
    )


@router.post(f"{ACCOUNT_URL}/tokens", response_class=HTMLResponse)
def create_token(
    request: Request,
    posted: CheckedForm,
    session: SessionDep,
    settings: SettingsDep,
    catalog: CatalogDep,
) -> Response:
    """A new personal API token, shown on the page this once (only its hash is stored, so the
    answer is the page itself rather than a redirect)."""
    name = posted.form.get("name")
    try:
        token, row = accounts.create_token(
            session,
            posted.user,
            name=(name if isinstance(name, str) else "")[:64],
            secret_key=settings.secret_key,
        )
    except ServiceError as exc:
        return redirect(
            ACCOUNT_URL, settings, Flash("error", f"No token was created: {exc.message}")
        )
    return _account_page(
        request, session, settings, catalog, posted.user, new_token=token, new_token_name=row.name
    )


@router.post(f"{ACCOUNT_URL}/tokens/{{token_id}}/revoke")
def revoke_token(
    token_id: int, posted: CheckedForm, session: SessionDep, settings: SettingsDep
) -> Response:
    """Revoke one of your tokens; requests with it are refused from now on."""
    try:
        row = accounts.revoke_token(session, posted.user, token_id)
    except ServiceError as exc:
        return redirect(ACCOUNT_URL, settings, Flash("error", exc.message))
    return redirect(
        ACCOUNT_URL,
        settings,
        Flash("success", f"The token \u201c{row.name}\u201d is revoked; it no longer works."),
    )
