"""Service exceptions and the one place that maps every domain exception to an HTTP answer.

Every API error answer has the shape ``{"error": {"code", "message", "details"}}``; the browser
pages get an HTML page instead (see :func:`install_error_handlers`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from graders.errors import ArtifactError, SubmissionRejected


class ServiceError(Exception):
    """A request the service refuses, with a stable code and a message saying how to fix it."""

    status = 400
    code = "bad_request"

    def __init__(self, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or {}


class NotAuthenticated(ServiceError):
    status, code = 401, "not_authenticated"


class Forbidden(ServiceError):
    status, code = 403, "forbidden"


class CsrfFailed(ServiceError):
    status, code = 403, "csrf_failed"


class NotFound(ServiceError):
    status, code = 404, "not_found"


class Conflict(ServiceError):
    status, code = 409, "conflict"


class PhaseClosed(ServiceError):
    status, code = 403, "phase_closed"


class QuotaExceeded(ServiceError):
    status, code = 429, "quota_exceeded"


class UploadTooLarge(ServiceError):
    status, code = 413, "file_too_large"


def error_body(code: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "details": details or {}}}


PageErrors = Callable[[Request, int, str, str], Response | None]
"""Renders an error for a browser page (status, code, message), or returns ``None`` where the
JSON answer stays (the API): :func:`server.web.errors.page_error`."""


def install_error_handlers(app: FastAPI, pages: PageErrors | None = None) -> None:
    """Map domain exceptions to error answers (the only place this happens): JSON for the API
    and, given ``pages``, an HTML page for the browser routes."""

    def answer(
        request: Request,
        status: int,
        code: str,
        message: str,
        details: dict[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Response:
        page = pages(request, status, code, message) if pages is not None else None
        if page is not None:
            return page
        return JSONResponse(error_body(code, message, details), status, headers=headers)

    @app.exception_handler(ServiceError)
    async def _service(request: Request, exc: ServiceError) -> Response:
        headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, NotAuthenticated) else None
        return answer(request, exc.status, exc.code, exc.message, exc.details, headers)

    @app.exception_handler(SubmissionRejected)
    async def _rejected(request: Request, exc: SubmissionRejected) -> Response:
        return answer(request, exc.status, exc.code, exc.message, exc.details)

    @app.exception_handler(ArtifactError)
    async def _artifact(request: Request, exc: ArtifactError) -> Response:
        return answer(
            request,
            503,
            "artifact_unavailable",
            "A file of this phase is missing or does not match its pinned hash; "
            "the course staff must fix the data directory.",
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        problems = [
            {"field": ".".join(str(p) for p in e["loc"]), "message": e["msg"]} for e in exc.errors()
        ]
        summary = "; ".join(f"{p['field']}: {p['message']}" for p in problems)
        return answer(
            request,
            422,
            "invalid_request",
            f"The request is invalid: {summary}",
            {"problems": problems},
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return answer(request, exc.status_code, code, str(exc.detail), headers=exc.headers)
