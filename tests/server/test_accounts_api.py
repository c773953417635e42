"""Accounts: roster import with one-time invitations (API and CLI), accepting an invitation,
personal API tokens, pseudonyms and per-student quota grants."""

from __future__ import annotations

import csv
import io
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from server import cli
from server.config import Settings, get_settings
from server.db import utcnow
from server.main import create_app
from server.models import Invitation, Role, Submission, SubmissionStatus, User
from server.security import login
from server.services.submissions import quota
from tests.conftest import PHASE, SLUG, Account, Artifacts, perturbed, spec_toml, write_spec

BASE = f"/api/v1/assignments/{SLUG}/phases/{PHASE}"
ROSTER = "student_id,name,email\ns1001,Ada Lovelace,ada@uni.edu\ns1002,Alan Turing,alan@uni.edu\n"


def post_roster(client: TestClient, account: Account, text: str, **data: str):
    return client.post(
        "/api/v1/roster",
        headers=account.headers,
        files={"file": ("roster.csv", text.encode())},
        data=data,
    )


def students(db) -> dict[str, User]:
    with db() as session:
        rows = session.scalars(select(User).where(User.role == Role.STUDENT)).all()
        return {user.username: user for user in rows}


def test_roster_import_creates_students_with_one_time_invitations(
    client: TestClient, accounts: dict[str, Account], db
) -> None:
    assert post_roster(client, accounts["alice"], ROSTER).status_code == 403
    response = post_roster(client, accounts["ta"], ROSTER)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["created"] == 2 and body["invitations"] == 2
    codes = {s["student_id"]: s["invitation_code"] for s in body["students"]}
    assert all(code.startswith("inv_") for code in codes.values())
    assert students(db)["s1001"].email == "ada@uni.edu"
    with db() as session:  # only a hash of each code is stored
        stored = session.scalars(select(Invitation.code_hash)).all()
        assert len(stored) == 2 and not set(stored) & set(codes.values())

    accepted = client.post(
        "/api/v1/invitations/accept",
        json={"code": codes["s1001"], "password": "analytical-engine", "pseudonym": "countess"},
    )
    assert accepted.status_code == 200, accepted.text
    assert accepted.json() == {"username": "s1001", "role": "student", "pseudonym": "countess"}
    with db() as session:
        assert login(session, username="s1001", password="analytical-engine") is not None
    reused = client.post(
        "/api/v1/invitations/accept", json={"code": codes["s1001"], "password": "another-one"}
    )
    assert reused.status_code == 400 and "already used" in reused.json()["error"]["message"]

    # Re-importing updates details; only students without a password get a new code.
    again = post_roster(client, accounts["ta"], ROSTER.replace("Alan Turing", "A. M. Turing"))
    by_id = {s["student_id"]: s for s in again.json()["students"]}
    assert by_id["s1001"]["invitation_code"] is None and by_id["s1002"]["invitation_code"]
    assert again.json()["created"] == 0 and students(db)["s1002"].full_name == "A. M. Turing"
    old = client.post(
        "/api/v1/invitations/accept", json={"code": codes["s1002"], "password": "bombe-1940"}
    )
    assert old.status_code == 400  # the earlier code was replaced


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("id,name,email\n1,A,a@b.c\n", "missing: student_id"),
        ("student_id,name,email\ns1,Ann,not-an-email\n", "line 2: email 'not-an-email'"),
        ("student_id,name,email\ns1,Ann,a@b.cd\ns1,Bo,b@b.cd\n", "s1 also on line 2"),
        ("student_id,name,email\n../x,Ann,a@b.cd\n", "line 2: student_id '../x'"),
        ("student_id,name,email\n", "no students"),
    ],
)
def test_bad_roster_is_refused_with_its_lines_and_imports_nobody(
    client: TestClient, accounts: dict[str, Account], db, text: str, expected: str
) -> None:
    response = post_roster(client, accounts["ta"], text)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "invalid_roster"
    assert expected in response.json()["error"]["message"]
    assert set(students(db)) == {"alice", "bob"}


def test_one_bad_line_among_good_ones_imports_nobody(
    client: TestClient, accounts: dict[str, Account], db
) -> None:
    text = ROSTER + "s1003,Grace Hopper,grace-at-navy\n"
    response = post_roster(client, accounts["ta"], text)
    assert response.status_code == 422
    assert "line 4: email 'grace-at-navy'" in response.json()["error"]["message"]
    assert set(students(db)) == {"alice", "bob"}


def test_binary_or_staff_rows_are_refused(
    client: TestClient, accounts: dict[str, Account], db
) -> None:
    binary = client.post(
        "/api/v1/roster",
        headers=accounts["ta"].headers,
        files={"file": ("roster.csv", b"\xff\xfe\x00binary")},
    )
    assert binary.status_code == 422 and "UTF-8" in binary.json()["error"]["message"]
    staff_row = post_roster(client, accounts["ta"], "student_id,name,email\nta,T A,ta@uni.edu\n")
    assert staff_row.status_code == 422 and "course staff" in staff_row.json()["error"]["message"]


def test_expired_invitation_and_weak_password_are_refused(
    client: TestClient, accounts: dict[str, Account], db
) -> None:
    codes = [
        s["invitation_code"] for s in post_roster(client, accounts["ta"], ROSTER).json()["students"]
    ]
    weak = client.post("/api/v1/invitations/accept", json={"code": codes[0], "password": "short"})
    assert weak.status_code == 400 and "at least 8" in weak.json()["error"]["message"]
    retry = client.post(
        "/api/v1/invitations/accept", json={"code": codes[0], "password": "long enough now"}
    )
    assert retry.status_code == 200  # a refused attempt does not use the code up
    with db() as session:
        for row in session.scalars(select(Invitation)).all():
            row.expires_at = utcnow() - timedelta(seconds=1)
        session.commit()
    expired = client.post(
        "/api/v1/invitations/accept", json={"code": codes[1], "password": "long enough now"}
    )
    assert expired.status_code == 400 and "expired" in expired.json()["error"]["message"]


def test_cli_roster_import_writes_codes_that_work(
    settings: Settings, db, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    roster = tmp_path / "roster.csv"
    roster.write_text(ROSTER, encoding="utf-8")
    out = tmp_path / "codes.csv"
    monkeypatch.setenv("AUTOGRADER_HOME", str(settings.home))
    monkeypatch.setenv("AUTOGRADER_DATABASE_URL", settings.db_url)
    get_settings.cache_clear()
    try:
        assert cli.main(["roster", "import", str(roster), "--out", str(out)]) == 0
        bad = tmp_path / "bad.csv"
        bad.write_text("student_id,name\ns9,Nine\n", encoding="utf-8")
        assert cli.main(["roster", "import", str(bad)]) == 1
    finally:
        get_settings.cache_clear()
    rows = list(csv.DictReader(out.open(encoding="utf-8")))
    assert [row["student_id"] for row in rows] == ["s1001", "s1002"]
    assert out.stat().st_mode & 0o077 == 0
    assert rows[0]["invite_url"].endswith(f"/invite?code={rows[0]['invitation_code']}")
    with TestClient(create_app(settings)) as client:
        accepted = client.post(
            "/api/v1/invitations/accept",
            json={"code": rows[1]["invitation_code"], "password": "enigma-machine"},
        )
    assert accepted.status_code == 200 and accepted.json()["username"] == "s1002"
    with db() as session:
        assert session.scalar(select(func.count()).select_from(User)) == 2


def test_personal_tokens_are_shown_once_listed_without_values_and_revocable(
    client: TestClient, accounts: dict[str, Account]
) -> None:
    alice = accounts["alice"]
    created = client.post("/api/v1/me/tokens", headers=alice.headers, json={"name": "laptop"})
    assert created.status_code == 201
    token = created.json()["token"]
    mine = {"Authorization": f"Bearer {token}"}
    assert client.get("/api/v1/me", headers=mine).json()["username"] == "alice"
    listed = client.get("/api/v1/me/tokens", headers=mine).json()["data"]
    assert [t["name"] for t in listed] == ["default", "laptop"]
    assert token not in str(listed)
    other = client.delete(
        f"/api/v1/me/tokens/{created.json()['id']}", headers=accounts["bob"].headers
    )
    assert other.status_code == 404
    revoked = client.delete(f"/api/v1/me/tokens/{created.json()['id']}", headers=alice.headers)
    assert revoked.status_code == 204
    assert client.get("/api/v1/me", headers=mine).status_code == 401
    assert client.get("/api/v1/me", headers=alice.headers).status_code == 200


def test_pseudonym_is_checked_unique_and_used_on_the_leaderboard(
    client: TestClient, accounts: dict[str, Account]
) -> None:
    bad = client.patch("/api/v1/me", headers=accounts["alice"].headers, json={"pseudonym": "A!"})
    assert bad.status_code == 400 and "3-32 characters" in bad.json()["error"]["message"]
    ok = client.patch(
        "/api/v1/me", headers=accounts["alice"].headers, json={"pseudonym": "Gradient-Gremlin"}
    )
    assert ok.status_code == 200 and ok.json()["pseudonym"] == "gradient-gremlin"
    taken = client.patch(
        "/api/v1/me", headers=accounts["bob"].headers, json={"pseudonym": "gradient-gremlin"}
    )
    assert taken.status_code == 409


def test_quota_grant_lets_one_student_past_the_daily_limit(
    accounts: dict[str, Account], artifacts: Artifacts, settings: Settings, db
) -> None:
    write_spec(settings.assignments_dir, spec_toml(artifacts, max_per_day=1))

    def submit(client: TestClient, account: Account, seed: int) -> int:
        buffer = io.BytesIO()
        np.save(buffer, perturbed(artifacts.eval_set.images, seed=seed), allow_pickle=False)
        return client.post(
            f"{BASE}/submissions",
            headers=account.headers,
            files={"file": ("adv.npy", buffer.getvalue())},
        ).status_code

    with TestClient(create_app(settings)) as client:
        alice, ta = accounts["alice"], accounts["ta"]
        assert submit(client, alice, 1) == 202
        assert submit(client, alice, 2) == 429
        refused = client.put(
            f"{BASE}/quota/alice", headers=alice.headers, json={"extra_per_day": 5, "reason": "x"}
        )
        assert refused.status_code == 403
        raised = client.put(
            f"{BASE}/quota/alice",
            headers=ta.headers,
            json={"extra_per_day": 1, "reason": "lost a day to a server outage"},
        )
        assert raised.status_code == 200, raised.text
        assert raised.json()["max_per_day"] == 2 and raised.json()["used_today"] == 1
        assert submit(client, alice, 3) == 202
        assert submit(client, alice, 4) == 429
        assert submit(client, accounts["bob"], 5) == 202
        assert submit(client, accounts["bob"], 6) == 429  # only alice was raised
        events = client.get("/api/v1/audit", headers=ta.headers).json()["data"]
        assert events[0]["action"] == "quota_raised" and events[0]["subject"] == "alice"


def test_daily_quota_resets_at_midnight_in_the_course_timezone(
    accounts: dict[str, Account], artifacts: Artifacts, settings: Settings, db
) -> None:
    write_spec(settings.assignments_dir, spec_toml(artifacts, timezone="Asia/Tokyo"))
    assignment = create_app(settings).state.catalog.assignments[SLUG]
    phase = assignment.phase(PHASE)
    tokyo = ZoneInfo("Asia/Tokyo")
    before_midnight = datetime(2026, 11, 21, 23, 59, tzinfo=tokyo)  # 14:59 UTC
    with db() as session:
        session.add(
            Submission(
                user_id=accounts["alice"].user_id,
                assignment_slug=SLUG,
                phase_id=PHASE,
                status=SubmissionStatus.SCORED,
                file_name="a.npy",
                file_sha256="0" * 64,
                file_size=1,
                batch_path="/nonexistent",
                created_at=before_midnight,
            )
        )
        session.commit()
        user = session.get(User, accounts["alice"].user_id)
        same_day = quota(
            session=session,
            user=user,
            assignment=assignment,
            phase=phase,
            now=before_midnight + timedelta(seconds=30),
        )
        next_day = quota(
            session=session,
            user=user,
            assignment=assignment,
            phase=phase,
            now=before_midnight + timedelta(minutes=1),
        )
    assert same_day.used_today == 1 and same_day.used_total == 1
    assert same_day.resets_at == datetime(2026, 11, 22, 0, 0, tzinfo=tokyo)
    assert next_day.used_today == 0 and next_day.used_total == 1
