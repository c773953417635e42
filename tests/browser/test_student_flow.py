"""A student's visit in the browser, on the live service with a real worker: log in through the
form, open the attack phase, upload a batch through the page, see it queued at once and watch the
status turn to scored without a reload, read the result (sample images, distance histograms),
find themself on the leaderboard and open their account page; the phase page on a phone; the
login form with the keyboard alone."""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from playwright.sync_api import Locator, Page, expect

from tests.browser.conftest import PageLog, account
from tests.e2e.servers import Deployment
from tests.e2e.test_attack_flow import ASSIGNMENT, PHASE, PHASE_URL, get, sign_noise

pytestmark = [pytest.mark.browser, pytest.mark.e2e, pytest.mark.slow]

STUDENT = "alice"
PHASE_PAGE = f"/assignments/{ASSIGNMENT}/phases/{PHASE}"
SCORE_TIMEOUT_MS = 240_000

RECORD_STATUS_TEXTS = """(region) => {
    window.statusTexts = [region.textContent];
    new MutationObserver(() => window.statusTexts.push(region.textContent))
        .observe(region, {childList: true, subtree: true, characterData: true});
}"""
"""Records every text the live status region shows, so a test sees states that come and go."""

STICKING_OUT = """() => document.documentElement.scrollWidth <= window.innerWidth ? [] :
    [...document.querySelectorAll("body *")]
    .filter((element) => element.getBoundingClientRect().right > window.innerWidth + 0.5)
    .map((element) => `<${element.localName} class="${element.getAttribute("class")}">: `
        + element.textContent.replace(/\\s+/g, " ").trim().slice(0, 60))"""


def api(deployment: Deployment, path: str, **params: Any) -> Any:
    response = get(deployment, STUDENT, path, **params)
    assert response.status_code == 200, response.text
    return response.json() if "json" in response.headers["content-type"] else response.content


def attack_batch(deployment: Deployment, directory: Path) -> Path:
    """The phase's clean images from the REST dataset endpoint (the student's API token), each
    pixel moved by +-8: a valid L-inf attack, saved as the .npy the page accepts."""
    content = api(deployment, f"{PHASE_URL}/dataset", format="npz")
    with np.load(io.BytesIO(content), allow_pickle=False) as npz:
        images = npz["images"]
    path = directory / "alice-adversarial.npy"
    np.save(path, sign_noise(images, seed=11), allow_pickle=False)
    return path


def image_loaded(image: Locator) -> bool:
    return bool(image.evaluate("(img) => img.complete && img.naturalWidth > 0"))


def sticking_out(page: Page) -> list[str]:
    """When the page scrolls sideways, the elements reaching past the viewport's right edge."""
    return list(page.evaluate(STICKING_OUT))


@pytest.mark.timeout(600)
def test_student_submits_an_attack_and_reads_the_result(
    deployment: Deployment,
    page: Page,
    phone_page: Page,
    page_log: PageLog,
    log_in: Callable[[Page, str], None],
    screenshot: Callable[[Page, str], Path],
    tmp_path: Path,
) -> None:
    phase_title = next(
        p["title"]
        for p in api(deployment, f"/api/v1/assignments/{ASSIGNMENT}")["phases"]
        if p["id"] == PHASE
    )
    pseudonym = api(deployment, "/api/v1/me")["pseudonym"]

    # Log in through the form; the home page lists the phases.
    log_in(page, STUDENT)
    expect(page.get_by_role("heading", level=1)).to_have_text("Your assignments")
    expect(page.get_by_text(f"Logged in as {STUDENT}.")).to_be_visible()
    screenshot(page, "home")

    # Open the attack phase.
    page.get_by_role("link", name=f"Rules and upload for {phase_title}").click()
    expect(page).to_have_url(re.compile(re.escape(PHASE_PAGE) + "$"))
    expect(page.get_by_role("heading", level=1)).to_have_text(phase_title)
    status = page.get_by_role("region", name="Status of your latest submission")
    expect(status).to_contain_text("You have not submitted to this phase yet.")
    screenshot(page, "phase")

    # Upload a batch through the page's form and watch the status turn to scored in place.
    page.evaluate("() => { window.notReloaded = true; }")
    status.evaluate(RECORD_STATUS_TEXTS)
    page.get_by_label(re.compile(r"^Adversarial images")).set_input_files(
        attack_batch(deployment, tmp_path)
    )
    page.get_by_role("button", name="Upload and submit").click()
    expect(page.get_by_text(re.compile(r"^Uploaded and accepted\."))).to_be_visible()
    screenshot(page, "uploaded")
    expect(status).to_contain_text(re.compile(r"Scored: \d"), timeout=SCORE_TIMEOUT_MS)
    assert page.evaluate("() => window.notReloaded") is True, "the page was reloaded"
    seen = page.evaluate("() => window.statusTexts")
    assert "You have not submitted" in seen[0] and "Scored" in seen[-1], seen
    assert "Queued" in seen[1], seen  # the upload's answer, shown before the first poll
    screenshot(page, "scored")

    # The result: hidden models, the sample images (loaded), the distance histograms.
    status.get_by_role("link", name=re.compile(r"^Details of submission")).click()
    expect(page.get_by_role("heading", level=1)).to_have_text(re.compile(r"^Submission \w{8}$"))
    expect(page.get_by_role("heading", name="Hidden models")).to_be_visible()
    yours = page.get_by_role("img", name=re.compile(r": your image$"))
    expect(yours.first).to_be_visible()
    page.wait_for_load_state("load")  # every image has arrived or failed
    for index in range(yours.count()):
        assert image_loaded(yours.nth(index)), yours.nth(index).get_attribute("alt")
    for norm in ("L-inf", "L2"):
        expect(
            page.get_by_role("img", name=re.compile(rf"^{norm} distance of each image"))
        ).to_be_visible()
    screenshot(page, "result")

    # The leaderboard, through the navigation: the student's pseudonym, marked as theirs.
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Leaderboards").click()
    page.get_by_role("link", name=phase_title, exact=True).click()
    expect(page.get_by_role("heading", level=1)).to_have_text(f"Leaderboard: {phase_title}")
    board = page.get_by_role("table")
    mine = board.get_by_role("row").filter(has=page.get_by_role("rowheader", name=pseudonym))
    expect(mine).to_have_count(1)
    expect(mine).to_contain_text("you")
    expect(board).not_to_contain_text(STUDENT)
    screenshot(page, "leaderboard")

    # The account page, through the navigation: the pseudonym and a token form.
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Account").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Your account")
    expect(page.get_by_label("Pseudonym")).to_have_value(pseudonym)
    expect(page.get_by_role("form", name="Create a token")).to_be_visible()
    screenshot(page, "account")

    # The phase page on a phone: readable without sideways scrolling.
    log_in(phone_page, STUDENT)
    phone_page.goto(PHASE_PAGE)
    expect(phone_page.get_by_role("button", name="Upload and submit")).to_be_visible()
    screenshot(phone_page, "phase-phone")

    assert page_log.console_errors == [], page_log.console_errors
    assert page_log.page_errors == [], page_log.page_errors
    assert page_log.foreign_requests() == [], page_log.foreign_requests()
    assert sticking_out(phone_page) == [], "the phase page scrolls sideways on a 390 px phone"


def test_login_form_works_with_the_keyboard_alone(
    deployment: Deployment, page: Page, screenshot: Callable[[Page, str], Path]
) -> None:
    credentials = account(deployment, "carol")
    page.goto("/login")
    username = page.get_by_label("Username")
    for _ in range(10):  # the skip link and the header come first, unless the field has focus
        if username.evaluate("(field) => field === document.activeElement"):
            break
        page.keyboard.press("Tab")
    expect(username).to_be_focused()
    page.keyboard.type(credentials["username"])
    page.keyboard.press("Tab")
    expect(page.get_by_label("Password")).to_be_focused()
    page.keyboard.type(credentials["password"])
    page.keyboard.press("Tab")
    expect(page.get_by_role("button", name="Log in")).to_be_focused()
    screenshot(page, "focused-button")
    page.keyboard.press("Enter")
    expect(page).not_to_have_url(re.compile(r"/login"))
    expect(page.get_by_text("Logged in as carol.")).to_be_visible()
