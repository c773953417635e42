"""A TA's visit in the browser, on the live service with a real worker: log in, open the dashboard,
find a student's scored submission, regrade it and watch it go back to queued and be scored again,
then download the phase's scores as CSV from the export link."""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest
from playwright.sync_api import Page, expect

from tests.browser.conftest import PageLog
from tests.e2e.servers import Deployment
from tests.e2e.test_attack_flow import ASSIGNMENT, PHASE, PHASE_URL, get, sign_noise, wait_scored

pytestmark = [pytest.mark.browser, pytest.mark.e2e, pytest.mark.slow]

STUDENT = "bob"
SCORE_TIMEOUT_MS = 240_000
EXPORT_HEADER = [
    "username",
    "pseudonym",
    "submission_id",
    "score",
    "final_score",
    "overridden",
    "submissions",
    "scored_at",
]
"""The columns the export promises (docs and the TA phase page name them)."""


def scored_submission(deployment: Deployment) -> dict[str, object]:
    """A scored attack submission of the student's, made through the REST API as the CLI would."""
    response = get(deployment, STUDENT, f"{PHASE_URL}/dataset", format="npz")
    assert response.status_code == 200, response.text
    with np.load(io.BytesIO(response.content), allow_pickle=False) as npz:
        images = npz["images"]
    buffer = io.BytesIO()
    np.save(buffer, sign_noise(images, seed=23), allow_pickle=False)
    response = httpx.post(
        f"{deployment.base_url}{PHASE_URL}/submissions",
        headers=deployment.headers(STUDENT),
        files={"file": ("bob.npy", buffer.getvalue(), "application/octet-stream")},
        timeout=60,
    )
    assert response.status_code == 202, response.text
    return wait_scored(deployment, STUDENT, response.json()["id"])


@pytest.mark.timeout(600)
def test_ta_regrades_a_submission_and_exports_the_scores(
    deployment: Deployment,
    page: Page,
    page_log: PageLog,
    log_in: Callable[[Page, str], None],
    screenshot: Callable[[Page, str], Path],
) -> None:
    submission = scored_submission(deployment)
    short = str(submission["id"])[:8]
    pseudonym = get(deployment, STUDENT, "/api/v1/me").json()["pseudonym"]
    phases = get(deployment, STUDENT, f"/api/v1/assignments/{ASSIGNMENT}").json()["phases"]
    phase_title = next(p["title"] for p in phases if p["id"] == PHASE)

    # The dashboard, through the navigation.
    log_in(page, str(deployment.credentials["ta"]["username"]))
    page.get_by_role("navigation", name="Main").get_by_role("link", name="TA").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("TA dashboard")
    expect(page.get_by_role("heading", name="Queues and workers")).to_be_visible()
    screenshot(page, "dashboard")

    # Find the student's submission with the filter form, and open it.
    page.get_by_label("Student username").fill(STUDENT)
    page.get_by_role("button", name="Show").click()
    submissions = page.get_by_role("table", name="Submissions, newest first")
    expect(submissions.get_by_role("row").filter(has_text=STUDENT).first).to_be_visible()
    screenshot(page, "filtered")
    submissions.get_by_role("link", name=re.compile(rf"submission {short}$")).click()
    heading = page.get_by_role("heading", level=1)
    expect(heading).to_have_text(f"Submission {short} scored")

    # Regrade it: back to queued, then scored again by the worker; the page follows by itself.
    regrade = page.get_by_role("form", name="Regrade")
    regrade.get_by_label("Reason").fill("hidden model weights were replaced")
    regrade.get_by_role("button", name="Regrade submission").click()
    expect(page.get_by_text(f"Submission {short} is queued again.")).to_be_visible()
    expect(heading).to_have_text(re.compile(rf"^Submission {short} (queued|running)$"))
    screenshot(page, "queued-again")
    expect(heading).to_have_text(f"Submission {short} scored", timeout=SCORE_TIMEOUT_MS)
    history = page.get_by_role("region", name="Staff actions on this submission")
    expect(history).to_contain_text("hidden model weights were replaced")
    screenshot(page, "scored-again")
    rescored = get(deployment, STUDENT, f"/api/v1/submissions/{submission['id']}").json()
    assert rescored["status"] == "scored", rescored

    # The phase's staff page, and the scores as CSV through its export link.
    page.get_by_role("link", name="TA dashboard").click()
    page.get_by_role("link", name=f"Regrade, extensions, export for {phase_title}").click()
    expect(page).to_have_url(re.compile(rf"/ta/assignments/{ASSIGNMENT}/phases/{PHASE}$"))
    expect(page.get_by_role("heading", name="Scores and grades")).to_be_visible()
    expect(page.get_by_role("form", name="Reveal private board")).to_be_visible()
    expect(page.get_by_role("form", name="Raise quota")).to_be_visible()
    expect(page.get_by_role("link", name="Download the grades as CSV")).to_be_visible()
    screenshot(page, "phase")
    with page.expect_download() as info:
        page.get_by_role("link", name="Download the scores as CSV").click()
    download = info.value
    assert download.suggested_filename.endswith(".csv"), download.suggested_filename
    rows = list(csv.reader(io.StringIO(Path(download.path()).read_text(encoding="utf-8"))))
    assert rows[0] == EXPORT_HEADER, rows[0]
    mine = [dict(zip(EXPORT_HEADER, row, strict=True)) for row in rows[1:] if row[0] == STUDENT]
    assert len(mine) == 1, rows
    assert mine[0]["pseudonym"] == pseudonym
    assert mine[0]["submission_id"] == submission["id"]
    assert float(mine[0]["final_score"]) == pytest.approx(rescored["score"], abs=1e-6)
    assert mine[0]["overridden"] == "no"

    assert page_log.console_errors == [], page_log.console_errors
    assert page_log.page_errors == [], page_log.page_errors
    assert page_log.foreign_requests() == [], page_log.foreign_requests()
