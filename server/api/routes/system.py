"""Health and the caller's identity."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from server.deps import CurrentUser, SessionDep, SettingsDep
from server.schemas import HealthPublic, UserPublic
from server.services.health import health

router = APIRouter(tags=["system"])


@router.get("/health", response_model=HealthPublic)
def get_health(session: SessionDep, settings: SettingsDep) -> JSONResponse:
    """Database, broker and live workers; 503 when the database is unreachable."""
    report = health(session=session, settings=settings)
    return JSONResponse(report.model_dump(mode="json"), 503 if report.status == "down" else 200)


@router.get("/me", response_model=UserPublic)
def get_me(user: CurrentUser) -> UserPublic:
    return UserPublic(username=user.username, role=user.role.value, pseudonym=user.pseudonym)
