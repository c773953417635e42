"""The student pages (server-rendered HTML) through TestClient: login and logout, invitations,
the account page (pseudonym, API tokens), CSRF, who may see what, times in the course timezone,
the attack and defense detail pages under each feedback rule, marks for the final selection,
public and private leaderboards and the error pages."""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from html import unescape
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from graders.architectures import Architecture, build_model
from graders.checkpoints import write_safetensors
from graders.threat_model import Norm, distances
from server.assignments import Selection
from server.config import Settings
from server.db import utcnow
from server.deps import SESSION_COOKIE
from server.main import create_app
from server.models import Invitation, Submission, SubmissionStatus, User
from server.security import set_password, verify_password
from server.services import accounts, boards, staff
from tests.conftest import (
    DEFENSE_PHASE,
    PHASE,
    SLUG,
    Account,
    Artifacts,
    perturbed,
    spec_toml,
    write_spec,
)
from tests.server.test_api import npy_bytes
from tests.server.test_boards import spec as board_spec
from worker.scoring import Outcome, run_scoring

PASSWORD = "correct horse battery"
PHASE_PAGE = f"/assignments/{SLUG}/phases/{PHASE}"
API_PHASE = f"/api/v1/assignments/{SLUG}/phases/{PHASE}"
DUE = datetime(2030, 1, 15, 4, 59, tzinfo=UTC)
"""A deadline that is 23:59 on Monday 14 January 2030 in the course's New York time."""
COURSE_ZONE = ZoneInfo("America/New_York")
"""The timezone of the spec that ``spec_toml`` writes."""


@pytest.fixture
def passwords(db: sessionmaker[Session], accounts: dict[str, Account]) -> dict[str, Account]:
    """The three accounts, each with ``PASSWORD`` set."""
    with db() as session:
        for account in accounts.values():
            user = session.get(User, account.user_id)
            assert user is not None
            set_password(user, PASSWORD)
        session.commit()
    return accounts


def app_client(settings: Settings) -> TestClient:
    return TestClient(create_app(settings), follow_redirects=False)


@pytest.fixture
def web(settings: Settings, passwords: dict[str, Account]) -> Iterator[TestClient]:
    """A browser without a login (cookies kept between requests, redirects not followed)."""
    with app_client(settings) as client:
        yield client


def login_form_token(client: TestClient, url: str = "/login") -> str:
    page = client.get(url)
    assert page.status_code == 200, page.text
    match = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert match, "the login form has no CSRF field"
    return match.group(1)


def log_in(client: TestClient, username: str, password: str = PASSWORD, next_url: str = "/"):
    token = login_form_token(client)
    return client.post(
        "/login",
        data={"username": username, "password": password, "csrf_token": token, "next": next_url},
    )


def logged_in(settings: Settings, username: str) -> TestClient:
    client = app_client(settings)
    response = log_in(client, username)
    assert response.status_code == 303, response.text
    return client


def page_csrf(client: TestClient, url: str = "/") -> str:
    match = re.search(r'<meta name="csrf-token" content="([^"]+)">', client.get(url).text)
    assert match, "a logged-in page carries the session's CSRF token"
    return match.group(1)


INLINE_TAGS = re.compile(r"</?(?:a|strong|em|span|code|time|abbr)\b[^>]*>")


def text_of(html: str) -> str:
    """The page's text as a reader sees it: inline tags dropped, block tags turned into spaces,
    whitespace collapsed."""
    return " ".join(unescape(re.sub(r"<[^>]+>", " ", INLINE_TAGS.sub("", html))).split())


def add_scored(
    factory: sessionmaker[Session], account: Account, score: float, minutes_ago: int
) -> str:
    """A scored attack submission as the worker leaves it (for ranking tests)."""
    with factory() as session:
        row = Submission(
            user_id=account.user_id,
            assignment_slug=SLUG,
            phase_id=PHASE,
            status=SubmissionStatus.SCORED,
            file_name="adv.npy",
            file_sha256="0" * 64,
            file_size=1,
            batch_path="/nonexistent",
            score=score,
            created_at=utcnow() - timedelta(minutes=minutes_ago),
        )
        session.add(row)
        session.commit()
        return row.id


# --- Login and logout -------------------------------------------------------------------------


def test_login_starts_a_session_and_shows_the_home_page(web: TestClient) -> None:
    response = log_in(web, "alice")
    assert response.status_code == 303
    assert response.headers["location"] == "/"
    assert SESSION_COOKIE in response.cookies
    home = web.get("/")
    assert home.status_code == 200
    text = text_of(home.text)
    assert "Your assignments" in text and "Logged in as alice" in text
    assert 'href="/assignments/course/phases/attack"' in home.text
    assert home.headers["cache-control"] == "no-store"
    assert "script-src 'self'" in home.headers["content-security-policy"]


def test_wrong_password_and_unknown_user_get_the_same_401_page(web: TestClient) -> None:
    wrong = log_in(web, "alice", "not the password")
    unknown = log_in(web, "mallory", "not the password")
    for response in (wrong, unknown):
        assert response.status_code == 401
        assert SESSION_COOKIE not in response.cookies
        assert "The username or password is wrong." in text_of(response.text)

    def error_box(html: str) -> str:
        found = re.search(r'<div class="flash flash-error" role="alert"[^>]*>(.*?)</div>', html)
        assert found
        return found.group(1)

    assert error_box(wrong.text) == error_box(unknown.text)
    assert web.get("/").status_code == 303  # still not logged in


def test_pages_need_a_login_and_come_back_to_the_page_after_it(web: TestClient) -> None:
    for path in ("/", "/submissions", PHASE_PAGE, "/leaderboards", "/submissions/abc"):
        response = web.get(path)
        assert response.status_code == 303, path
        assert response.headers["location"].startswith("/login?next=")
    back = web.get("/submissions?phase=attack").headers["location"]
    assert back == "/login?next=%2Fsubmissions%3Fphase%3Dattack"
    after = log_in(web, "alice", next_url="/submissions?phase=attack")
    assert after.headers["location"] == "/submissions?phase=attack"


def test_login_never_redirects_to_another_site(web: TestClient) -> None:
    for target in ("//evil.example/x", "https://evil.example/", "/\\evil.example"):
        web.cookies.clear()
        assert log_in(web, "alice", next_url=target).headers["location"] == "/"


def test_forged_login_form_without_the_cookie_token_is_refused(
    settings: Settings, passwords: dict[str, Account]
) -> None:
    with app_client(settings) as attacker:
        stolen = login_form_token(attacker)  # a valid field, but for the attacker's cookie
    with app_client(settings) as victim:
        forged = victim.post(
            "/login",
            data={"username": "alice", "password": PASSWORD, "csrf_token": stolen, "next": "/"},
        )
        assert forged.status_code == 403
        assert SESSION_COOKIE not in forged.cookies
        assert "cookies are allowed" in text_of(forged.text)


def test_logout_needs_the_form_token_and_then_ends_the_session(
    settings: Settings, passwords: dict[str, Account]
) -> None:
    with logged_in(settings, "alice") as client:
        forged = client.post("/logout", data={"csrf_token": "guessed"})
        assert forged.status_code == 403
        assert "reload the page" in text_of(forged.text)
        assert client.get("/").status_code == 200  # the session survived the forged post

        cookie = client.cookies.get(SESSION_COOKIE)
        confirm = client.get("/logout")  # typing the address asks first: a link cannot log out
        assert confirm.status_code == 200 and client.get("/").status_code == 200
        token = re.search(r'name="csrf_token" value="([^"]+)"', confirm.text)
        assert token and token.group(1) == page_csrf(client)
        done = client.post("/logout", data={"csrf_token": token.group(1)})
        assert done.status_code == 303 and done.headers["location"] == "/login"
        assert "You are logged out." in text_of(client.get("/login").text)
        assert client.get("/logout").headers["location"] == "/login"
    with app_client(settings) as replay:  # the old cookie no longer works anywhere
        replay.cookies.set(SESSION_COOKIE, cookie or "")
        assert replay.get("/").status_code == 303


def test_api_calls_from_the_pages_need_the_csrf_header(
    settings: Settings, passwords: dict[str, Account], artifacts: Artifacts
) -> None:
    batch = npy_bytes(perturbed(artifacts.eval_set.images))
    with logged_in(settings, "alice") as client:
        dataset = client.get(f"{API_PHASE}/dataset?format=npz")
        assert dataset.status_code == 200  # the download link works with the cookie
        refused = client.post(f"{API_PHASE}/submissions", files={"file": ("a.npy", batch)})
        assert refused.status_code == 403
        assert refused.json()["error"]["code"] == "csrf_failed"
        accepted = client.post(
            f"{API_PHASE}/submissions",
            files={"file": ("a.npy", batch)},
            headers={"X-CSRF-Token": page_csrf(client)},
        )
        assert accepted.status_code == 202, accepted.text


# --- Home and phase pages ---------------------------------------------------------------------


def test_deadline_countdown_and_quota_are_in_course_time(
    settings: Settings,
    passwords: dict[str, Account],
    artifacts: Artifacts,
    db: sessionmaker[Session],
) -> None:
    write_spec(settings.assignments_dir, spec_toml(artifacts, due_at=DUE, max_per_day=5))
    add_scored(db, passwords["alice"], 0.5, minutes_ago=1)
    with logged_in(settings, "alice") as client:
        html = client.get("/").text
    text = text_of(html)
    assert "Deadline Mon 14 Jan 2030, 23:59 EST" in text
    assert '<time datetime="2030-01-15T04:59:00+00:00" data-countdown' in html
    countdown = re.search(
        r'<time datetime="2030-01-15T04:59:00\+00:00" data-countdown[^>]*>([^<]+)<', html
    )
    # The two largest non-zero units: "in 1150 days 3 hours", or "... 18 minutes" on the hour.
    assert countdown and re.fullmatch(
        r"in \d+ days( \d+ (hours?|minutes?))?", countdown.group(1)
    ), countdown.group(1)
    assert "4 of 5 today" in text and "19 of 20 in total" in text
    now_new_york = datetime.now(UTC).astimezone(COURSE_ZONE)
    midnight = (now_new_york + timedelta(days=1)).replace(hour=0, minute=0)
    assert f"the day resets {midnight:%a} {midnight.day} {midnight:%b %Y}, 00:00" in text


def test_an_extension_shows_as_the_students_own_deadline(
    settings: Settings,
    passwords: dict[str, Account],
    artifacts: Artifacts,
    db: sessionmaker[Session],
) -> None:
    write_spec(settings.assignments_dir, spec_toml(artifacts, due_at=DUE))
    app = create_app(settings)
    assignment = app.state.catalog.assignments[SLUG]
    with db() as session:
        ta = session.get(User, passwords["ta"].user_id)
        staff.grant_extension(
            session,
            actor=ta,
            assignment=assignment,
            phase=assignment.phase(PHASE),
            username="alice",
            due_at=DUE + timedelta(days=5),
            reason="illness",
        )
    with logged_in(settings, "alice") as alice, logged_in(settings, "bob") as bob:
        mine, theirs = text_of(alice.get("/").text), text_of(bob.get("/").text)
    assert "Your deadline Sat 19 Jan 2030, 23:59 EST" in mine
    assert "the phase's deadline is Mon 14 Jan 2030, 23:59 EST" in mine
    assert "Deadline Mon 14 Jan 2030, 23:59 EST" in theirs and "Your deadline" not in theirs


def test_phase_page_states_the_rules_and_links_the_clean_images(
    settings: Settings, passwords: dict[str, Account]
) -> None:
    with logged_in(settings, "alice") as client:
        response = client.get(PHASE_PAGE)
        assert response.status_code == 200
        html, text = response.text, text_of(response.text)
        assert "L-inf, eps 8/255" in text
        assert ".zip" in text and ".npy" in text and ".npz" in text
        assert "1.0 MiB per upload" in text
        assert "5 per day, 20 in total" in text
        for link in re.findall(r'href="(/api/v1/[^"]+/dataset\?format=(?:zip|npz))"', html):
            assert client.get(unescape(link)).status_code == 200
        assert 'id="upload-form"' in html and 'data-max-bytes="1048576"' in html
        assert '<label for="upload-file">' in html
        assert "<noscript>" in html and "need JavaScript" in text_of(
            html.split("<noscript>")[1].split("</noscript>")[0]
        )
        assert "You have not submitted to this phase yet." in text


def test_defense_phase_page_offers_the_allowed_architectures(
    settings: Settings, passwords: dict[str, Account], artifacts: Artifacts
) -> None:
    write_spec(settings.assignments_dir, spec_toml(artifacts, defense=""))
    with logged_in(settings, "alice") as client:
        html = client.get(f"/assignments/{SLUG}/phases/{DEFENSE_PHASE}").text
    select = re.search(r'<select id="architecture"[^>]*>(.*?)</select>', html, re.S)
    assert select and re.findall(r'<option value="([^"]+)"', select.group(1)) == ["resnet20"]
    assert '<label for="normalization">' in html and '<label for="manifest">' in html
    assert "Download the clean images" not in html  # defense points stay hidden


def test_unknown_phase_is_a_404_page_that_names_the_phases(
    settings: Settings, passwords: dict[str, Account]
) -> None:
    with logged_in(settings, "alice") as client:
        response = client.get(f"/assignments/{SLUG}/phases/nope")
        missing = client.get("/no/such/page")
        api = client.get("/api/v1/no/such/thing")
    assert response.status_code == 404 and "text/html" in response.headers["content-type"]
    assert "has no phase 'nope' (its phases: Attack)" in text_of(response.text)
    assert missing.status_code == 404 and "Your assignments" in text_of(missing.text)
    assert api.status_code == 404 and api.json()["error"]["code"] == "not_found"


# --- Status, history and details --------------------------------------------------------------


def submit_batch(client: TestClient, account: Account, batch: np.ndarray) -> str:
    response = client.post(
        f"{API_PHASE}/submissions",
        headers=account.headers,
        files={"file": ("adv.npy", npy_bytes(batch))},
    )
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def test_status_goes_from_queue_position_to_the_score_and_history_lists_it(
    settings: Settings,
    passwords: dict[str, Account],
    artifacts: Artifacts,
    db: sessionmaker[Session],
) -> None:
    with logged_in(settings, "alice") as client:
        first = submit_batch(client, passwords["alice"], perturbed(artifacts.eval_set.images))
        second = submit_batch(client, passwords["alice"], perturbed(artifacts.eval_set.images, 4))
        queued = client.get(f"/submissions/{second}/status")
        assert queued.status_code == 200
        assert 'data-final="false"' in queued.text
        assert "Queued Position 2 in the queue." in text_of(queued.text)

        assert run_scoring(first, settings=settings, session_factory=db) is Outcome.SCORED
        scored = text_of(client.get(f"/submissions/{first}/status").text)
        with db() as session:
            score = session.get(Submission, first).score
        assert f"Scored: {score * 100:.2f} % (mean accuracy" in scored

        history = client.get("/submissions").text
        assert history.index(second[:8]) < history.index(first[:8])  # newest first
        assert f"{score * 100:.2f} %" in text_of(history)


def test_running_defense_reports_its_attack_and_progress(
    settings: Settings, passwords: dict[str, Account], db: sessionmaker[Session]
) -> None:
    submission_id = add_scored(db, passwords["alice"], 0.1, minutes_ago=2)
    with db() as session:  # as the worker reports it from inside the full suite
        row = session.get(Submission, submission_id)
        row.status, row.score = SubmissionStatus.RUNNING, None
        row.progress = {
            "stage": "attack",
            "suite": "full",
            "attack": "apgd-t",
            "attack_index": 2,
            "attacks": 4,
            "robust_points_left": 40,
            "points_attacked": 50,
            "points_to_attack": 100,
        }
        session.commit()
    with logged_in(settings, "alice") as client:
        html = client.get(f"/submissions/{submission_id}/status").text
    assert 'data-final="false"' in html
    assert (
        "Running Attack 2 of 4 (apgd-t, full suite): 50 of 100 points attacked so far, "
        "40 still robust." in text_of(html)
    )
    assert '<progress max="100.0" value="37.5"' in html  # 1.5 of 4 attacks done


def test_failed_submission_says_why_and_that_it_is_not_counted(
    settings: Settings, passwords: dict[str, Account], db: sessionmaker[Session]
) -> None:
    submission_id = add_scored(db, passwords["alice"], 0.1, minutes_ago=2)
    with db() as session:
        row = session.get(Submission, submission_id)
        row.status, row.score = SubmissionStatus.FAILED, None
        row.error_message = "Scoring stopped at the phase's time limit of 300 s."
        session.commit()
    with logged_in(settings, "alice") as client:
        text = text_of(client.get(f"/submissions/{submission_id}/status").text)
    assert "Failed Scoring stopped at the phase's time limit of 300 s." in text
    assert "does not count against your quota" in text


def test_a_student_cancels_a_queued_submission_from_its_page(
    settings: Settings, passwords: dict[str, Account], artifacts: Artifacts
) -> None:
    with logged_in(settings, "alice") as alice:
        mine = submit_batch(alice, passwords["alice"], perturbed(artifacts.eval_set.images))
        assert "4 of 5 today" in text_of(alice.get("/").text)
    with logged_in(settings, "bob") as bob:
        other = bob.post(f"/submissions/{mine}/cancel", data={"csrf_token": page_csrf(bob)})
        assert other.status_code == 404
    with logged_in(settings, "alice") as alice:
        page = alice.get(f"/submissions/{mine}").text
        assert "Cancel this submission" in page
        forged = alice.post(f"/submissions/{mine}/cancel", data={"csrf_token": "x"})
        assert forged.status_code == 403
        done = alice.post(f"/submissions/{mine}/cancel", data={"csrf_token": page_csrf(alice)})
        assert done.status_code == 303 and done.headers["location"] == f"/submissions/{mine}"
        after = text_of(alice.get(f"/submissions/{mine}").text)
        assert "Cancelled; it does not count against your quota." in after
        assert "Cancelled Cancelled by you" in after and "Cancel this submission" not in after
        assert "5 of 5 today" in text_of(alice.get("/").text)
        again = alice.post(f"/submissions/{mine}/cancel", data={"csrf_token": page_csrf(alice)})
        assert "only queued submissions can be cancelled" in text_of(
            alice.get(again.headers["location"]).text
        )


def test_students_cannot_open_another_students_submission_or_its_images(
    settings: Settings,
    passwords: dict[str, Account],
    artifacts: Artifacts,
) -> None:
    with logged_in(settings, "bob") as bob:
        theirs = submit_batch(bob, passwords["bob"], perturbed(artifacts.eval_set.images))
        assert bob.get(f"/submissions/{theirs}").status_code == 200
    with logged_in(settings, "alice") as alice:
        for path in (
            f"/submissions/{theirs}",
            f"/submissions/{theirs}/status",
            f"/submissions/{theirs}/samples/0/adversarial.png",
            f"/submissions/{theirs}/samples/0/clean.png",
        ):
            response = alice.get(path)
            assert response.status_code == 404, path
            assert b"\x89PNG" not in response.content
        assert theirs[:8] not in alice.get("/submissions").text
    with logged_in(settings, "ta") as ta:
        assert ta.get(f"/submissions/{theirs}").status_code == 200
        assert ta.get(f"/submissions/{theirs}/samples/0/clean.png").status_code == 200


def test_attack_detail_shows_distance_histograms_and_real_sample_pngs(
    settings: Settings,
    passwords: dict[str, Account],
    artifacts: Artifacts,
    db: sessionmaker[Session],
) -> None:
    clean = artifacts.eval_set.images
    batch = perturbed(clean, delta=6)
    batch[0] = clean[0]  # one image left unchanged
    with logged_in(settings, "alice") as client:
        submission_id = submit_batch(client, passwords["alice"], batch)
        assert run_scoring(submission_id, settings=settings, session_factory=db) is Outcome.SCORED
        page = client.get(f"/submissions/{submission_id}")
        assert page.status_code == 200
        html = page.text

        linf = distances(clean, batch, Norm.LINF).astype(int)
        assert '<svg class="chart-svg histogram" id="linf-histogram"' in html
        assert '<svg class="chart-svg histogram" id="l2-histogram"' in html
        for distance in (0, 6):
            count = int((linf == distance).sum())
            title = f"<title>L-inf distance {distance}: {count} image{'' if count == 1 else 's'}"
            assert title in html
        assert "largest 6; 1 unchanged" in text_of(html)
        assert "net-a" in html and "net-b" in html  # the per-model table

        images = re.findall(rf"/submissions/{submission_id}/samples/(\d+)/(\w+)\.png", html)
        assert {kind for _, kind in images} == {"clean", "adversarial", "perturbation"}
        for index_text in sorted({i for i, _ in images}, key=int):
            index = int(index_text)
            pictures = {}
            for kind in ("clean", "adversarial", "perturbation"):
                response = client.get(f"/submissions/{submission_id}/samples/{index}/{kind}.png")
                assert response.status_code == 200
                assert response.headers["content-type"] == "image/png"
                pictures[kind] = np.asarray(Image.open(io.BytesIO(response.content)))
            np.testing.assert_array_equal(pictures["clean"], clean[index])
            np.testing.assert_array_equal(pictures["adversarial"], batch[index])
            change = batch[index].astype(int) - clean[index].astype(int)
            shown = pictures["perturbation"].astype(int)
            assert (shown[change == 0] == 128).all()
            assert (shown[change > 0] > 128).all() and (shown[change < 0] < 128).all()
        assert client.get(f"/submissions/{submission_id}/samples/999/clean.png").status_code == 404
        bad_kind = client.get(f"/submissions/{submission_id}/samples/0/weights.png")
        assert bad_kind.status_code == 422


def test_defense_detail_shows_accuracies_breakdown_sweep_plot_and_flags(
    settings: Settings,
    passwords: dict[str, Account],
    artifacts: Artifacts,
    db: sessionmaker[Session],
    tmp_path: Path,
) -> None:
    write_spec(settings.assignments_dir, spec_toml(artifacts, defense="eps_sweep = [4, 64]"))
    torch.manual_seed(0)
    checkpoint = tmp_path / "model.safetensors"
    write_safetensors(build_model(Architecture.RESNET20), checkpoint)
    with logged_in(settings, "alice") as client:
        response = client.post(
            f"/api/v1/assignments/{SLUG}/phases/{DEFENSE_PHASE}/submissions",
            headers={"X-CSRF-Token": page_csrf(client)},
            files={"file": (checkpoint.name, checkpoint.read_bytes())},
            data={"architecture": "resnet20", "normalization": "cifar10"},
        )
        assert response.status_code == 202, response.text
        submission_id = response.json()["id"]
        assert run_scoring(submission_id, settings=settings, session_factory=db) is Outcome.SCORED
        html = client.get(f"/submissions/{submission_id}").text
    with db() as session:
        results = session.get(Submission, submission_id).results
    text = text_of(html)
    assert f"Clean accuracy {results['clean_accuracy'] * 100:.1f} %" in text
    assert f"Robust accuracy (leaderboard) {results['robust_accuracy'] * 100:.1f} %" in text
    assert "The quick suite (leaderboard)" in text and "The full suite (final)" in text
    for stats in results["suites"]["full"]["attacks"]:
        assert f"{stats['name']} {stats['points_attacked']} {stats['points_broken']}" in text
    assert '<svg class="chart-svg line-plot" id="eps-sweep"' in html
    sweep_eps = [point["eps"] for point in results["eps_sweep"]]
    assert sweep_eps == [0.0, 4.0, 8.0, 64.0]
    assert html.count('<circle class="point"') == len(sweep_eps)
    for flag in results["flags"]:
        assert unescape(flag["message"]) in unescape(html)
    if not results["flags"]:
        assert "No sign of gradient masking was found." in text


# --- Leaderboards -----------------------------------------------------------------------------


def test_leaderboard_ranks_pseudonyms_and_highlights_the_viewer(
    settings: Settings, passwords: dict[str, Account], db: sessionmaker[Session]
) -> None:
    add_scored(db, passwords["alice"], 0.40, minutes_ago=9)
    add_scored(db, passwords["alice"], 0.30, minutes_ago=8)
    add_scored(db, passwords["bob"], 0.20, minutes_ago=7)
    with db() as session:
        names = {a: session.get(User, passwords[a].user_id).pseudonym for a in ("alice", "bob")}
    with logged_in(settings, "alice") as client:
        html = client.get(f"{PHASE_PAGE}/leaderboard").text
    rows = re.findall(r"<tr(?: class=\"you\"[^>]*)?>(.*?)</tr>", html, re.S)[1:]
    assert [text_of(r).split()[:3] for r in rows] == [
        ["1", names["bob"], "20.00"],
        ["2", names["alice"], "you"],
    ]
    you = re.search(r'<tr class="you"[^>]*>(.*?)</tr>', html, re.S)
    assert you and names["alice"] in you.group(1) and "30.00 %" in you.group(1)
    assert "lower is better" in text_of(html)
    table = text_of(html.split('<table class="leaderboard">')[1].split("</table>")[0])
    assert "alice" not in table and "bob" not in table  # students see pseudonyms only


def test_leaderboard_page_needs_a_login_unless_the_course_makes_it_public(
    settings: Settings,
    passwords: dict[str, Account],
    artifacts: Artifacts,
    db: sessionmaker[Session],
) -> None:
    add_scored(db, passwords["bob"], 0.20, minutes_ago=3)
    with app_client(settings) as anonymous:
        assert anonymous.get(f"{PHASE_PAGE}/leaderboard").status_code == 303
    write_spec(settings.assignments_dir, "public_leaderboard = true\n" + spec_toml(artifacts))
    with app_client(settings) as anonymous:
        board = anonymous.get(f"{PHASE_PAGE}/leaderboard")
        assert board.status_code == 200
        assert "20.00 %" in text_of(board.text) and 'class="you"' not in board.text
        assert 'href="/login"' in board.text
        assert anonymous.get(PHASE_PAGE).status_code == 303  # the rest stays private


def test_private_board_once_revealed_ranks_the_final_selection_and_lists_the_unscored_last(
    settings: Settings,
    passwords: dict[str, Account],
    artifacts: Artifacts,
    db: sessionmaker[Session],
) -> None:
    write_spec(settings.assignments_dir, board_spec(artifacts, board='reveal = "manual"'))
    add_attack_result(db, passwords["alice"], net_a=0.2, net_b=0.3, minutes_ago=9)
    add_attack_result(
        db, passwords["bob"], net_a=0.1, net_b=0.1, minutes_ago=8, status=SubmissionStatus.FAILED
    )
    with db() as session:
        names = {a: session.get(User, passwords[a].user_id).pseudonym for a in ("alice", "bob")}
    board_url = f"{PHASE_PAGE}/leaderboard"
    with logged_in(settings, "alice") as alice:
        public = alice.get(board_url)
        assert "Public board" in text_of(public.text) and "?board=private" not in public.text
        closed = alice.get(f"{board_url}?board=private")
        assert closed.status_code == 403 and "only the public board" in text_of(closed.text)

        reveal(settings, passwords["ta"], PHASE)
        html = alice.get(board_url).text
    assert re.search(r'href="[^"]*\?board=private" aria-current="page">Private board', html)
    assert "This is the private board: it decides the grades." in text_of(html)
    rows = re.findall(r"<tr(?: class=\"you\"[^>]*)?>(.*?)</tr>", html, re.S)[1:]
    assert [text_of(r).split()[:3] for r in rows] == [
        ["1", names["alice"], "you"],
        ["\u2014:", "not", "ranked"],
    ]
    assert names["bob"] in rows[1] and "not scored" in text_of(rows[1])
    assert "25.00 %" in text_of(rows[0])


# --- Feedback rules ---------------------------------------------------------------------------

AGGREGATE = 'feedback = "aggregate", round_to = 2, reveal = "manual"'


def add_attack_result(
    factory: sessionmaker[Session],
    account: Account,
    net_a: float,
    net_b: float,
    minutes_ago: int,
    status: SubmissionStatus = SubmissionStatus.SCORED,
) -> str:
    """An attack submission with per-model results as the grader records them (score: the mean
    over the two hidden models)."""
    score = (net_a + net_b) / 2
    with factory() as session:
        row = Submission(
            user_id=account.user_id,
            assignment_slug=SLUG,
            phase_id=PHASE,
            status=status,
            file_name="adv.npy",
            file_sha256=f"{minutes_ago:064d}",
            file_size=1,
            batch_path="/nonexistent",
            score=score,
            results={
                "metric": "mean_accuracy",
                "score": score,
                "n_images": 20,
                "models": [
                    {"name": name, "preprocessing": None, "clean_accuracy": 0.9, **accuracy}
                    for name, accuracy in (
                        ("net-a", {"adversarial_accuracy": net_a}),
                        ("net-b", {"adversarial_accuracy": net_b}),
                    )
                ],
                "fooled_by_k": [2, 7, 11],
            },
            created_at=utcnow() - timedelta(minutes=minutes_ago),
        )
        session.add(row)
        session.commit()
        return row.id


def reveal(settings: Settings, ta: Account, phase: str) -> None:
    with app_client(settings) as api:
        response = api.post(
            f"/api/v1/assignments/{SLUG}/phases/{phase}/reveal",
            headers=ta.headers,
            json={"reason": "grades are out"},
        )
        assert response.status_code == 204, response.text


def test_aggregate_feedback_hides_per_model_results_and_rounds_until_the_board_opens(
    settings: Settings,
    passwords: dict[str, Account],
    artifacts: Artifacts,
    db: sessionmaker[Session],
) -> None:
    write_spec(settings.assignments_dir, board_spec(artifacts, board=AGGREGATE))
    mine = add_attack_result(db, passwords["alice"], net_a=0.104, net_b=0.9, minutes_ago=5)
    detail = f"/submissions/{mine}"  # the exact score is 50.20 %, rounded 0.50
    with logged_in(settings, "alice") as alice:
        html = alice.get(detail).text
        text = text_of(html)
        assert "Scored: 50.00 % (mean accuracy" in text and "50.20" not in text
        assert "net-a" not in html and "net-b" not in html
        assert "Hidden models" not in text and "How many models each image fools" not in text
        assert "the results per hidden model are shown from then on" in text
        assert "The images of this batch cannot be shown" in text  # the batch part stays
        for url in ("/submissions", f"{detail}/status", PHASE_PAGE):
            shown = text_of(alice.get(url).text)
            assert "50.00 %" in shown and "50.20" not in shown, url
        rules = text_of(alice.get(PHASE_PAGE).text)
        assert "you see your overall score only, not the results per hidden model" in rules
        assert "Scores are rounded to 2 decimals until then" in rules
    with logged_in(settings, "ta") as ta:
        staff_view = text_of(ta.get(detail).text)
        assert "net-a" in staff_view and "Scored: 50.20 %" in staff_view

    reveal(settings, passwords["ta"], PHASE)
    with logged_in(settings, "alice") as alice:
        opened = text_of(alice.get(detail).text)
        assert "Scored: 50.20 %" in opened and "net-a 90.0 % 10.4 %" in opened
        assert "7 images fool 1 of 2 models" in opened
        assert "shown from then on" not in opened
        assert "50.20 %" in text_of(alice.get("/submissions").text)


def test_aggregate_feedback_hides_a_defenses_breakdown_and_sweep_but_not_its_flags(
    settings: Settings,
    passwords: dict[str, Account],
    artifacts: Artifacts,
    db: sessionmaker[Session],
) -> None:
    spec = spec_toml(artifacts, defense="").replace(
        "[phases.defense]", f"leaderboard = {{ {AGGREGATE} }}\n[phases.defense]"
    )
    write_spec(settings.assignments_dir, spec)
    suite = {"clean_accuracy": 0.8123, "robust_accuracy": 0.4567, "n_points": 20}
    with db() as session:
        row = Submission(
            user_id=passwords["alice"].user_id,
            assignment_slug=SLUG,
            phase_id=DEFENSE_PHASE,
            status=SubmissionStatus.SCORED,
            file_name="model.safetensors",
            file_sha256="1" * 64,
            file_size=1,
            batch_path="/nonexistent",
            manifest={"architecture": "resnet20", "mean": [0.5] * 3, "std": [0.25] * 3},
            score=0.4567,
            results={
                "metric": "robust_accuracy",
                "score": 0.4567,
                "n_points": 20,
                "clean_accuracy": 0.8123,
                "robust_accuracy": 0.4567,
                "final_robust_accuracy": 0.4012,
                "leaderboard_suite": "quick",
                "final_suite": "full",
                "suites": {
                    "quick": {**suite, "attacks": [attack_line("apgd-ce", 0.4567)]},
                    "full": {**suite, "attacks": [attack_line("square-5000", 0.4012)]},
                },
                "eps_sweep": [
                    {"eps": 0.0, "robust_accuracy": 0.8123},
                    {"eps": 8.0, "robust_accuracy": 0.4567},
                    {"eps": 64.0, "robust_accuracy": 0.35},
                ],
                "threat_model": {"norm": "linf", "eps": 8},
                "transfer": [{"attack_phase": PHASE, "accuracy": 0.61}],
                "flags": [{"code": "eps_sweep_not_zero", "message": "Still 35 % at eps 64."}],
            },
        )
        session.add(row)
        session.commit()
        detail = f"/submissions/{row.id}"
    hidden = ("apgd-ce", "square-5000", 'id="eps-sweep"', "40.1 %", "61.0 %")
    with logged_in(settings, "alice") as alice:
        html = alice.get(detail).text
        text = text_of(html)
        assert "Scored: 46.00 % (accuracy of your model" in text and "45.67" not in text
        for part in hidden:
            assert part not in html, part
        assert "the results per attack are shown from then on" in text
        assert "Still robust at a very large eps Still 35 % at eps 64." in text
        assert "Evaluation points 20" in text
    reveal(settings, passwords["ta"], DEFENSE_PHASE)
    with logged_in(settings, "alice") as alice:
        opened = alice.get(detail).text
    assert "Scored: 45.67 %" in text_of(opened)
    for part in hidden:
        assert part in opened, part


def attack_line(name: str, after: float) -> dict[str, object]:
    return {"name": name, "points_attacked": 16, "points_broken": 7, "robust_accuracy_after": after}


# --- Marks for the final selection ------------------------------------------------------------


def mark_forms(html: str) -> dict[str, set[str]]:
    """The submissions each kind of form (mark, unmark) on a page acts on."""
    found: dict[str, set[str]] = {"mark": set(), "unmark": set()}
    for submission_id, action in re.findall(r'action="/submissions/(\w+)/(mark|unmark)"', html):
        found[action].add(submission_id)
    return found


def marked(factory: sessionmaker[Session], *ids: str) -> list[bool]:
    with factory() as session:
        return [session.get(Submission, i).marked_at is not None for i in ids]


def test_a_student_marks_up_to_k_submissions_from_the_history_and_detail_pages(
    settings: Settings,
    passwords: dict[str, Account],
    artifacts: Artifacts,
    db: sessionmaker[Session],
) -> None:
    write_spec(
        settings.assignments_dir,
        board_spec(artifacts, board='selection = "marked", max_marked = 2'),
    )
    alice = passwords["alice"]
    best = add_attack_result(db, alice, 0.05, 0.05, minutes_ago=40)
    middle = add_attack_result(db, alice, 0.3, 0.3, minutes_ago=30)
    worst = add_attack_result(db, alice, 0.6, 0.6, minutes_ago=20)
    failed = add_attack_result(db, alice, 0.0, 0.0, 10, status=SubmissionStatus.FAILED)
    with logged_in(settings, "alice") as client:
        history = client.get("/submissions").text
        assert "you have marked 0 of at most 2 submissions for the final selection" in text_of(
            history
        )
        assert mark_forms(history) == {"mark": {best, middle, worst}, "unmark": set()}
        rules = text_of(client.get(PHASE_PAGE).text)
        assert f"Your grade counts {boards.SELECTION_RULES[Selection.MARKED]}." in rules
        assert "Mark up to 2 of your scored submissions" in rules

        csrf = page_csrf(client, "/submissions")
        done = client.post(
            f"/submissions/{middle}/mark", data={"csrf_token": csrf, "back": "/submissions"}
        )
        assert done.status_code == 303 and done.headers["location"] == "/submissions"
        assert (
            f"Submission {middle[:8]} is marked for the final selection. You have marked 1 of 2."
            in text_of(client.get("/submissions").text)
        )
        from_detail = client.post(
            f"/submissions/{worst}/mark", data={"csrf_token": csrf, "back": f"/submissions/{worst}"}
        )
        assert from_detail.headers["location"] == f"/submissions/{worst}"
        page = text_of(client.get(f"/submissions/{worst}").text)
        assert "This submission is marked for the final selection" in page
        assert "you have marked 2 of at most 2" in page

        full = client.get("/submissions").text
        assert mark_forms(full) == {"mark": set(), "unmark": {middle, worst}}
        assert "Unmark one to mark another." in text_of(full)
        assert "You have marked 2 of 2" in text_of(client.get(PHASE_PAGE).text)
        third = client.post(f"/submissions/{best}/mark", data={"csrf_token": csrf})
        assert "unmark one first" in text_of(client.get(third.headers["location"]).text)
        refused = client.post(f"/submissions/{failed}/mark", data={"csrf_token": csrf})
        assert "Nothing" not in refused.text and refused.status_code == 303
        forged = client.post(f"/submissions/{best}/unmark", data={"csrf_token": "guessed"})
        assert forged.status_code == 403
        assert marked(db, best, middle, worst, failed) == [False, True, True, False]

        client.post(f"/submissions/{middle}/unmark", data={"csrf_token": csrf})
        client.post(f"/submissions/{best}/mark", data={"csrf_token": csrf})
        assert marked(db, best, middle, worst) == [True, False, True]
    with logged_in(settings, "bob") as bob:
        other = bob.post(f"/submissions/{best}/unmark", data={"csrf_token": page_csrf(bob)})
        assert other.status_code == 404
    assert marked(db, best) == [True]

    past = utcnow() - timedelta(hours=1)
    write_spec(
        settings.assignments_dir,
        board_spec(
            artifacts,
            board='selection = "marked", max_marked = 2',
            opens_at=past - timedelta(days=2),
            due_at=past,
        ),
    )
    with logged_in(settings, "alice") as client:
        closed = client.get("/submissions").text
        assert mark_forms(closed) == {"mark": set(), "unmark": set()}
        assert "The phase is closed for you; the marks stay as they are." in text_of(closed)
        late = client.post(f"/submissions/{best}/unmark", data={"csrf_token": page_csrf(client)})
        assert "your final selection can no longer change" in text_of(
            client.get(late.headers["location"]).text
        )
    assert marked(db, best, worst) == [True, True]


def test_phases_without_marking_show_their_rule_and_no_mark_buttons(
    settings: Settings, passwords: dict[str, Account], db: sessionmaker[Session]
) -> None:
    mine = add_attack_result(db, passwords["alice"], 0.2, 0.2, minutes_ago=3)
    with logged_in(settings, "alice") as client:
        rules = text_of(client.get(PHASE_PAGE).text)
        assert f"Your grade counts {boards.SELECTION_RULES[Selection.BEST]}." in rules
        assert "Feedback" not in rules  # full feedback, exact scores: nothing to explain
        for page in ("/submissions", f"/submissions/{mine}"):
            assert mark_forms(client.get(page).text) == {"mark": set(), "unmark": set()}
        refused = client.post(f"/submissions/{mine}/mark", data={"csrf_token": page_csrf(client)})
        assert "there is nothing to mark" in text_of(client.get(refused.headers["location"]).text)
    assert marked(db, mine) == [False]


# --- Invitations and the account page ---------------------------------------------------------

ROSTER = b"student_id,name,email\ncarol,Carol Chen,carol@example.org\n"


def invite(settings: Settings, db: sessionmaker[Session], *, reissue: bool = False) -> str:
    """A fresh invitation code for carol, as a roster import gives it."""
    with db() as session:
        (entry,) = accounts.import_roster(
            session,
            actor=None,
            content=ROSTER,
            secret_key=settings.secret_key,
            lifetime_s=settings.invitation_lifetime_s,
            reissue=reissue,
        )
    assert entry.invitation_code is not None
    return entry.invitation_code


def invite_form(client: TestClient, code: str) -> tuple[str, str]:
    """The invitation page for ``code``: its HTML and its form token."""
    page = client.get("/invite", params={"code": code})
    assert page.status_code == 200, page.text
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert token, "the invitation form has no CSRF field"
    return page.text, token.group(1)


def test_an_invitation_link_sets_the_password_once_and_explains_refusals(
    settings: Settings, web: TestClient, db: sessionmaker[Session]
) -> None:
    code = invite(settings, db)
    html, token = invite_form(web, code)
    assert re.search(rf'<input id="invite-code" name="code"[^>]* value="{re.escape(code)}"', html)
    assert html.count('type="password"') == 2 and 'autocomplete="new-password"' in html
    form = {"csrf_token": token, "code": code, "password": "a long passphrase"}

    def post(**fields: str):
        return web.post("/invite", data={**form, **fields})

    def password_works(password: str) -> bool:
        with db() as session:
            user = session.scalar(select(User).where(User.username == "carol"))
            return verify_password(user, password)

    differ = post(password_again="a long passphrasf")
    assert differ.status_code == 400 and "The two passwords differ" in text_of(differ.text)
    assert "a long passphrase" not in differ.text  # never echoed
    weak = post(password="short", password_again="short")
    assert weak.status_code == 400 and "at least 8 characters" in text_of(weak.text)
    assert re.search(r'id="invite-password"[^>]*aria-invalid="true"', weak.text)
    taken = post(password_again="a long passphrase", pseudonym="Not Allowed!")
    assert taken.status_code == 400 and "A pseudonym is 3-32 characters" in text_of(taken.text)
    assert 'value="Not Allowed!"' in taken.text  # kept for correcting
    assert not password_works("a long passphrase")  # a refused form changes nothing
    with app_client(web.app.state.settings) as other_browser:
        forged = other_browser.post("/invite", data={**form, "password_again": "a long passphrase"})
        assert forged.status_code == 403 and "cookies are allowed" in text_of(forged.text)

    done = post(password_again="a long passphrase", pseudonym="carol-the-careful")
    assert done.status_code == 303 and done.headers["location"] == "/login"
    assert "Your password is set. Log in as carol with it." in text_of(web.get("/login").text)
    assert password_works("a long passphrase")
    with db() as session:
        assert session.scalar(select(User.pseudonym).where(User.username == "carol")) == (
            "carol-the-careful"
        )
    assert log_in(web, "carol", "a long passphrase").status_code == 303

    web.cookies.clear()
    _, token = invite_form(web, code)
    again = web.post(
        "/invite", data={**form, "csrf_token": token, "password_again": form["password"]}
    )
    assert again.status_code == 400 and "already used" in text_of(again.text)

    expired = invite(settings, db, reissue=True)
    with db() as session:
        for invitation in session.scalars(select(Invitation).where(Invitation.used_at.is_(None))):
            invitation.expires_at = utcnow() - timedelta(minutes=1)
        session.commit()
    late = web.post(
        "/invite",
        data={**form, "csrf_token": token, "code": expired, "password_again": form["password"]},
    )
    assert late.status_code == 400 and "has expired" in text_of(late.text)


def test_the_account_page_changes_the_pseudonym_and_shows_a_new_token_once(
    settings: Settings, passwords: dict[str, Account], db: sessionmaker[Session]
) -> None:
    with db() as session:
        bobs = session.get(User, passwords["bob"].user_id).pseudonym
    with logged_in(settings, "alice") as client:
        page = client.get("/account")
        assert page.status_code == 200
        assert re.search(r'href="/account" aria-current="page">Account<', page.text)
        csrf = page_csrf(client, "/account")

        def pseudonym(name: str) -> str:
            response = client.post(
                "/account/pseudonym", data={"csrf_token": csrf, "pseudonym": name}
            )
            assert response.status_code == 303 and response.headers["location"] == "/account"
            return text_of(client.get("/account").text)

        assert "Nothing was changed: A pseudonym is 3-32 characters" in pseudonym("X!")
        assert f"The pseudonym '{bobs}' is taken" in pseudonym(bobs)
        assert "Leaderboards now show you as gradient-gremlin." in pseudonym("Gradient-Gremlin")
        assert "Leaderboard name gradient-gremlin" in text_of(client.get("/account").text)

        created = client.post("/account/tokens", data={"csrf_token": csrf, "name": "laptop"})
        assert created.status_code == 200
        assert "Copy it now: it is shown only this once." in text_of(created.text)
        value = re.search(
            r'<code class="token-value" id="new-token-value">(agt_[\w-]+)</code>', created.text
        )
        assert value, created.text
        token = value.group(1)
        with app_client(settings) as api:
            me = api.get("/api/v1/me", headers={"Authorization": f"Bearer {token}"})
            assert me.status_code == 200 and me.json()["username"] == "alice"

        listed = client.get("/account").text
        assert token not in listed  # shown once only
        row = re.search(r"<tr>\s*<th scope=\"row\">laptop</th>(.*?)</tr>", listed, re.S)
        assert row and "active" in text_of(row.group(1))
        revoke_url = re.search(r'action="(/account/tokens/\d+/revoke)"', row.group(1))
        assert revoke_url
        forged = client.post(revoke_url.group(1), data={"csrf_token": "guessed"})
        assert forged.status_code == 403
        revoked = client.post(revoke_url.group(1), data={"csrf_token": csrf})
        assert revoked.status_code == 303
        assert "The token \u201claptop\u201d is revoked" in text_of(client.get("/account").text)
        with app_client(settings) as api:
            refused = api.get("/api/v1/me", headers={"Authorization": f"Bearer {token}"})
            assert refused.status_code == 401
    with logged_in(settings, "bob") as bob:
        theirs = bob.post(revoke_url.group(1), data={"csrf_token": page_csrf(bob)})
        assert "You have no token" in text_of(bob.get(theirs.headers["location"]).text)
