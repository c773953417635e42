"""The FastAPI application factory."""

from __future__ import annotations

import anyio
from fastapi import APIRouter, FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse

from server.api.routes import accounts, assignments, staff, submissions, system
from server.catalog import Catalog
from server.config import Settings, get_settings
from server.db import session_factory_for
from server.errors import install_error_handlers
from server.ratelimit import RateLimitMiddleware, windows_for
from server.upload_limits import UploadLimitMiddleware
from server.web import install_pages
from server.web.errors import page_error

API_PREFIX = "/api/v1"
SWAGGER_UI = "/static/vendor/swagger-ui"
"""The vendored Swagger UI (npm's swagger-ui-dist) the API docs page loads: no CDN."""


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app for ``settings``; invalid assignment specs fail here, at start-up."""
    settings = settings or get_settings()
    app = FastAPI(
        title="Adversarial ML autograder",
        version="0.1.0",
        description="Attack and defense phases for CIFAR-10 courses; see the README.",
        openapi_url=f"{API_PREFIX}/openapi.json",
        docs_url=None,  # served below from the vendored Swagger UI, not a CDN
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.catalog = Catalog.load(
        settings.assignments_dir, visibility_timeout_s=settings.visibility_timeout_s
    )
    app.state.session_factory = session_factory_for(settings.db_url)
    app.state.db_sessions = anyio.Semaphore(settings.api_db_sessions)  # see server.deps.get_db
    install_error_handlers(app, pages=page_error)
    api = APIRouter(prefix=API_PREFIX)
    for module in (system, accounts, assignments, submissions, staff):
        api.include_router(module.router)
    api.include_router(submissions.receipts_router)
    app.include_router(api)
    app.include_router(system.metrics_router)
    install_pages(app)

    @app.get("/docs", include_in_schema=False)
    def api_docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=f"{API_PREFIX}/openapi.json",
            title="Adversarial ML autograder: API",
            swagger_js_url=f"{SWAGGER_UI}/swagger-ui-bundle.js",
            swagger_css_url=f"{SWAGGER_UI}/swagger-ui.css",
            swagger_favicon_url="/static/favicon.svg",
        )

    app.add_middleware(UploadLimitMiddleware, settings=settings, catalog=app.state.catalog)
    app.state.rate_windows = windows_for(settings)
    if settings.rate_limits:
        app.add_middleware(RateLimitMiddleware, settings=settings, windows=app.state.rate_windows)
    return app
