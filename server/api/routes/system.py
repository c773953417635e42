"""Health, Prometheus metrics and the caller's identity."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, PlainTextResponse

from server.deps import CurrentUser, SessionDep, SettingsDep
from server.schemas import HealthPublic, UserPublic
from server.services.health import health
from server.services.metrics import CONTENT_TYPE, metrics_text

router = APIRouter(tags=["system"])
metrics_router = APIRouter(tags=["system"])
"""Mounted at the root, outside ``/api/v1``: where Prometheus looks by default."""


@router.get("/health", response_model=HealthPublic)
def get_health(session: SessionDep, settings: SettingsDep) -> JSONResponse:
    """Database, broker and live workers; 503 when the database is unreachable."""
    report = health(session=session, settings=settings)
    return JSONResponse(report.model_dump(mode="json"), 503 if report.status == "down" else 200)


@metrics_router.get("/metrics", response_class=PlainTextResponse)
def get_metrics(session: SessionDep, settings: SettingsDep) -> PlainTextResponse:
    """Queue depths, live workers, submissions by status, task durations and failures by cause,
    in the Prometheus text format, read from the database at scrape time (no token needed)."""
    return PlainTextResponse(
        metrics_text(session=session, settings=settings), media_type=CONTENT_TYPE
    )


@router.get("/me", response_model=UserPublic)
def get_me(user: CurrentUser) -> UserPublic:
    return UserPublic(username=user.username, role=user.role.value, pseudonym=user.pseudonym)
