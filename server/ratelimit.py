"""Rate limits on uploads and logins, answered with 429 and ``Retry-After``.

Limits are fixed windows ("20 per 60 s") counted per address and per credential (the API token
or the session cookie, hashed). They are checked in an ASGI middleware before the request body
is read, so a client over its limit cannot make the server parse an upload. Counters live in
Redis when the broker is Redis, so every API process shares them; the embedded default (one API
process) counts in memory. If Redis is down, requests go through unlimited: an upload accepted
while the broker is away is queued later, and the limits must not turn that into an error.
A username with too many failed logins is locked for the window (:func:`record_login_failure`,
:func:`login_locked`), whatever address the attempts come from.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import re
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol

from server.asgi import ASGIApp, Receive, Scope, Send, send_error
from server.config import Settings

UPLOAD_PATH = re.compile(r"^/api/v1/assignments/[^/]+/phases/[^/]+/submissions/?$")
LOGIN_PATHS = frozenset({"/login", "/invite", "/api/v1/invitations/accept"})
ROSTER_PATH = "/api/v1/roster"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rule:
    limit: int
    window_s: float

    @classmethod
    def parse(cls, text: str) -> Rule:
        """``"20/60"``: at most 20 in any 60-second window."""
        count, _, window = text.partition("/")
        try:
            rule = cls(int(count), float(window))
        except ValueError:
            raise ValueError(f"a rate limit is COUNT/SECONDS like '20/60', got {text!r}") from None
        if rule.limit < 1 or rule.window_s <= 0:
            raise ValueError(f"a rate limit needs a positive count and window, got {text!r}")
        return rule

    def __str__(self) -> str:
        return f"{self.limit} per {self.window_s:g} s"


class Windows(Protocol):
    async def hit(self, key: str, window_s: float) -> tuple[int, float]:
        """Count one more event for ``key``; returns the count in the current window and the
        seconds until that window ends."""

    async def count(self, key: str, window_s: float) -> tuple[int, float]:
        """The count in the current window without adding one."""


class MemoryWindows:
    """Counters in this process (the embedded default runs one API process)."""

    def __init__(self) -> None:
        self._counts: dict[tuple[str, int], int] = {}
        self._lock = threading.Lock()

    def _slot(self, window_s: float) -> tuple[int, float]:
        now = time.time()
        return int(now // window_s), window_s - now % window_s

    async def hit(self, key: str, window_s: float) -> tuple[int, float]:
        slot, left = self._slot(window_s)
        with self._lock:
            if len(self._counts) > 100_000:  # drop finished windows now and then
                current = {k: v for k, v in self._counts.items() if k[1] >= slot - 1}
                self._counts = current
            count = self._counts.get((key, slot), 0) + 1
            self._counts[(key, slot)] = count
        return count, left

    async def count(self, key: str, window_s: float) -> tuple[int, float]:
        slot, left = self._slot(window_s)
        with self._lock:
            return self._counts.get((key, slot), 0), left


class RedisWindows:
    """Counters in Redis, shared by every API process."""

    def __init__(self, url: str) -> None:
        import redis.asyncio as aioredis

        self._url = url
        self._clients: dict[int, Any] = {}
        self._factory = aioredis.Redis.from_url

    def _client(self) -> Any:
        loop = id(asyncio.get_running_loop())  # a client belongs to one event loop
        if loop not in self._clients:
            self._clients[loop] = self._factory(
                self._url, socket_timeout=1, socket_connect_timeout=1
            )
        return self._clients[loop]

    async def hit(self, key: str, window_s: float) -> tuple[int, float]:
        now = time.time()
        slot_key = f"autograder:rate:{key}:{int(now // window_s)}"
        pipe = self._client().pipeline()
        pipe.incr(slot_key)
        pipe.expire(slot_key, math.ceil(window_s) + 1)
        count, _ = await pipe.execute()
        return int(count), window_s - now % window_s

    async def count(self, key: str, window_s: float) -> tuple[int, float]:
        now = time.time()
        value = await self._client().get(f"autograder:rate:{key}:{int(now // window_s)}")
        return int(value or 0), window_s - now % window_s


def windows_for(settings: Settings) -> Windows:
    url = settings.broker_url
    return RedisWindows(url) if url.startswith(("redis://", "rediss://")) else MemoryWindows()


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()[:32]


def _credential(scope: Scope) -> str | None:
    """A stable, hashed key for the caller's token or session cookie, if any."""
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
    auth = headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return "token:" + _digest(auth[7:].strip())
    for part in headers.get("cookie", "").split(";"):
        name, _, value = part.strip().partition("=")
        if name == "autograder_session" and value:
            return "session:" + _digest(value)
    return None


class RateLimitMiddleware:
    """Answers 429 with ``Retry-After`` before the app reads a request over its limits."""

    def __init__(self, app: ASGIApp, *, settings: Settings, windows: Windows) -> None:
        self.app = app
        self.windows = windows
        self.uploads = [
            ("address", Rule.parse(settings.upload_rate_per_address)),
            ("credential", Rule.parse(settings.upload_rate_per_user)),
        ]
        self.logins = [("address", Rule.parse(settings.login_rate_per_address))]

    def _rules(self, path: str) -> tuple[str, list[tuple[str, Rule]]] | None:
        if UPLOAD_PATH.match(path) or path == ROSTER_PATH:
            return "upload", self.uploads
        if path in LOGIN_PATHS:
            return "login", self.logins
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        found = self._rules(scope["path"])
        if found is None:
            await self.app(scope, receive, send)
            return
        kind, rules = found
        client = scope.get("client")
        keys = {"address": f"addr:{client[0] if client else 'unknown'}"}
        credential = _credential(scope)
        if credential is not None:
            keys["credential"] = credential
        for scope_name, rule in rules:
            if scope_name not in keys:
                continue
            try:
                count, left = await self.windows.hit(f"{kind}:{keys[scope_name]}", rule.window_s)
            except Exception:  # the counters' Redis is down: let requests through, not fail them
                log.warning("rate limit counters unavailable; %s not limited", kind, exc_info=True)
                break
            if count > rule.limit:
                await _too_many(send, scope, kind, scope_name, rule, left)
                return
        await self.app(scope, receive, send)


async def _too_many(
    send: Send, scope: Scope, kind: str, per: str, rule: Rule, left_s: float
) -> None:
    retry = max(1, math.ceil(left_s))
    who = "from your address" if per == "address" else "with your account"
    what = "uploads" if kind == "upload" else "login attempts"
    message = (
        f"Too many {what} {who}: at most {rule}. Try again in {retry} s; nothing was received "
        "or counted."
    )
    await send_error(
        send,
        scope,
        status=429,
        code="rate_limited",
        title="Too many requests",
        message=message,
        details={"retry_after_s": retry, "limit": str(rule)},
        headers=[(b"retry-after", str(retry).encode())],
    )


async def record_login_failure(windows: Windows, settings: Settings, username: str) -> None:
    rule = Rule.parse(settings.login_failures_per_user)
    await windows.hit(f"login-failure:{_digest(username.lower())}", rule.window_s)


async def login_locked(windows: Windows, settings: Settings, username: str) -> float | None:
    """Seconds until ``username`` may try again after too many failed logins, or ``None``."""
    rule = Rule.parse(settings.login_failures_per_user)
    count, left = await windows.count(f"login-failure:{_digest(username.lower())}", rule.window_s)
    return left if count >= rule.limit else None
