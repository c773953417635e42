"""Request-body caps enforced while the body streams in: a request over its route's cap is
answered 413 from its Content-Length at once, or as soon as the bytes received pass the cap,
never after the whole body was read and spooled to disk."""

from __future__ import annotations

from dataclasses import dataclass

from server.asgi import ASGIApp, Message, Receive, Scope, Send, send_error
from server.catalog import Catalog
from server.config import Settings
from server.ratelimit import ROSTER_PATH, UPLOAD_PATH
from server.services.accounts import MAX_ROSTER_BYTES
from server.services.submissions import upload_limit

MULTIPART_ALLOWANCE = 64 * 1024
"""What the multipart framing, the form fields and a defense manifest may add to the file."""
OTHER_BODY_BYTES = 1024 * 1024
"""Any request that is not an upload: forms and JSON bodies are a few KiB."""
WEB_ROSTER_PATH = "/ta/roster"


@dataclass(frozen=True)
class BodyCap:
    """The most bytes a request body may have, and the file limit that a refusal names."""

    body_bytes: int
    file_bytes: int
    message: str


class _BodyTooLarge(Exception):
    """Raised into the app from ``receive`` once the body passes its cap."""


class UploadLimitMiddleware:
    """Answers 413 (and closes the connection) once a request body passes its route's cap:
    an upload its phase's limit (or the roster's 1 MiB) plus ``MULTIPART_ALLOWANCE``, any other
    request ``OTHER_BODY_BYTES``. Nothing is buffered here; the app reads what passes through."""

    def __init__(self, app: ASGIApp, *, settings: Settings, catalog: Catalog) -> None:
        self.app = app
        self.settings = settings
        self.catalog = catalog

    def cap(self, path: str) -> BodyCap:
        if UPLOAD_PATH.match(path):
            _, _, _, slug, _, phase_id, *_ = path.strip("/").split("/")
            assignment = self.catalog.assignments.get(slug)
            phase = assignment.phase(phase_id) if assignment is not None else None
            limit = (
                upload_limit(settings=self.settings, phase=phase)
                if phase is not None
                else self.settings.max_upload_bytes
            )
            return BodyCap(
                limit + MULTIPART_ALLOWANCE,
                limit,
                f"The upload is larger than this phase's limit of {limit / 2**20:.1f} MiB; "
                "nothing was stored or counted. Upload the batch compressed (zip of PNGs or "
                ".npz), or check that you are uploading the right file.",
            )
        if path in (ROSTER_PATH, WEB_ROSTER_PATH):
            return BodyCap(
                MAX_ROSTER_BYTES + MULTIPART_ALLOWANCE,
                MAX_ROSTER_BYTES,
                f"The roster is larger than {MAX_ROSTER_BYTES // 2**20} MiB; nobody was "
                "imported. Upload only the CSV (student_id,name,email).",
            )
        return BodyCap(
            OTHER_BODY_BYTES,
            OTHER_BODY_BYTES,
            f"The request body is larger than {OTHER_BODY_BYTES // 2**20} MiB.",
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        cap = self.cap(scope["path"])
        declared = _content_length(scope)
        if declared is not None and declared > cap.body_bytes:
            await _too_large(send, scope, cap)
            return
        received = 0
        exceeded = started = False

        async def capped_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > cap.body_bytes:
                    exceeded = True
                    raise _BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if exceeded and not started:
                return  # the app's answer to a body cut short; the 413 below replaces it
            started = True
            await send(message)

        try:
            await self.app(scope, capped_receive, guarded_send)
        except _BodyTooLarge:
            pass
        if exceeded and not started:
            await _too_large(send, scope, cap)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name.lower() == b"content-length":
            text = value.decode("latin-1").strip()
            return int(text) if text.isdigit() else None
    return None


async def _too_large(send: Send, scope: Scope, cap: BodyCap) -> None:
    await send_error(
        send,
        scope,
        status=413,
        code="file_too_large",
        title="Too large",
        message=cap.message,
        details={"limit_bytes": cap.file_bytes},
        headers=[(b"connection", b"close")],
    )
