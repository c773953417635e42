"""The TA pages: who may open them, the dashboard's queues and filters, one submission with its
log, and the forms (cancel, regrade one or a phase, override, extensions, extra submissions,
the private board's reveal, the roster import) with their flash messages, CSRF check and audit
records."""

from __future__ import annotations

import html
import re
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from server.config import Settings
from server.db import utcnow
from server.deps import SESSION_COOKIE
from server.models import (
    AuditEvent,
    Extension,
    FailureCause,
    Submission,
    SubmissionStatus,
    User,
    WorkerHeartbeat,
)
from server.security import start_session
from server.web import staff_pages
from server.web.common import CSRF_FIELD
from server.web.staff_views import DeadlineInvalid, parse_local_deadline
from tests.conftest import PHASE, SLUG, Account, Artifacts
from tests.server.test_staff_api import scored, upload

PHASE_PAGE = f"/ta/assignments/{SLUG}/phases/{PHASE}"
ZONE = ZoneInfo("America/New_York")  # the test course's timezone (tests/conftest.spec_toml)


def log_in(client: TestClient, db: sessionmaker[Session], settings: Settings, who: Account) -> str:
    """Start a browser session for ``who`` in ``client``; returns its CSRF token."""
    with db() as session:
        user = session.get(User, who.user_id)
        cookie, web_session = start_session(
            session, user=user, secret_key=settings.secret_key, lifetime_s=3600
        )
        csrf = web_session.csrf_token
        session.commit()
    client.cookies.set(SESSION_COOKIE, cookie)
    return csrf


def text(response) -> str:
    """The page as a reader sees its text (entities decoded)."""
    return html.unescape(response.text)


def status_of(db: sessionmaker[Session], submission_id: str) -> SubmissionStatus:
    with db() as session:
        return session.get(Submission, submission_id).status


def audit_events(db: sessionmaker[Session]) -> list[tuple[str, str, str]]:
    """(action, actor, reason) of every audit event, oldest first."""
    with db() as session:
        events = session.scalars(select(AuditEvent).order_by(AuditEvent.id)).all()
        return [(e.action.value, e.actor.username, e.reason) for e in events]


def fail(db: sessionmaker[Session], submission_id: str, message: str, log: str) -> None:
    with db() as session:
        row = session.get(Submission, submission_id)
        row.status, row.failure_cause = SubmissionStatus.FAILED, FailureCause.INTERNAL
        row.error_message, row.error_log = message, log
        row.finished_at = utcnow()
        session.commit()


def test_students_get_403_and_anonymous_visitors_are_sent_to_login(
    client: TestClient, accounts: dict[str, Account], artifacts: Artifacts, settings, db
) -> None:
    queued = upload(client, accounts["alice"], 1, artifacts)
    pages = ["/ta", f"/ta/submissions/{queued}", PHASE_PAGE, "/ta/audit"]
    for page in pages:
        anonymous = client.get(page, follow_redirects=False)
        assert anonymous.status_code == 303, page
        assert anonymous.headers["location"].startswith("/login?next=%2Fta"), page

    csrf = log_in(client, db, settings, accounts["alice"])
    for page in pages:
        refused = client.get(page)
        assert refused.status_code == 403, page
        assert "Only course staff" in text(refused)
    # The service would let alice cancel her own queued submission, but not through a TA form.
    posted = client.post(
        f"/ta/submissions/{queued}/cancel", data={CSRF_FIELD: csrf, "reason": "mine"}
    )
    assert posted.status_code == 403
    assert status_of(db, queued) is SubmissionStatus.QUEUED
    assert audit_events(db) == []
    home = client.get("/")
    assert home.status_code == 200 and 'href="/ta"' not in home.text  # no TA link for students


def test_dashboard_shows_queues_workers_failures_and_filters_narrow_the_table(
    client: TestClient, accounts: dict[str, Account], artifacts: Artifacts, settings, db
) -> None:
    alice_scored = scored(client, accounts["alice"], 1, artifacts, settings, db)
    bob_queued = upload(client, accounts["bob"], 2, artifacts)
    bob_failed = upload(client, accounts["bob"], 3, artifacts)
    fail(db, bob_failed, "CUDA error: out of memory", "Traceback (most recent call last):\n  boom")
    log_in(client, db, settings, accounts["ta"])

    page = client.get("/ta")
    assert page.status_code == 200
    body = text(page)
    assert "No worker is alive" in body
    for submission_id in (alice_scored, bob_queued, bob_failed):
        assert f"/ta/submissions/{submission_id}" in body
    assert "3 submissions, newest first" in body

    with db() as session:
        session.add(WorkerHeartbeat(hostname="celery@gpu-box", queues="gpu", pid=7))
        session.commit()
    body = text(client.get("/ta"))
    assert "No worker is alive" not in body and "celery@gpu-box" in body
    assert "No live worker takes this queue" in body  # the cpu queue has one waiting, no worker

    only_alice = text(client.get("/ta", params={"student": "alice"}))
    assert f"/ta/submissions/{alice_scored}" in only_alice
    assert bob_queued not in only_alice and bob_failed not in only_alice

    failures = text(client.get("/ta", params={"status": "failed"}))
    assert f"/ta/submissions/{bob_failed}#log" in failures
    assert "<strong>The grader crashed</strong>: CUDA error: out of memory" in failures
    assert alice_scored not in failures and bob_queued not in failures

    both = text(client.get("/ta", params={"phase": f"{SLUG}/{PHASE}", "student": "bob"}))
    assert bob_queued in both and bob_failed in both and alice_scored not in both
    assert "2 submissions, newest first" in both

    wrong = text(client.get("/ta", params={"status": "stuck", "student": "mallory"}))
    assert "There is no status 'stuck'" in wrong and "There is no user 'mallory'" in wrong
    assert "No submission matches these filters" in wrong
    assert "There is no phase 'nope/x'" in text(client.get("/ta", params={"phase": "nope/x"}))

    detail = client.get(f"/ta/submissions/{bob_failed}")
    assert detail.status_code == 200
    assert '<pre class="ta-log"' in detail.text
    assert "Traceback (most recent call last):\n  boom" in text(detail)
    assert "The grader crashed" in text(detail) and "bob" in text(detail)


def test_dashboard_pages_through_the_table_and_keeps_the_filters(
    client: TestClient,
    accounts: dict[str, Account],
    artifacts: Artifacts,
    settings,
    db,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(staff_pages, "PAGE_SIZE", 2)
    oldest, middle, newest = (upload(client, accounts["alice"], s, artifacts) for s in (1, 2, 3))
    other = upload(client, accounts["bob"], 4, artifacts)
    log_in(client, db, settings, accounts["ta"])

    first = client.get("/ta", params={"student": "alice"}).text
    assert newest in first and middle in first and oldest not in first and other not in first
    assert "Page 1 of 2" in first and 'href="/ta?student=alice&amp;page=2"' in first
    second = client.get("/ta", params={"student": "alice", "page": 2}).text
    assert oldest in second and newest not in second and "Page 2 of 2" in second
    beyond = text(client.get("/ta", params={"student": "alice", "page": 9}))
    assert "No submission matches" not in beyond and "There is no page 9" in beyond


def test_regrade_form_queues_it_again_and_records_who_and_why(
    client: TestClient, accounts: dict[str, Account], artifacts: Artifacts, settings, db
) -> None:
    submission_id = scored(client, accounts["alice"], 1, artifacts, settings, db)
    csrf = log_in(client, db, settings, accounts["ta"])

    response = client.post(
        f"/ta/submissions/{submission_id}/regrade",
        data={CSRF_FIELD: csrf, "reason": "hidden model re-exported"},
        follow_redirects=False,
    )
    assert response.status_code == 303
    assert response.headers["location"] == f"/ta/submissions/{submission_id}"
    page = client.get(response.headers["location"])
    assert f"Submission {submission_id[:8]} is queued again" in text(page)
    assert status_of(db, submission_id) is SubmissionStatus.QUEUED
    assert audit_events(db) == [("regrade", "ta", "hidden model re-exported")]
    assert "Regraded</strong> by ta, was scored with" in page.text

    again = client.post(
        f"/ta/submissions/{submission_id}/regrade", data={CSRF_FIELD: csrf, "reason": "twice"}
    )
    assert "Nothing was changed" in text(again) and "already waiting" in text(again)
    assert len(audit_events(db)) == 1


def test_override_with_a_reason_shows_on_the_page_and_the_leaderboard_and_can_be_cleared(
    client: TestClient, accounts: dict[str, Account], artifacts: Artifacts, settings, db
) -> None:
    alice = accounts["alice"]
    submission_id = scored(client, alice, 1, artifacts, settings, db)
    with db() as session:
        grader_score = session.get(Submission, submission_id).score
    csrf = log_in(client, db, settings, accounts["ta"])
    url = f"/ta/submissions/{submission_id}/override"
    board_url = f"/api/v1/assignments/{SLUG}/phases/{PHASE}/leaderboard"

    not_a_number = text(client.post(url, data={CSRF_FIELD: csrf, "score": "abc", "reason": "r"}))
    assert "'abc' is not a score" in not_a_number
    nothing_to_clear = text(client.post(url, data={CSRF_FIELD: csrf, "score": "", "reason": "r"}))
    assert "this submission has none" in nothing_to_clear
    too_big = text(client.post(url, data={CSRF_FIELD: csrf, "score": "1.5", "reason": "r"}))
    assert "between 0 and 1" in too_big
    assert audit_events(db) == []

    page = text(client.post(url, data={CSRF_FIELD: csrf, "score": "0.123", "reason": "appeal 7"}))
    assert "is now 12.30 %" in page
    assert "set by ta" in page and "appeal 7" in page
    (entry,) = client.get(board_url, headers=alice.headers).json()["entries"]
    assert entry["score"] == pytest.approx(0.123)

    cleared = text(client.post(url, data={CSRF_FIELD: csrf, "score": "", "reason": "reversed"}))
    assert "The override is cleared" in cleared
    (entry,) = client.get(board_url, headers=alice.headers).json()["entries"]
    assert entry["score"] == pytest.approx(grader_score)
    assert [(a, r) for a, _, r in audit_events(db)] == [
        ("override", "appeal 7"),
        ("override", "reversed"),
    ]


def test_a_missing_reason_is_explained_and_changes_nothing(
    client: TestClient, accounts: dict[str, Account], artifacts: Artifacts, settings, db
) -> None:
    done = scored(client, accounts["alice"], 1, artifacts, settings, db)
    waiting = upload(client, accounts["bob"], 2, artifacts)
    csrf = log_in(client, db, settings, accounts["ta"])

    regrade = client.post(f"/ta/submissions/{done}/regrade", data={CSRF_FIELD: csrf, "reason": " "})
    assert regrade.status_code == 200
    assert "Nothing was changed. Give a reason" in text(regrade)
    assert 'class="flash flash-error"' in regrade.text
    cancel = client.post(f"/ta/submissions/{waiting}/cancel", data={CSRF_FIELD: csrf})
    assert "Give a reason" in text(cancel)
    override = client.post(
        f"/ta/submissions/{done}/override", data={CSRF_FIELD: csrf, "score": "0"}
    )
    assert "Give a reason" in text(override)
    assert status_of(db, done) is SubmissionStatus.SCORED
    assert status_of(db, waiting) is SubmissionStatus.QUEUED
    with db() as session:
        assert session.get(Submission, done).score_override is None
    assert audit_events(db) == []


def test_a_form_without_the_sessions_csrf_token_is_refused(
    client: TestClient, accounts: dict[str, Account], artifacts: Artifacts, settings, db
) -> None:
    done = scored(client, accounts["alice"], 1, artifacts, settings, db)
    log_in(client, db, settings, accounts["ta"])
    for data in ({"reason": "forged"}, {"reason": "forged", CSRF_FIELD: "not-the-token"}):
        forged = client.post(f"/ta/submissions/{done}/regrade", data=data)
        assert forged.status_code == 403
        assert "not sent from a page of this site" in text(forged)
    assert status_of(db, done) is SubmissionStatus.SCORED
    assert audit_events(db) == []


def test_cancel_stops_a_running_submission_once(
    client: TestClient, accounts: dict[str, Account], artifacts: Artifacts, settings, db
) -> None:
    running = upload(client, accounts["alice"], 1, artifacts)
    with db() as session:
        row = session.get(Submission, running)
        row.status, row.worker, row.started_at = SubmissionStatus.RUNNING, "host/1", utcnow()
        session.commit()
    csrf = log_in(client, db, settings, accounts["ta"])
    assert "Cancel submission" in client.get(f"/ta/submissions/{running}").text

    done = text(
        client.post(f"/ta/submissions/{running}/cancel", data={CSRF_FIELD: csrf, "reason": "hung"})
    )
    assert "is cancelled. The student sees: “Cancelled by a TA: hung”" in done
    assert status_of(db, running) is SubmissionStatus.CANCELLED
    twice = text(
        client.post(f"/ta/submissions/{running}/cancel", data={CSRF_FIELD: csrf, "reason": "x"})
    )
    assert "Nothing was changed" in twice
    assert "only queued or running submissions can be cancelled. The page now shows" in twice
    assert audit_events(db) == [("cancel", "ta", "hung")]


def test_phase_regrade_needs_a_confirmation_and_can_take_only_the_failed_ones(
    client: TestClient, accounts: dict[str, Account], artifacts: Artifacts, settings, db
) -> None:
    ok = scored(client, accounts["alice"], 1, artifacts, settings, db)
    broken = upload(client, accounts["bob"], 2, artifacts)
    fail(db, broken, "hidden file missing", "log")
    csrf = log_in(client, db, settings, accounts["ta"])
    page = text(client.get(PHASE_PAGE))
    assert "Failed only (1)" in page and "All finished: scored, failed and cancelled (2)" in page
    assert f"/api/v1/assignments/{SLUG}/phases/{PHASE}/scores.csv" in page

    form = {CSRF_FIELD: csrf, "which": "failed", "reason": "data dir fixed"}
    unconfirmed = text(client.post(f"{PHASE_PAGE}/regrade", data=form))
    assert "tick the box that confirms the regrade" in unconfirmed
    assert status_of(db, broken) is SubmissionStatus.FAILED

    done = text(client.post(f"{PHASE_PAGE}/regrade", data={**form, "confirm": "yes"}))
    assert "1 submission of Attack is queued again" in done
    assert status_of(db, broken) is SubmissionStatus.QUEUED
    assert status_of(db, ok) is SubmissionStatus.SCORED
    assert audit_events(db) == [("regrade", "ta", "data dir fixed")]

    export = client.get(f"/api/v1/assignments/{SLUG}/phases/{PHASE}/scores.csv")
    assert export.status_code == 200 and ok in export.text  # the page's link works by cookie


def test_extensions_are_granted_in_course_time_listed_and_revoked(
    client: TestClient, accounts: dict[str, Account], artifacts: Artifacts, settings, db
) -> None:
    csrf = log_in(client, db, settings, accounts["ta"])
    catalog = client.app.state.catalog
    phase = catalog.assignments[SLUG].phase(PHASE)
    wall_clock = (phase.due_at + timedelta(days=2)).astimezone(ZONE).strftime("%Y-%m-%dT%H:%M")
    expected = datetime.fromisoformat(wall_clock).replace(tzinfo=ZONE).astimezone(UTC)
    grant = f"{PHASE_PAGE}/extensions"

    assert "in America/New_York time" in text(client.get(PHASE_PAGE))
    bad_date = text(
        client.post(
            grant,
            data={CSRF_FIELD: csrf, "username": "alice", "due_at": "next friday", "reason": "ill"},
        )
    )
    assert "'next friday' is not a date and time" in bad_date
    early = (phase.due_at - timedelta(hours=3)).astimezone(ZONE).strftime("%Y-%m-%dT%H:%M")
    too_early = text(
        client.post(
            grant, data={CSRF_FIELD: csrf, "username": "alice", "due_at": early, "reason": "ill"}
        )
    )
    assert "must end after the phase's deadline" in too_early
    nobody = text(
        client.post(
            grant,
            data={CSRF_FIELD: csrf, "username": "mallory", "due_at": wall_clock, "reason": "ill"},
        )
    )
    assert "No user 'mallory'" in nobody
    assert audit_events(db) == []

    granted = text(
        client.post(
            grant,
            data={
                CSRF_FIELD: csrf,
                "username": "alice",
                "due_at": wall_clock,
                "reason": "medical note",
            },
        )
    )
    assert "alice's deadline for Attack is now" in granted
    with db() as session:
        (extension,) = session.scalars(select(Extension)).all()
        assert extension.due_at == expected and extension.reason == "medical note"
    assert "medical note" in granted and "by ta" in granted

    revoke = f"{PHASE_PAGE}/extensions/alice/revoke"
    no_reason = text(client.post(revoke, data={CSRF_FIELD: csrf, "reason": ""}))
    assert "Give a reason" in no_reason
    revoked = text(client.post(revoke, data={CSRF_FIELD: csrf, "reason": "granted in error"}))
    assert "alice's extension is revoked" in revoked
    assert "No student has an extension for this phase" in revoked
    with db() as session:
        assert session.scalars(select(Extension)).all() == []
    assert [a for a, _, _ in audit_events(db)] == ["extension_granted", "extension_revoked"]


def test_audit_page_lists_each_action_with_who_when_and_why(
    client: TestClient, accounts: dict[str, Account], artifacts: Artifacts, settings, db
) -> None:
    done = scored(client, accounts["alice"], 1, artifacts, settings, db)
    csrf = log_in(client, db, settings, accounts["ta"])
    assert "Nothing has been recorded yet" in text(client.get("/ta/audit"))
    client.post(
        f"/ta/submissions/{done}/override",
        data={CSRF_FIELD: csrf, "score": "0.5", "reason": "appeal 12 upheld"},
    )
    client.post(f"/ta/submissions/{done}/regrade", data={CSRF_FIELD: csrf, "reason": "new eval"})

    page = client.get("/ta/audit")
    assert page.status_code == 200
    body = text(page)
    assert body.index("new eval") < body.index("appeal 12 upheld")  # newest first
    assert "Score override" in body and "set to 50.00 % (the grader's score:" in body
    assert "Regraded" in body and "was scored with" in body
    assert f'href="/ta/submissions/{done}"' in page.text and 'href="/ta?student=alice"' in page.text
    with db() as session:
        first = session.scalars(select(AuditEvent).order_by(AuditEvent.id)).first()
        local = first.created_at.astimezone(ZONE)
    assert f"{local:%H:%M %Z}" in body  # the course's time, not UTC


def test_a_deadline_typed_in_course_time_is_read_in_that_zone() -> None:
    summer = parse_local_deadline("2026-07-01T23:59", ZONE)
    assert summer == datetime(2026, 7, 2, 3, 59, tzinfo=UTC)  # EDT is UTC-4
    winter = parse_local_deadline("2026-12-01T23:59", ZONE)
    assert winter == datetime(2026, 12, 2, 4, 59, tzinfo=UTC)  # EST is UTC-5
    assert parse_local_deadline("2026-12-01T23:59+01:00", ZONE) == datetime(
        2026, 12, 1, 22, 59, tzinfo=UTC
    )
    with pytest.raises(DeadlineInvalid, match="does not exist in America/New_York"):
        parse_local_deadline("2026-03-08T02:30", ZONE)  # the clocks jump from 2:00 to 3:00
    with pytest.raises(DeadlineInvalid, match="Give the new deadline"):
        parse_local_deadline("  ", ZONE)


def test_ta_pages_link_their_stylesheet_in_the_head_and_name_each_action_form(
    client: TestClient, accounts: dict[str, Account], artifacts: Artifacts, settings, db
) -> None:
    done = scored(client, accounts["alice"], 1, artifacts, settings, db)
    log_in(client, db, settings, accounts["ta"])
    for page, forms in (
        (f"/ta/submissions/{done}", {"regrade": "Regrade", "override": "Override the score"}),
        (
            PHASE_PAGE,
            {
                "regrade": "Regrade the phase",
                "reveal": "Reveal private board",
                "raise-quota": "Raise quota",
                "grant": "Grant an extension",
            },
        ),
        ("/ta", {"roster-import": "Import a roster"}),
    ):
        body = client.get(page).text
        head, rest = body.split("</head>", 1)
        assert '<link rel="stylesheet" href="/static/ta.css">' in head, page
        assert "/static/ta.css" not in rest, page
        for key, heading in forms.items():
            assert f'aria-labelledby="{key}-heading"' in rest, (page, key)
            assert re.search(rf'<h[23] id="{key}-heading">{heading}</h[23]>', rest), (page, key)


def test_reveal_form_opens_the_private_board_once_and_the_grades_link_works(
    client: TestClient, accounts: dict[str, Account], artifacts: Artifacts, settings, db
) -> None:
    scored(client, accounts["alice"], 1, artifacts, settings, db)
    board_url = f"/api/v1/assignments/{SLUG}/phases/{PHASE}/leaderboard"
    csrf = log_in(client, db, settings, accounts["ta"])
    page = client.get(PHASE_PAGE).text
    grades = re.search(r'href="(/api/v1/[^"]+/grades\.csv)"', page)
    assert grades and grades.group(1) == f"/api/v1/assignments/{SLUG}/phases/{PHASE}/grades.csv"
    export = client.get(grades.group(1))
    assert export.status_code == 200 and export.text.startswith("student_id,name,email,")
    assert "Not open to students yet." in text(client.get(PHASE_PAGE))

    no_reason = text(client.post(f"{PHASE_PAGE}/reveal", data={CSRF_FIELD: csrf, "reason": ""}))
    assert "Nothing was changed. Give a reason" in no_reason
    assert client.get(board_url, headers=accounts["alice"].headers).json()["revealed"] is False

    done = text(
        client.post(f"{PHASE_PAGE}/reveal", data={CSRF_FIELD: csrf, "reason": "grades published"})
    )
    assert "The private board of Attack is open" in done
    assert "The private board is open to students." in done and "Reveal the private" not in done
    assert client.get(board_url, headers=accounts["alice"].headers).json()["revealed"] is True
    twice = text(client.post(f"{PHASE_PAGE}/reveal", data={CSRF_FIELD: csrf, "reason": "again"}))
    assert "Nothing was changed" in twice and "already open" in twice
    assert audit_events(db) == [("reveal", "ta", "grades published")]
    audit = text(client.get("/ta/audit"))
    assert "Private board revealed" in audit and "the private board opened to students" in audit


def test_raise_quota_form_gives_one_student_more_submissions(
    client: TestClient, accounts: dict[str, Account], settings, db
) -> None:
    csrf = log_in(client, db, settings, accounts["ta"])
    url = f"{PHASE_PAGE}/quota"
    form = {CSRF_FIELD: csrf, "username": "alice", "extra_per_day": "2", "extra_total": "3"}
    refusals = {
        "give the username": {"username": ""},
        "extra per day must be a whole number of submissions, not 'lots'": {
            "extra_per_day": "lots"
        },
        "extra_total must be between 0 and 1000, got 5000": {"extra_total": "5000"},
        "No user 'mallory'": {"username": "mallory"},
        "Give a reason": {"reason": " "},
    }
    for message, change in refusals.items():
        body = text(client.post(url, data={**form, "reason": "ill", **change}))
        assert message in body, message
    assert audit_events(db) == []

    granted = text(client.post(url, data={**form, "reason": "lost a day to illness"}))
    assert (
        "alice may now submit 7 per day and 23 in total to Attack (+2 per day, +3 in total)."
        in (granted)
    )
    grants = granted.split('class="ta-quota-grants"')[1].split("</table>")[0]
    row_text = " ".join(re.sub(r"<[^>]+>", " ", grants).split())
    assert "alice 2 3 lost a day to illness" in row_text
    quota = client.get(
        f"/api/v1/assignments/{SLUG}/phases/{PHASE}/quota", headers=accounts["alice"].headers
    ).json()
    assert (quota["max_per_day"], quota["max_total"]) == (7, 23)
    assert audit_events(db) == [("quota_raised", "ta", "lost a day to illness")]
    assert "Quota raised" in text(client.get("/ta/audit")) and "+2 per day, +3 in total" in text(
        client.get("/ta/audit")
    )


def test_roster_import_shows_each_invitation_code_once_and_a_bad_roster_imports_nobody(
    client: TestClient, accounts: dict[str, Account], settings, db
) -> None:
    roster = (
        b"student_id,name,email\ndave,Dave Diaz,dave@example.org\nerin,Erin Eze,erin@example.org\n"
    )

    def post(content: bytes | None, csrf: str):
        files = {"file": ("students.csv", content, "text/csv")} if content is not None else None
        return client.post("/ta/roster", data={CSRF_FIELD: csrf}, files=files)

    student = log_in(client, db, settings, accounts["alice"])
    assert post(roster, student).status_code == 403
    csrf = log_in(client, db, settings, accounts["ta"])
    dashboard = client.get("/ta").text
    assert re.search(
        r'<form method="post" action="/ta/roster" enctype="multipart/form-data"', dashboard
    )

    assert "choose the roster's CSV file" in text(post(None, csrf))
    missing = text(post(b"student_id,name\ndave,Dave\n", csrf))
    assert "Nothing was changed: The roster's first line must name the columns" in missing
    bad_line = text(post(roster + b"frank,Frank,not-an-address\n", csrf))
    assert "line 4: email 'not-an-address' is not an address" in bad_line
    with db() as session:
        assert session.scalar(select(User).where(User.username == "dave")) is None

    done = post(roster, csrf)
    assert done.status_code == 200
    body = text(done)
    assert "students.csv: 2 students, 2 new; 2 invitation codes issued." in body
    assert "Copy the codes now: they are shown only on this page." in body
    codes = re.findall(r"<code>(inv_[\w-]+)</code>", done.text)
    assert len(codes) == 2
    for code in codes:
        assert f"<code>{settings.public_url}/invite?code={code}</code>" in done.text
    accepted = client.post(
        "/api/v1/invitations/accept", json={"code": codes[0], "password": "dave's passphrase"}
    )
    assert accepted.status_code == 200 and accepted.json()["username"] == "dave"
    assert codes[1] not in client.get("/ta").text
    assert [a for a, _, _ in audit_events(db)] == ["roster_imported"]
    audit = text(client.get("/ta/audit"))
    assert "Roster imported" in audit and "2 students (2 new), 2 invitation codes issued" in audit

    again = text(post(roster, csrf))
    assert "2 students, 0 new; 1 invitation code issued." in again
    assert "none: the student has set a password" in again  # dave, who accepted
