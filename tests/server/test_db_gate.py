"""Many requests at once: the API bounds the database sessions it holds, so requests waiting for a
connection never take every worker thread from the requests that would give one back."""

from __future__ import annotations

import asyncio
import threading

import httpx
import pytest
from sqlalchemy import event
from sqlalchemy.orm import Session, sessionmaker

from server.config import Settings
from server.main import create_app
from tests.conftest import PHASE, SLUG, Account


class CheckoutMeter:
    """The most connections of an engine's pool that were checked out at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.out = self.most = 0

    def checkout(self, *_: object) -> None:
        with self.lock:
            self.out += 1
            self.most = max(self.most, self.out)

    def checkin(self, *_: object) -> None:
        with self.lock:
            self.out -= 1


async def hammer(app: object, paths: list[str], headers: dict[str, str]) -> list[httpx.Response]:
    transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=120) as http:
        return await asyncio.gather(*(http.get(path, headers=headers) for path in paths))


@pytest.mark.parametrize("sessions", [4, 24])
def test_three_hundred_requests_at_once_are_all_answered_within_the_session_bound(
    settings: Settings, db: sessionmaker[Session], accounts: dict[str, Account], sessions: int
) -> None:
    # 300 requests against 40 worker threads and a pool of 30 connections: without the bound,
    # every thread ends up waiting for a connection held by a request whose clean-up needs a
    # thread, and the requests fail with the pool's timeout (30 s) instead of being answered.
    engine = db.kw["bind"]
    meter = CheckoutMeter()
    event.listen(engine, "checkout", meter.checkout)
    event.listen(engine, "checkin", meter.checkin)
    try:
        app = create_app(settings.model_copy(update={"api_db_sessions": sessions}))
        paths = [
            "/api/v1/me",
            "/api/v1/submissions",
            f"/api/v1/assignments/{SLUG}/phases/{PHASE}/leaderboard",
        ] * 100
        responses = asyncio.run(hammer(app, paths, accounts["alice"].headers))
    finally:
        event.remove(engine, "checkout", meter.checkout)
        event.remove(engine, "checkin", meter.checkin)
    assert [r.status_code for r in responses] == [200] * len(paths)
    assert responses[0].json()["username"] == "alice"
    assert 1 <= meter.most <= sessions
    assert meter.out == 0
