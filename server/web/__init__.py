"""Server-rendered pages (Jinja2, plain CSS and JS, no build step): the students' pages and the
shared base that the staff pages build on (:mod:`server.web.common`)."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from server.web.account_pages import router as account_router
from server.web.auth import router as login_router
from server.web.pages import router as pages_router
from server.web.staff_pages import router as staff_router

STATIC_DIR = Path(__file__).parent / "static"


def install_pages(app: FastAPI) -> None:
    """Serve ``/static`` and the page routes (login, invitations, home, phases, submissions,
    leaderboards, the account page, the TA pages under ``/ta``)."""
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.include_router(login_router)
    app.include_router(pages_router)
    app.include_router(account_router)
    app.include_router(staff_router)
