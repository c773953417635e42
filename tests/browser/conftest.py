"""Fixtures for page tests: one demo course and one live service for all of them (the real
`autograder up` with a Celery worker on the embedded SQLite setup), Debian's chromium driven
through pip's playwright, and full-page screenshots written as test artifacts (one more,
automatically, when a test fails).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, ViewportSize, expect, sync_playwright

from tests.e2e.conftest import deployment
from tests.e2e.servers import EMBEDDED, Deployment, RunningService, require, start_service

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_APT_PACKAGE = "chromium"
LAPTOP = ViewportSize(width=1280, height=800)
PHONE = ViewportSize(width=390, height=844)
LOCAL_HOST = "127.0.0.1"
ARTIFACTS_VARIABLE = "AUTOGRADER_TEST_ARTIFACTS"
DEFAULT_ARTIFACTS = Path(__file__).parent / "artifacts"
ACTION_TIMEOUT_MS = 15_000
"""Playwright's default wait for an element or a navigation; the worker's scoring waits longer."""

__all__ = ["deployment"]
"""The demo-build fixture of tests/e2e, re-exported so that pytest finds it here too."""

_OPEN_PAGES = pytest.StashKey[list[Page]]()
_ARTIFACTS = pytest.StashKey[Path]()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Page tests run against the embedded deployment only (one demo build per session)."""
    if "deployment" in metafunc.fixturenames:
        metafunc.parametrize("deployment", [EMBEDDED], indirect=True, scope="session")


# ---------------------------------------------------------------------------------------------
# The live service


@pytest.fixture(scope="package")
def live(
    deployment: Deployment,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RunningService]:
    """`autograder up` on the demo course while the page tests run; stopped (Ctrl-C) after the
    last of them, so it does not idle through the rest of the test session."""
    service = start_service(
        deployment.env, base_url=deployment.base_url, directory=tmp_path_factory.mktemp("service")
    )
    try:
        yield service
        service.stop()
    finally:
        service.kill()


def account(deployment: Deployment, username: str) -> dict[str, Any]:
    """The demo credentials of one account (the TA or a student): username, token, password."""
    accounts = [deployment.credentials["ta"], *deployment.credentials["students"]]
    return dict(next(a for a in accounts if a["username"] == username))


# ---------------------------------------------------------------------------------------------
# The browser


@pytest.fixture(scope="package")
def browser() -> Iterator[Browser]:
    """Debian's chromium, headless; missing, it skips the test (fails it in CI)."""
    executable = require(CHROMIUM, what=f"chromium ({CHROMIUM})", apt_package=CHROMIUM_APT_PACKAGE)
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, headless=True)
        try:
            yield launched
        finally:
            launched.close()


@dataclass
class PageLog:
    """What the pages of one test did: console errors, uncaught exceptions, every request URL."""

    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)

    def watch(self, context: BrowserContext) -> None:
        context.on("request", lambda request: self.requests.append(request.url))
        context.on("page", self._watch_page)

    def _watch_page(self, page: Page) -> None:
        page.on(
            "console",
            lambda message: (
                self.console_errors.append(f"{message.text} ({message.location})")
                if message.type == "error"
                else None
            ),
        )
        page.on("pageerror", lambda error: self.page_errors.append(str(error)))

    def foreign_requests(self) -> list[str]:
        """Requests over the network to any host but the local server (a CDN, a font service)."""
        return [
            url
            for url in self.requests
            if urlsplit(url).scheme not in {"data", "blob", "about"}
            and urlsplit(url).hostname != LOCAL_HOST
        ]


@pytest.fixture
def page_log() -> PageLog:
    return PageLog()


@pytest.fixture
def open_page(
    browser: Browser,
    live: RunningService,
    page_log: PageLog,
    artifacts_dir: Path,
    request: pytest.FixtureRequest,
) -> Iterator[Callable[[ViewportSize], Page]]:
    """Opens a page in a fresh browser context (no cookies) of the given viewport, with relative
    URLs resolved against the live service; every context is closed after the test."""
    contexts: list[BrowserContext] = []
    pages = request.node.stash.setdefault(_OPEN_PAGES, [])
    request.node.stash[_ARTIFACTS] = artifacts_dir  # where a failure screenshot goes

    def open_one(viewport: ViewportSize) -> Page:
        context = browser.new_context(viewport=viewport, base_url=live.base_url)
        context.set_default_timeout(ACTION_TIMEOUT_MS)
        contexts.append(context)
        page_log.watch(context)
        page = context.new_page()
        pages.append(page)
        return page

    try:
        yield open_one
    finally:
        pages.clear()
        for context in contexts:
            context.close()


@pytest.fixture
def page(open_page: Callable[[ViewportSize], Page]) -> Page:
    """A laptop-sized page (1280 x 800)."""
    return open_page(LAPTOP)


@pytest.fixture
def phone_page(open_page: Callable[[ViewportSize], Page]) -> Page:
    """A phone-sized page (390 x 844), in its own context: log in on it separately."""
    return open_page(PHONE)


@pytest.fixture
def log_in(deployment: Deployment) -> Callable[[Page, str], None]:
    """Logs an account in through the login form, as a person would, and waits to leave it."""

    def log_in_as(page: Page, username: str) -> None:
        credentials = account(deployment, username)
        page.goto("/login")
        page.get_by_label("Username").fill(credentials["username"])
        page.get_by_label("Password").fill(credentials["password"])
        page.get_by_role("button", name="Log in").click()
        expect(page).not_to_have_url(re.compile(r"/login(\?|$)"))

    return log_in_as


# ---------------------------------------------------------------------------------------------
# Screenshots


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    """``$AUTOGRADER_TEST_ARTIFACTS`` if set, else tests/browser/artifacts/ (git ignores it)."""
    directory = Path(os.environ.get(ARTIFACTS_VARIABLE) or DEFAULT_ARTIFACTS)
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def _artifact_path(directory: Path, test_name: str, step: str) -> Path:
    name = "-".join(re.sub(r"[^A-Za-z0-9_.-]+", "-", part).strip("-") for part in (test_name, step))
    return directory / f"{name}.png"


def _shoot(page: Page, path: Path) -> Path:
    page.screenshot(path=path, full_page=True, animations="disabled")
    return path


@pytest.fixture
def screenshot(artifacts_dir: Path, request: pytest.FixtureRequest) -> Callable[[Page, str], Path]:
    """Writes a full-page PNG of a page as ``<test>-<step>.png`` and returns its path."""

    def take(page: Page, step: str) -> Path:
        return _shoot(page, _artifact_path(artifacts_dir, request.node.name, step))

    return take


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """When a test fails, screenshot every page it still has open (``<test>-failure[-n].png``)."""
    report = yield
    pages = item.stash.get(_OPEN_PAGES, [])
    directory = item.stash.get(_ARTIFACTS, None)
    if report.when == "call" and report.failed and pages and directory is not None:
        for index, page in enumerate(pages):
            step = "failure" if index == 0 else f"failure-{index + 1}"
            try:
                path = _shoot(page, _artifact_path(directory, item.name, step))
            except Exception as exc:  # a crashed page must not hide the test's own failure
                report.sections.append(("failure screenshot", f"{step}: not taken: {exc}"))
            else:
                report.sections.append(("failure screenshot", str(path)))
    return report
