"""What the two ASGI middlewares (rate limits, streaming upload caps) share: the ASGI types and
an error answer sent before the app has read the request."""

from __future__ import annotations

import html
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from server.errors import error_body

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


async def send_error(
    send: Send,
    scope: Scope,
    *,
    status: int,
    code: str,
    title: str,
    message: str,
    details: dict[str, Any],
    headers: list[tuple[bytes, bytes]],
) -> None:
    """Answer with our JSON error shape under ``/api/``, a short HTML page elsewhere."""
    if scope["path"].startswith("/api/"):
        body = json.dumps(error_body(code, message, details)).encode()
        content_type = b"application/json"
    else:
        page = f"<!doctype html><title>{title}</title><p>{html.escape(message)}</p>"
        body = page.encode()
        content_type = b"text/html; charset=utf-8"
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
