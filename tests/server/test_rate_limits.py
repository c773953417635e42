"""Rate limits: uploads per account and per address, login attempts per address, failed logins
per username; 429 with Retry-After before the body is read; counters shared through Redis."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError
from sqlalchemy import func, select

from server.config import Settings
from server.main import create_app
from server.models import Submission, User
from server.ratelimit import (
    MemoryWindows,
    RedisWindows,
    Rule,
    login_locked,
    record_login_failure,
)
from server.security import set_password
from tests.conftest import PHASE, SLUG, Account, Artifacts, perturbed
from tests.e2e.servers import redis_server
from tests.server.test_web_pages import log_in

BASE = f"/api/v1/assignments/{SLUG}/phases/{PHASE}"


def batch(artifacts: Artifacts, seed: int) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, perturbed(artifacts.eval_set.images, seed=seed), allow_pickle=False)
    return buffer.getvalue()


def test_uploads_past_the_per_account_limit_get_429_with_retry_after(
    settings: Settings, db, accounts: dict[str, Account], artifacts: Artifacts
) -> None:
    limited = settings.model_copy(update={"upload_rate_per_user": "2/60"})
    with TestClient(create_app(limited)) as client:

        def post(account: Account, seed: int):
            return client.post(
                f"{BASE}/submissions",
                headers=account.headers,
                files={"file": ("adv.npy", batch(artifacts, seed))},
            )

        assert [post(accounts["alice"], s).status_code for s in (1, 2)] == [202, 202]
        refused = post(accounts["alice"], 3)
        assert refused.status_code == 429
        assert 1 <= int(refused.headers["retry-after"]) <= 60
        error = refused.json()["error"]
        assert error["code"] == "rate_limited" and "2 per 60 s" in error["message"]
        assert error["details"]["retry_after_s"] == int(refused.headers["retry-after"])
        assert post(accounts["bob"], 4).status_code == 202  # another account is not affected
        assert client.get(f"{BASE}/quota", headers=accounts["alice"].headers).status_code == 200
    with db() as session:
        assert session.scalar(select(func.count()).select_from(Submission)) == 3


def test_uploads_past_the_per_address_limit_are_refused_for_everyone_there(
    settings: Settings, db, accounts: dict[str, Account], artifacts: Artifacts
) -> None:
    limited = settings.model_copy(update={"upload_rate_per_address": "1/60"})
    with TestClient(create_app(limited)) as client:
        first = client.post(
            f"{BASE}/submissions",
            headers=accounts["alice"].headers,
            files={"file": ("adv.npy", batch(artifacts, 1))},
        )
        second = client.post(
            f"{BASE}/submissions",
            headers=accounts["bob"].headers,
            files={"file": ("adv.npy", batch(artifacts, 2))},
        )
    assert (first.status_code, second.status_code) == (202, 429)
    assert "from your address" in second.json()["error"]["message"]


def test_login_attempts_per_address_get_an_html_429(settings: Settings, db) -> None:
    limited = settings.model_copy(update={"login_rate_per_address": "2/300"})
    with TestClient(create_app(limited)) as client:
        answers = [client.post("/login", data={"username": "x", "password": "y"}) for _ in range(3)]
    assert all(a.status_code != 429 for a in answers[:2])
    assert answers[2].status_code == 429 and "retry-after" in answers[2].headers
    assert answers[2].headers["content-type"].startswith("text/html")
    assert "Too many login attempts" in answers[2].text


def test_rate_limits_can_be_switched_off(
    settings: Settings, db, accounts: dict[str, Account], artifacts: Artifacts
) -> None:
    off = settings.model_copy(update={"upload_rate_per_user": "1/60", "rate_limits": False})
    with TestClient(create_app(off)) as client:
        codes = [
            client.post(
                f"{BASE}/submissions",
                headers=accounts["alice"].headers,
                files={"file": ("adv.npy", batch(artifacts, seed))},
            ).status_code
            for seed in (1, 2)
        ]
    assert codes == [202, 202]


def test_failed_logins_lock_the_username_for_the_window(settings: Settings) -> None:
    windows = MemoryWindows()
    strict = settings.model_copy(update={"login_failures_per_user": "3/900"})

    async def scenario() -> tuple[float | None, float | None, float | None]:
        for _ in range(2):
            await record_login_failure(windows, strict, "Alice")
        before = await login_locked(windows, strict, "alice")
        await record_login_failure(windows, strict, "alice")
        return (
            before,
            await login_locked(windows, strict, "ALICE"),
            await login_locked(windows, strict, "bob"),
        )

    before, locked, other = asyncio.run(scenario())
    assert before is None and other is None
    assert locked is not None and 0 < locked <= 900


@pytest.mark.parametrize("text", ["20", "0/60", "20/0", "a/b", "20/-1"])
def test_bad_rules_are_refused_with_the_expected_form(text: str) -> None:
    with pytest.raises(ValueError, match="rate limit"):
        Rule.parse(text)
    with pytest.raises(ValidationError, match="COUNT/SECONDS|positive"):
        Settings(upload_rate_per_user=text)


@pytest.mark.production
def test_redis_counters_are_shared_between_api_processes(tmp_path: Path) -> None:
    with redis_server(tmp_path / "redis") as server:

        async def scenario() -> list[int]:
            first, second = RedisWindows(server.url), RedisWindows(server.url)
            counts = [(await first.hit("upload:addr:1.2.3.4", 60))[0] for _ in range(2)]
            counts.append((await second.hit("upload:addr:1.2.3.4", 60))[0])
            counts.append((await second.count("upload:addr:1.2.3.4", 60))[0])
            counts.append((await first.hit("upload:addr:5.6.7.8", 60))[0])
            return counts

        assert asyncio.run(scenario()) == [1, 2, 3, 3, 1]


def test_unreachable_counters_let_uploads_through(
    settings: Settings, db, accounts: dict[str, Account], artifacts: Artifacts
) -> None:
    down = settings.model_copy(
        update={"celery_broker_url": "redis://127.0.0.1:9/0", "upload_rate_per_user": "1/60"}
    )
    with TestClient(create_app(down)) as client:
        assert isinstance(client.app.state.rate_windows, RedisWindows)
        codes = [
            client.post(
                f"{BASE}/submissions",
                headers=accounts["alice"].headers,
                files={"file": ("adv.npy", batch(artifacts, seed))},
            ).status_code
            for seed in (1, 2)
        ]
    assert codes == [202, 202]  # accepted (queued for later), not refused or failed


def test_a_username_with_too_many_failed_logins_waits_even_with_the_right_password(
    settings: Settings, db, accounts: dict[str, Account]
) -> None:
    with db() as session:
        for name in ("alice", "bob"):
            user = session.scalar(select(User).where(User.username == name))
            set_password(user, "correct horse")
        session.commit()
    strict = settings.model_copy(update={"login_failures_per_user": "2/900"})
    with TestClient(create_app(strict), follow_redirects=False) as client:
        wrong = [log_in(client, "alice", "wrong horse").status_code for _ in range(2)]
        locked = log_in(client, "alice", "correct horse")
        other = log_in(client, "bob", "correct horse")
    assert wrong == [401, 401]
    assert locked.status_code == 429 and 1 <= int(locked.headers["retry-after"]) <= 900
    assert "Too many failed logins for this username" in locked.text
    assert other.status_code == 303  # another username is not locked
