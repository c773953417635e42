"""Domain exceptions raised by the graders; callers map them to HTTP codes or submission states."""

from __future__ import annotations

from typing import Any


class GraderError(Exception):
    """A grader could not produce a report (bad artifact, broken model, internal failure)."""


class ArtifactError(GraderError):
    """A hidden artifact is missing, unreadable or does not match its pinned sha256."""


class SubmissionRejected(Exception):
    """An upload breaks a rule a student can fix; nothing is stored or charged.

    ``code`` is a stable machine-readable identifier (``threat_model_violated``), ``message`` a
    sentence that says what is wrong and how to fix it, ``details`` structured data (offending
    images and their distances, expected shapes, ...). ``status`` is the HTTP status it maps to.
    """

    def __init__(
        self,
        code: str,
        message: str,
        details: dict[str, Any] | None = None,
        *,
        status: int = 422,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details or {}
        self.status = status
