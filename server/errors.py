"""Service exceptions and the one place that maps every domain exception to an HTTP answer.

Every error answer has the shape ``{"error": {"code", "message", "details"}}``.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
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


def install_error_handlers(app: FastAPI) -> None:
    """Map domain exceptions to JSON error answers (the only place this happens)."""

    @app.exception_handler(ServiceError)
    async def _service(_: Request, exc: ServiceError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, NotAuthenticated) else None
        return JSONResponse(
            error_body(exc.code, exc.message, exc.details), exc.status, headers=headers
        )

    @app.exception_handler(SubmissionRejected)
    async def _rejected(_: Request, exc: SubmissionRejected) -> JSONResponse:
        return JSONResponse(error_body(exc.code, exc.message, exc.details), exc.status)

    @app.exception_handler(ArtifactError)
    async def _artifact(_: Request, exc: ArtifactError) -> JSONResponse:
        return JSONResponse(
            error_body(
                "artifact_unavailable",
                "A file of this phase is missing or does not match its pinned hash; "
                "the course staff must fix the data directory.",
            ),
            503,
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [
            {"field": ".".join(str(p) for p in e["loc"]), "message": e["msg"]} for e in exc.errors()
        ]
        summary = "; ".join(f"{p['field']}: {p['message']}" for p in problems)
        return JSONResponse(
            error_body(
                "invalid_request", f"The request is invalid: {summary}", {"problems": problems}
            ),
            422,
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(error_body(code, str(exc.detail)), exc.status_code, headers=exc.headers)
