"""The browser-test machinery itself: chromium starts, the live server's login page loads from the
server alone (no CDN, no console error) on a laptop and a phone, and screenshots are written."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from playwright.sync_api import Page, ViewportSize, expect

from tests.browser.conftest import LAPTOP, PHONE, PageLog

pytestmark = [pytest.mark.browser, pytest.mark.e2e, pytest.mark.slow]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("viewport", [LAPTOP, PHONE], ids=["laptop", "phone"])
def test_login_page_loads_from_the_server_alone(
    viewport: ViewportSize,
    open_page: Callable[[ViewportSize], Page],
    page_log: PageLog,
    screenshot: Callable[[Page, str], Path],
) -> None:
    tab = open_page(viewport)
    assert tab.viewport_size == viewport

    response = tab.goto("/login", wait_until="networkidle")
    assert response is not None and response.status == 200, response and response.status
    assert response.headers["content-type"].startswith("text/html"), response.headers
    expect(tab.get_by_label("Username")).to_be_visible()
    expect(tab.get_by_label("Password")).to_be_visible()

    path = screenshot(tab, "login")
    assert path.read_bytes().startswith(PNG_SIGNATURE), path
    assert path.stat().st_size > 1000, path

    assert page_log.console_errors == [], page_log.console_errors
    assert page_log.page_errors == [], page_log.page_errors
    assert page_log.requests, "the page made no request at all"
    assert page_log.foreign_requests() == [], page_log.foreign_requests()


def test_api_docs_render_from_the_vendored_swagger_ui(
    page: Page, page_log: PageLog, screenshot: Callable[[Page, str], Path]
) -> None:
    response = page.goto("/docs", wait_until="networkidle")
    assert response is not None and response.status == 200
    expect(
        page.get_by_text("/api/v1/assignments/{slug}/phases/{phase_id}/submissions").first
    ).to_be_visible()
    screenshot(page, "api-docs")
    assert page_log.page_errors == [], page_log.page_errors
    assert page_log.foreign_requests() == [], page_log.foreign_requests()
    assert any("/static/vendor/swagger-ui/swagger-ui-bundle.js" in url for url in page_log.requests)
