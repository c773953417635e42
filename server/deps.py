"""FastAPI dependency aliases: settings, database session, catalog and the current user."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from server.assignments import AssignmentSpec
from server.catalog import Catalog
from server.config import Settings
from server.errors import Forbidden, NotAuthenticated, NotFound
from server.models import User
from server.security import user_for_token

_bearer = HTTPBearer(auto_error=False, description="A personal API token: `Bearer agt_...`")


def get_settings_dep(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_catalog(request: Request) -> Catalog:
    catalog: Catalog = request.app.state.catalog
    return catalog


def get_db(request: Request) -> Iterator[Session]:
    with request.app.state.session_factory() as session:
        yield session


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
CatalogDep = Annotated[Catalog, Depends(get_catalog)]
SessionDep = Annotated[Session, Depends(get_db)]


def get_current_user(
    session: SessionDep,
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> User:
    if credentials is None:
        raise NotAuthenticated(
            "Send your API token as `Authorization: Bearer <token>` (the TA gives you one)."
        )
    user = user_for_token(session, token=credentials.credentials, secret_key=settings.secret_key)
    if user is None:
        raise NotAuthenticated("This API token is unknown or revoked; ask the TA for a new one.")
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
