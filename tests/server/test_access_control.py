"""Every route of the app, walked as each role: anonymous, student A (the owner), student B and a
TA. The routes are read from the app itself, so a new route fails this test until it is given
a policy below. API calls use API tokens; page calls use browser sessions with their CSRF token.
"""

from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import select

from server.main import create_app
from server.models import ApiToken, Submission, SubmissionStatus, User
from server.security import start_session
from tests.conftest import PHASE, SLUG, Account, Artifacts, perturbed, spec_toml, write_spec
from worker.scoring import Outcome, run_scoring


class Policy(Enum):
    PUBLIC = "anyone, logged in or not"
    USER = "any logged-in user"
    OWNER = "the submission's owner and staff; another student gets 404"
    OWNER_ONLY = "the submission's owner only; anyone else gets 404"
    STAFF = "course staff only; students get 403"


SUBMISSION = "/submissions/{submission_id}"
PHASE_API = "/api/v1/assignments/{slug}/phases/{phase_id}"
PHASE_TA = "/ta/assignments/{slug}/phases/{phase_id}"

POLICIES: dict[tuple[str, str], Policy] = {
    # System, docs and the anonymous entry points.
    ("GET", "/api/v1/openapi.json"): Policy.PUBLIC,
    ("GET", "/docs"): Policy.PUBLIC,
    ("GET", "/api/v1/health"): Policy.PUBLIC,
    ("GET", "/metrics"): Policy.PUBLIC,
    ("GET", "/login"): Policy.PUBLIC,
    ("POST", "/login"): Policy.PUBLIC,
    ("GET", "/logout"): Policy.PUBLIC,
    ("POST", "/logout"): Policy.PUBLIC,
    ("GET", "/invite"): Policy.PUBLIC,
    ("POST", "/invite"): Policy.PUBLIC,
    ("POST", "/api/v1/invitations/accept"): Policy.PUBLIC,
    # The caller's own account and the course.
    ("GET", "/api/v1/me"): Policy.USER,
    ("PATCH", "/api/v1/me"): Policy.USER,
    ("GET", "/api/v1/me/tokens"): Policy.USER,
    ("POST", "/api/v1/me/tokens"): Policy.USER,
    ("DELETE", "/api/v1/me/tokens/{token_id}"): Policy.OWNER_ONLY,
    ("GET", "/api/v1/assignments"): Policy.USER,
    ("GET", "/api/v1/assignments/{slug}"): Policy.USER,
    ("GET", f"{PHASE_API}/dataset"): Policy.USER,
    ("POST", f"{PHASE_API}/submissions"): Policy.USER,
    ("GET", f"{PHASE_API}/quota"): Policy.USER,
    ("GET", f"{PHASE_API}/leaderboard"): Policy.USER,
    ("GET", f"{PHASE_API}/transfer"): Policy.USER,
    ("GET", "/api/v1/submissions"): Policy.USER,
    ("POST", "/api/v1/receipts/verify"): Policy.USER,
    ("GET", "/"): Policy.USER,
    ("GET", "/assignments/{slug}/phases/{phase_id}"): Policy.USER,
    ("GET", "/assignments/{slug}/phases/{phase_id}/leaderboard"): Policy.USER,
    ("GET", "/leaderboards"): Policy.USER,
    ("GET", "/submissions"): Policy.USER,
    ("GET", "/account"): Policy.USER,
    ("POST", "/account/pseudonym"): Policy.USER,
    ("POST", "/account/tokens"): Policy.USER,
    ("POST", "/account/tokens/{token_id}/revoke"): Policy.OWNER_ONLY,
    # One submission.
    ("GET", f"/api/v1{SUBMISSION}"): Policy.OWNER,
    ("GET", f"/api/v1{SUBMISSION}/receipt"): Policy.OWNER,
    ("POST", f"/api/v1{SUBMISSION}/cancel"): Policy.OWNER,
    ("PUT", f"/api/v1{SUBMISSION}/mark"): Policy.OWNER_ONLY,
    ("DELETE", f"/api/v1{SUBMISSION}/mark"): Policy.OWNER_ONLY,
    ("GET", SUBMISSION): Policy.OWNER,
    ("GET", f"{SUBMISSION}/status"): Policy.OWNER,
    ("GET", f"{SUBMISSION}/samples/{{index}}/{{kind}}.png"): Policy.OWNER,
    ("POST", f"{SUBMISSION}/cancel"): Policy.OWNER,
    ("POST", f"{SUBMISSION}/mark"): Policy.OWNER_ONLY,
    ("POST", f"{SUBMISSION}/unmark"): Policy.OWNER_ONLY,
    # Staff.
    ("POST", "/api/v1/roster"): Policy.STAFF,
    ("POST", f"/api/v1{SUBMISSION}/regrade"): Policy.STAFF,
    ("POST", f"/api/v1{SUBMISSION}/override"): Policy.STAFF,
    ("POST", f"{PHASE_API}/regrade"): Policy.STAFF,
    ("GET", f"{PHASE_API}/extensions"): Policy.STAFF,
    ("PUT", f"{PHASE_API}/extensions/{{username}}"): Policy.STAFF,
    ("DELETE", f"{PHASE_API}/extensions/{{username}}"): Policy.STAFF,
    ("PUT", f"{PHASE_API}/quota/{{username}}"): Policy.STAFF,
    ("POST", f"{PHASE_API}/reveal"): Policy.STAFF,
    ("GET", f"{PHASE_API}/scores.csv"): Policy.STAFF,
    ("GET", f"{PHASE_API}/grades.csv"): Policy.STAFF,
    ("GET", "/api/v1/assignments/{slug}/grades.csv"): Policy.STAFF,
    ("GET", "/api/v1/audit"): Policy.STAFF,
    ("GET", "/ta"): Policy.STAFF,
    ("GET", "/ta/audit"): Policy.STAFF,
    ("POST", "/ta/roster"): Policy.STAFF,
    ("GET", f"/ta{SUBMISSION}"): Policy.STAFF,
    ("POST", f"/ta{SUBMISSION}/cancel"): Policy.STAFF,
    ("POST", f"/ta{SUBMISSION}/regrade"): Policy.STAFF,
    ("POST", f"/ta{SUBMISSION}/override"): Policy.STAFF,
    ("GET", PHASE_TA): Policy.STAFF,
    ("POST", f"{PHASE_TA}/reveal"): Policy.STAFF,
    ("POST", f"{PHASE_TA}/quota"): Policy.STAFF,
    ("POST", f"{PHASE_TA}/regrade"): Policy.STAFF,
    ("POST", f"{PHASE_TA}/extensions"): Policy.STAFF,
    ("POST", f"{PHASE_TA}/extensions/{{username}}/revoke"): Policy.STAFF,
}

SKIPPED_METHODS = {"HEAD", "OPTIONS"}


def app_routes(app: FastAPI) -> list[tuple[str, str]]:
    """Every (method, path) the app serves, through included routers (static files aside)."""
    found: list[tuple[str, str]] = []

    def walk(routes: list[Any], prefix: str) -> None:
        for route in routes:
            if type(route).__name__ == "_IncludedRouter":
                context = route.include_context
                walk(route.original_router.routes, prefix + (getattr(context, "prefix", "") or ""))
            elif hasattr(route, "methods") and route.methods:
                for method in sorted(set(route.methods) - SKIPPED_METHODS):
                    found.append((method, prefix + route.path))
            elif hasattr(route, "routes") and getattr(route, "path", "") != "/static":
                walk(route.routes, prefix + getattr(route, "path", ""))

    walk(list(app.router.routes), "")
    return sorted(set(found))


@dataclass
class Caller:
    name: str
    headers: dict[str, str]
    cookie: str | None = None
    csrf: str | None = None


@pytest.fixture
def walk_setup(settings, db, accounts: dict[str, Account], artifacts: Artifacts):
    write_spec(settings.assignments_dir, spec_toml(artifacts, defense=""))
    app = create_app(settings)
    with TestClient(app) as client:
        buffer = io.BytesIO()
        np.save(buffer, perturbed(artifacts.eval_set.images), allow_pickle=False)
        response = client.post(
            f"/api/v1/assignments/{SLUG}/phases/{PHASE}/submissions",
            headers=accounts["alice"].headers,
            files={"file": ("adv.npy", buffer.getvalue())},
        )
        submission_id = response.json()["id"]
        assert run_scoring(submission_id, settings=settings, session_factory=db) is Outcome.SCORED
        spare = client.post(
            "/api/v1/me/tokens", headers=accounts["alice"].headers, json={"name": "walk"}
        ).json()
        callers = {"anonymous": Caller("anonymous", {})}
        with db() as session:
            for name in ("alice", "bob", "ta"):
                user = session.scalar(select(User).where(User.username == name))
                cookie, web = start_session(
                    session, user=user, secret_key=settings.secret_key, lifetime_s=3600
                )
                callers[name] = Caller(name, accounts[name].headers, cookie, web.csrf_token)
            session.commit()
            assert session.get(ApiToken, spare["id"]) is not None
        params = {
            "slug": SLUG,
            "phase_id": PHASE,
            "submission_id": submission_id,
            "username": "alice",
            "token_id": str(spare["id"]),
            "index": "0",
            "kind": "clean",
        }
        yield app, client, callers, params


def call(client: TestClient, method: str, path: str, caller: Caller) -> Any:
    client.cookies.clear()
    if path.startswith("/api/") or caller.cookie is None:
        json_body = {} if method in {"POST", "PUT", "PATCH"} else None
        return client.request(
            method, path, headers=caller.headers, json=json_body, follow_redirects=False
        )
    client.cookies.set("autograder_session", caller.cookie)
    data = {"csrf_token": caller.csrf} if method == "POST" else None
    return client.request(method, path, data=data, follow_redirects=False)


def denied(response: Any) -> bool:
    return response.status_code in (401, 403) or (
        response.status_code in (302, 303) and "/login" in response.headers.get("location", "")
    )


def refused_with_a_message(response: Any) -> bool:
    """A page form answered with a redirect carrying an error flash (the pages' way to refuse a
    form post without losing the page): the flash cookie holds ``[level, message]``."""
    if response.status_code != 303:
        return False
    for header in response.headers.get_list("set-cookie"):
        name, _, rest = header.partition("=")
        if name.strip() == "autograder_flash" and rest:
            payload = rest.split(";", 1)[0].split(".", 1)[0]
            level, _ = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
            return bool(level == "error")
    return False


def test_every_route_has_a_policy_and_each_role_gets_the_answer_it_should(walk_setup) -> None:
    app, client, callers, params = walk_setup
    routes = app_routes(app)
    unknown = [route for route in routes if route not in POLICIES]
    assert unknown == [], f"give these routes a policy in POLICIES: {unknown}"
    stale = [route for route in POLICIES if route not in routes]
    assert stale == [], f"these POLICIES name routes the app no longer has: {stale}"

    def order(route: tuple[str, str]) -> tuple[bool, bool]:
        # Staff actions late (a regrade or a reveal changes what later calls see) and logging
        # out last (it ends the sessions the other page calls use).
        return route[1] == "/logout", POLICIES[route] is Policy.STAFF

    problems = []
    for method, template in sorted(routes, key=order):
        policy = POLICIES[(method, template)]
        path = template.format(**params)
        for name in ("anonymous", "bob", "alice", "ta"):
            response = call(client, method, path, callers[name])
            status = response.status_code
            if status >= 500:
                problems.append(f"{method} {template} as {name}: {status}")
                continue
            expected = _expected(policy, name)
            page_form = method == "POST" and not path.startswith("/api/")
            ok = {
                "any": True,
                "allowed": not denied(response) and status != 404,
                "allowed_or_absent": not denied(response),
                "denied": denied(response)
                or (page_form and name != "anonymous" and refused_with_a_message(response)),
                "hidden": status == 404 or (page_form and refused_with_a_message(response)),
            }[expected]
            if not ok:
                problems.append(f"{method} {template} as {name}: {status}, expected {expected}")
    assert problems == [], "\n".join(problems)


def _expected(policy: Policy, role: str) -> str:
    if policy is Policy.PUBLIC:
        return "any"
    if role == "anonymous":
        return "denied"
    if policy is Policy.USER:
        return "allowed_or_absent"
    if policy is Policy.STAFF:
        return "allowed_or_absent" if role == "ta" else "denied"
    if role == "alice":
        return "allowed"
    if policy is Policy.OWNER and role == "ta":
        return "allowed"
    return "hidden"


def test_students_never_see_the_private_board_hidden_files_or_others_results(
    walk_setup, artifacts: Artifacts
) -> None:
    _, client, callers, params = walk_setup
    board = f"/api/v1/assignments/{SLUG}/phases/{PHASE}/leaderboard?board=private"
    for name in ("alice", "bob"):
        assert client.get(board, headers=callers[name].headers).status_code == 403
    assert client.get(board, headers=callers["ta"].headers).status_code == 200
    for path in (
        "/static/../autograder.db",
        "/static/%2e%2e/%2e%2e/config.py",
        "/static/..%2f..%2fconfig.py",
    ):
        assert client.get(path).status_code == 404, path
    listed = client.get("/api/v1/submissions", headers=callers["bob"].headers).json()
    assert listed["count"] == 0
    text = client.get(f"/api/v1/assignments/{SLUG}", headers=callers["bob"].headers).text
    for name, sha256 in artifacts.weights.items():  # no hidden model's file or hash
        assert f"{name}.safetensors" not in text and sha256 not in text
    assert artifacts.eval_sha not in text and "eval.npz" not in text


def test_another_student_changes_nothing_through_the_api_or_the_pages(
    walk_setup, db, accounts: dict[str, Account], artifacts: Artifacts
) -> None:
    _, client, callers, params = walk_setup
    buffer = io.BytesIO()
    np.save(buffer, perturbed(artifacts.eval_set.images, seed=5), allow_pickle=False)
    queued = client.post(
        f"/api/v1/assignments/{SLUG}/phases/{PHASE}/submissions",
        headers=accounts["alice"].headers,
        files={"file": ("adv.npy", buffer.getvalue())},
    ).json()["id"]
    bob = callers["bob"]
    attempts = [
        ("POST", f"/api/v1/submissions/{queued}/cancel"),
        ("POST", f"/submissions/{queued}/cancel"),
        ("DELETE", f"/api/v1/me/tokens/{params['token_id']}"),
        ("POST", f"/account/tokens/{params['token_id']}/revoke"),
        ("POST", f"/ta/submissions/{queued}/cancel"),
    ]
    for method, path in attempts:
        response = call(client, method, path, bob)
        assert response.status_code in (303, 403, 404), (path, response.status_code)
    with db() as session:
        assert session.get(Submission, queued).status is SubmissionStatus.QUEUED
        assert session.get(ApiToken, int(params["token_id"])).revoked_at is None
