"""Staff actions over the REST API: cancel, regrade, score overrides, extensions, the score export
and the audit log; and the browser-session rules the pages rely on (cookie login, CSRF, public
leaderboards)."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from server.db import utcnow
from server.deps import CSRF_HEADER, SESSION_COOKIE
from server.main import create_app
from server.models import Submission, SubmissionStatus, User, WebSession
from server.security import login, set_password, start_session
from server.services.staff import EXPORT_COLUMNS
from tests.conftest import PHASE, SLUG, Account, Artifacts, perturbed, spec_toml, write_spec
from worker.scoring import Outcome, run_scoring

BASE = f"/api/v1/assignments/{SLUG}/phases/{PHASE}"


def upload(client: TestClient, account: Account, seed: int, artifacts: Artifacts) -> str:
    buffer = io.BytesIO()
    np.save(buffer, perturbed(artifacts.eval_set.images, seed=seed), allow_pickle=False)
    response = client.post(
        f"{BASE}/submissions",
        headers=account.headers,
        files={"file": ("adv.npy", buffer.getvalue())},
    )
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def scored(client, account, seed, artifacts, settings, db) -> str:
    submission_id = upload(client, account, seed, artifacts)
    assert run_scoring(submission_id, settings=settings, session_factory=db) is Outcome.SCORED
    return submission_id


def get(client: TestClient, account: Account, submission_id: str) -> dict:
    response = client.get(f"/api/v1/submissions/{submission_id}", headers=account.headers)
    assert response.status_code == 200, response.text
    return dict(response.json())


def audit(client: TestClient, ta: Account) -> list[dict]:
    response = client.get("/api/v1/audit", headers=ta.headers)
    assert response.status_code == 200, response.text
    return list(response.json()["data"])


def test_regrade_queues_again_keeps_the_old_outcome_in_the_audit_log_and_scores_anew(
    client: TestClient, accounts: dict[str, Account], artifacts: Artifacts, settings, db
) -> None:
    alice, ta = accounts["alice"], accounts["ta"]
    submission_id = scored(client, alice, 1, artifacts, settings, db)
    first = get(client, alice, submission_id)

    refused = client.post(
        f"/api/v1/submissions/{submission_id}/regrade", headers=alice.headers, json={"reason": "x"}
    )
    assert refused.status_code == 403
    no_reason = client.post(
        f"/api/v1/submissions/{submission_id}/regrade", headers=ta.headers, json={}
    )
    assert no_reason.status_code == 422 and no_reason.json()["error"]["code"] == "reason_required"

    response = client.post(
        f"/api/v1/submissions/{submission_id}/regrade",
        headers=ta.headers,
        json={"reason": "hidden model re-exported"},
    )
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "queued" and response.json()["score"] is None
    busy = client.post(
        f"/api/v1/submissions/{submission_id}/regrade", headers=ta.headers, json={"reason": "x"}
    )
    assert busy.status_code == 409
    assert run_scoring(submission_id, settings=settings, session_factory=db) is Outcome.SCORED
    again = get(client, alice, submission_id)
    assert again["status"] == "scored" and again["score"] == pytest.approx(first["score"])

    (event,) = audit(client, ta)
    assert event["action"] == "regrade" and event["actor"] == "ta"
    assert event["subject"] == "alice" and event["reason"] == "hidden model re-exported"
    assert event["details"]["status"] == "scored"
    assert event["details"]["score"] == pytest.approx(first["score"])


def test_student_cancels_own_queued_submission_uncharged_and_ta_stops_a_running_one(
    client: TestClient, accounts: dict[str, Account], artifacts: Artifacts, settings, db
) -> None:
    alice, bob, ta = accounts["alice"], accounts["bob"], accounts["ta"]
    queued = upload(client, alice, 1, artifacts)
    peek = client.post(f"/api/v1/submissions/{queued}/cancel", headers=bob.headers, json={})
    assert peek.status_code == 404
    own = client.post(f"/api/v1/submissions/{queued}/cancel", headers=alice.headers, json={})
    assert own.status_code == 200 and own.json()["status"] == "cancelled"
    assert "Cancelled by you" in own.json()["error_message"]
    quota = client.get(f"{BASE}/quota", headers=alice.headers).json()
    assert quota["used_total"] == 0
    # The worker receives the message later and does nothing.
    assert run_scoring(queued, settings=settings, session_factory=db) is Outcome.SKIPPED

    running = upload(client, alice, 2, artifacts)
    with db() as session:
        row = session.get(Submission, running)
        row.status, row.worker = SubmissionStatus.RUNNING, "host/abc"
        session.commit()
    student = client.post(f"/api/v1/submissions/{running}/cancel", headers=alice.headers, json={})
    assert student.status_code == 409 and "ask a TA" in student.json()["error"]["message"]
    stopped = client.post(
        f"/api/v1/submissions/{running}/cancel",
        headers=ta.headers,
        json={"reason": "stuck on a broken node"},
    )
    assert stopped.status_code == 200 and stopped.json()["status"] == "cancelled"
    assert [e["action"] for e in audit(client, ta)] == ["cancel", "cancel"]


def test_override_changes_the_final_score_leaderboard_and_export_and_can_be_cleared(
    client: TestClient, accounts: dict[str, Account], artifacts: Artifacts, settings, db
) -> None:
    alice, bob, ta = accounts["alice"], accounts["bob"], accounts["ta"]
    a_id = scored(client, alice, 1, artifacts, settings, db)
    b_id = scored(client, bob, 2, artifacts, settings, db)
    bad = client.post(
        f"/api/v1/submissions/{a_id}/override",
        headers=ta.headers,
        json={"score": 1.5, "reason": "r"},
    )
    assert bad.status_code == 400 and "between 0 and 1" in bad.json()["error"]["message"]

    response = client.post(
        f"/api/v1/submissions/{a_id}/override",
        headers=ta.headers,
        json={"score": 0.0, "reason": "regrade request 12 upheld"},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["final_score"] == 0.0 and body["score"] > 0.0
    assert body["override"]["reason"] == "regrade request 12 upheld"
    assert body["override"]["by"] == "ta"
    assert get(client, alice, a_id)["override"]["by"] is None  # students do not see who

    board = client.get(f"{BASE}/leaderboard", headers=alice.headers).json()["entries"]
    assert board[0]["is_you"] and board[0]["score"] == 0.0  # lower is better in attack phases

    export = client.get(f"{BASE}/scores.csv", headers=ta.headers)
    assert export.status_code == 200 and export.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(export.text)))
    assert tuple(rows[0].keys()) == EXPORT_COLUMNS
    by_user = {row["username"]: row for row in rows}
    assert by_user["alice"]["submission_id"] == a_id and by_user["alice"]["overridden"] == "yes"
    assert float(by_user["alice"]["final_score"]) == 0.0
    assert by_user["bob"]["submission_id"] == b_id and by_user["bob"]["overridden"] == "no"
    assert client.get(f"{BASE}/scores.csv", headers=alice.headers).status_code == 403

    cleared = client.post(
        f"/api/v1/submissions/{a_id}/override",
        headers=ta.headers,
        json={"score": None, "reason": "decision reversed"},
    )
    assert cleared.json()["override"] is None
    assert cleared.json()["final_score"] == cleared.json()["score"]
    actions = [(e["action"], e["details"]["new_override"]) for e in audit(client, ta)]
    assert actions == [("override", None), ("override", 0.0)]


def test_extension_reopens_a_closed_phase_for_one_student_until_it_ends(
    accounts: dict[str, Account], artifacts: Artifacts, settings, db
) -> None:
    alice, bob, ta = accounts["alice"], accounts["bob"], accounts["ta"]
    due = (utcnow() - timedelta(hours=1)).replace(microsecond=0)
    write_spec(
        settings.assignments_dir, spec_toml(artifacts, opens_at=due - timedelta(days=7), due_at=due)
    )
    with TestClient(create_app(settings)) as client:
        before = client.post(
            f"{BASE}/submissions", headers=alice.headers, files={"file": ("a.npy", b"x")}
        )
        assert before.status_code == 403 and before.json()["error"]["code"] == "phase_closed"
        too_early = client.put(
            f"{BASE}/extensions/alice",
            headers=ta.headers,
            json={"due_at": (due - timedelta(hours=1)).isoformat(), "reason": "ill"},
        )
        assert too_early.status_code == 400 and "after the phase's deadline" in too_early.text

        new_due = utcnow() + timedelta(days=2)
        granted = client.put(
            f"{BASE}/extensions/alice",
            headers=ta.headers,
            json={"due_at": new_due.isoformat(), "reason": "medical note"},
        )
        assert granted.status_code == 200, granted.text
        assert granted.json()["granted_by"] == "ta"
        assert (
            client.put(
                f"{BASE}/extensions/alice", headers=alice.headers, json=granted.json()
            ).status_code
            == 403
        )
        view = client.get(f"/api/v1/assignments/{SLUG}", headers=alice.headers).json()
        phase = next(p for p in view["phases"] if p["id"] == PHASE)
        assert phase["is_open"] and phase["your_due_at"].startswith(new_due.date().isoformat())
        assert upload(client, alice, 1, artifacts)
        refused = client.post(
            f"{BASE}/submissions", headers=bob.headers, files={"file": ("a.npy", b"x")}
        )
        assert refused.status_code == 403  # only alice was extended

        listed = client.get(f"{BASE}/extensions", headers=ta.headers).json()["data"]
        assert [e["username"] for e in listed] == ["alice"]
        revoked = client.delete(
            f"{BASE}/extensions/alice?reason=granted+in+error", headers=ta.headers
        )
        assert revoked.status_code == 204
        after = client.post(
            f"{BASE}/submissions", headers=alice.headers, files={"file": ("a.npy", b"x")}
        )
        assert after.status_code == 403
        assert [e["action"] for e in audit(client, ta)] == [
            "extension_revoked",
            "extension_granted",
        ]


def test_an_extension_that_ended_closes_the_phase_again(
    accounts: dict[str, Account], artifacts: Artifacts, settings, db
) -> None:
    due = datetime(2026, 1, 10, 17, 0, tzinfo=UTC)
    write_spec(
        settings.assignments_dir, spec_toml(artifacts, opens_at=due - timedelta(days=7), due_at=due)
    )
    with TestClient(create_app(settings)) as client:
        ended = due + timedelta(days=1)
        client.put(
            f"{BASE}/extensions/alice",
            headers=accounts["ta"].headers,
            json={"due_at": ended.isoformat(), "reason": "travel"},
        ).raise_for_status()
        response = client.post(
            f"{BASE}/submissions", headers=accounts["alice"].headers, files={"file": ("a", b"x")}
        )
    assert response.status_code == 403
    message = response.json()["error"]["message"]
    assert "2026-01-11 12:00 EST (your extended deadline)" in message


def test_regrade_phase_requeues_only_failed_ones_when_asked(
    client: TestClient, accounts: dict[str, Account], artifacts: Artifacts, settings, db
) -> None:
    ok = scored(client, accounts["alice"], 1, artifacts, settings, db)
    broken = upload(client, accounts["bob"], 2, artifacts)
    with db() as session:
        session.get(Submission, broken).status = SubmissionStatus.FAILED
        session.commit()
    ta = accounts["ta"]
    response = client.post(
        f"{BASE}/regrade", headers=ta.headers, json={"reason": "flaky node", "only_failed": True}
    )
    assert response.json() == {"queued": 1}
    assert get(client, ta, broken)["status"] == "queued"
    assert get(client, ta, ok)["status"] == "scored"
    everything = client.post(f"{BASE}/regrade", headers=ta.headers, json={"reason": "new version"})
    assert everything.json() == {"queued": 1}  # the one still queued is left alone
    assert get(client, ta, ok)["status"] == "queued"


def test_browser_session_needs_the_csrf_header_to_change_anything(
    client: TestClient, accounts: dict[str, Account], artifacts: Artifacts, settings, db
) -> None:
    queued = upload(client, accounts["alice"], 1, artifacts)
    with db() as session:
        user = session.get(User, accounts["alice"].user_id)
        set_password(user, "correct horse")
        assert login(session, username="alice", password="wrong horse") is None
        assert login(session, username="nobody", password="correct horse") is None
        assert login(session, username="alice", password="correct horse") is not None
        cookie, web_session = start_session(
            session, user=user, secret_key=settings.secret_key, lifetime_s=60
        )
        csrf = web_session.csrf_token
        session.commit()
    client.cookies.set(SESSION_COOKIE, cookie)
    assert client.get(f"/api/v1/submissions/{queued}").json()["id"] == queued
    forged = client.post(f"/api/v1/submissions/{queued}/cancel", json={})
    assert forged.status_code == 403 and forged.json()["error"]["code"] == "csrf_failed"
    wrong = client.post(f"/api/v1/submissions/{queued}/cancel", json={}, headers={CSRF_HEADER: "x"})
    assert wrong.status_code == 403
    ok = client.post(f"/api/v1/submissions/{queued}/cancel", json={}, headers={CSRF_HEADER: csrf})
    assert ok.status_code == 200 and ok.json()["status"] == "cancelled"

    with db() as session:  # an expired session is refused like a missing one
        row = session.scalars(select(WebSession)).one()
        row.expires_at = utcnow() - timedelta(seconds=1)
        session.commit()
    expired = client.get(f"/api/v1/submissions/{queued}")
    assert expired.status_code == 401 and "/login" in expired.json()["error"]["message"]


def test_leaderboard_is_public_only_when_the_course_says_so(
    accounts: dict[str, Account], artifacts: Artifacts, settings, db
) -> None:
    with TestClient(create_app(settings)) as client:
        assert client.get(f"{BASE}/leaderboard").status_code == 401
    text = spec_toml(artifacts).replace(
        'timezone = "America/New_York"', 'timezone = "America/New_York"\npublic_leaderboard = true'
    )
    write_spec(settings.assignments_dir, text)
    with TestClient(create_app(settings)) as client:
        upload(client, accounts["alice"], 1, artifacts)
        board = client.get(f"{BASE}/leaderboard")
        assert board.status_code == 200 and board.json()["entries"] == []
        assert client.get(f"{BASE}/quota").status_code == 401  # only the board is public


def test_receipt_is_signed_verifiable_and_shows_a_later_override(
    client: TestClient, accounts: dict[str, Account], artifacts: Artifacts, settings, db
) -> None:
    alice, ta = accounts["alice"], accounts["ta"]
    queued = upload(client, alice, 9, artifacts)
    early = client.get(f"/api/v1/submissions/{queued}/receipt", headers=alice.headers)
    assert early.status_code == 409  # only scored submissions get receipts
    assert run_scoring(queued, settings=settings, session_factory=db) is Outcome.SCORED
    assert (
        client.get(
            f"/api/v1/submissions/{queued}/receipt", headers=accounts["bob"].headers
        ).status_code
        == 404
    )
    signed = client.get(f"/api/v1/submissions/{queued}/receipt", headers=alice.headers).json()
    receipt = signed["receipt"]
    assert receipt["file_sha256"] == get(client, alice, queued)["file_sha256"]
    assert receipt["evaluation_set_sha256"] == artifacts.eval_sha
    assert receipt["hidden_model_sha256"] == artifacts.weights
    assert receipt["evaluator_version"] and receipt["score"] == receipt["final_score"]

    check = client.post("/api/v1/receipts/verify", headers=alice.headers, json=signed).json()
    assert check == {"valid": True, "matches_record": True, "differences": {}}
    forged = {**signed, "receipt": {**receipt, "score": 0.0}}
    bad = client.post("/api/v1/receipts/verify", headers=alice.headers, json=forged).json()
    assert bad["valid"] is False

    client.post(
        f"/api/v1/submissions/{queued}/override",
        headers=ta.headers,
        json={"score": 0.01, "reason": "appeal 3"},
    ).raise_for_status()
    later = client.post("/api/v1/receipts/verify", headers=ta.headers, json=signed).json()
    assert later["valid"] and not later["matches_record"]
    assert later["differences"] == {"final_score": {"receipt": receipt["score"], "now": 0.01}}
