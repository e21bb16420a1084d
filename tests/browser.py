"""Real-browser helpers: Debian's Chromium driven by Playwright (no browser download).

Screenshots go to ``$PACSVAULT_TEST_OUTPUT/browser`` (default ``test-output/browser`` at
the repository root) so CI can keep them as artifacts.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest

from tests.harness.components import require
from tests.web_helpers import Authenticator

CHROMIUM = "/usr/lib/chromium/chromium"
CHROMIUM_ARGS = [
    "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
]
OUTPUT = Path(os.environ.get("PACSVAULT_TEST_OUTPUT",
                             Path(__file__).resolve().parent.parent / "test-output")) / "browser"
SECRET_RE = re.compile(r'id="totp-secret"[^>]*>([A-Z2-7 ]+)<')
CANVAS = "canvas.cornerstone-canvas"

# Console messages that are not errors of the application: Chromium's software GL driver
# chatter is logged as warnings, never as errors, so nothing needs filtering today.
IGNORED: tuple[re.Pattern[str], ...] = ()


def chromium_available() -> bool:
    return Path(CHROMIUM).is_file() and shutil.which("true") is not None


@dataclass
class ErrorLog:
    """Every JavaScript error, failed resource and CSP violation a page reports."""

    entries: list[str] = field(default_factory=list)

    def attach(self, page: Any) -> None:
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.entries.append(f"pageerror: {exc}"))

    def _console(self, message: Any) -> None:
        text = str(message.text)
        relevant = message.type == "error" or "Content Security Policy" in text
        if relevant and not any(p.search(text) for p in IGNORED):
            # where: a failed resource's own URL ("Failed to load resource" names no URL)
            where = str((getattr(message, "location", None) or {}).get("url", ""))[:200]
            self.entries.append(f"console.{message.type}: {text[:500]}"
                                + (f" ({where})" if where else ""))

    def clear(self) -> None:
        self.entries.clear()


@contextmanager
def chromium() -> Iterator[Any]:
    """A headless Chromium, or a skip when the machine has none; under CI a failure (the
    install script installs it: a browser test skipped there would pass unseen)."""
    if not chromium_available():
        require("Debian's chromium is not installed (scripts/install.sh --test)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                             args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module", name="browser")
def browser_fixture() -> Iterator[Any]:
    """The module's Chromium (fixture ``browser``), shared by its tests. A test module
    uses it with ``from tests.browser import browser_fixture as browser_fixture``: the
    import makes pytest see the fixture, the alias marks it as used on purpose."""
    with chromium() as b:
        yield b


def new_page(browser: Any, *, locale: str = "en-US", errors: ErrorLog | None = None,
             viewport: tuple[int, int] = (1280, 800)) -> Any:
    context = browser.new_context(
        locale=locale, ignore_https_errors=True,
        viewport={"width": viewport[0], "height": viewport[1]},
        extra_http_headers={"Accept-Language": f"{locale},{locale.split('-')[0]};q=0.9"},
    )
    context.set_default_timeout(30_000)  # generous: CI machines are small
    page = context.new_page()
    if errors is not None:
        errors.attach(page)
    return page


def shot(page: Any, name: str) -> Path:
    OUTPUT.mkdir(parents=True, exist_ok=True)
    path = OUTPUT / f"{name}.png"
    page.screenshot(path=str(path))
    return path


def submit(page: Any, selector: str = "form button[type=submit]") -> None:
    """Submit a form by keyboard-free click and wait for the next page."""
    with page.expect_navigation():
        page.locator(selector).first.click()


def password_step(page: Any, base: str, user: str, password: str, *, path: str = "/") -> None:
    page.goto(base + path)
    page.fill("input[name=name]", user)
    page.fill("input[name=password]", password)
    with page.expect_navigation():
        page.press("input[name=password]", "Enter")


def first_sign_in(page: Any, base: str, user: str, password: str) -> Authenticator:
    """Password, then TOTP enrolment: read the secret from the page like a user typing it
    into their app, answer with the current code, acknowledge the recovery codes."""
    password_step(page, base, user, password)
    assert "/login/enrol" in page.url, page.url
    found = SECRET_RE.search(page.content())
    assert found, "the enrolment page shows no TOTP secret"
    app = Authenticator(found.group(1).replace(" ", ""))
    page.fill("input[name=code]", app.code())
    with page.expect_navigation():
        page.press("input[name=code]", "Enter")
    # The recovery codes page: one button to go on.
    with page.expect_navigation():
        page.locator("main form button, main a.button").last.click()
    return app


def second_factor(page: Any, app: Authenticator) -> None:
    assert "/login/second-factor" in page.url, page.url
    page.fill("input[name=code]", app.code())  # each code once: code() knows which is next
    with page.expect_navigation():
        page.press("input[name=code]", "Enter")


def canvas_digest(page: Any) -> str:
    """A digest of what the viewport canvas shows (a screenshot of that element only, so
    the overlay text does not count)."""
    return hashlib.sha256(page.locator(CANVAS).first.screenshot()).hexdigest()


def canvas_is_blank(page: Any) -> bool:
    from io import BytesIO

    from PIL import Image

    image = Image.open(BytesIO(page.locator(CANVAS).first.screenshot())).convert("L")
    low, high = cast(tuple[int, int], image.getextrema())  # one band ("L")
    return bool(high - low < 16)


def wait_for_image(page: Any, timeout: float = 90.0) -> None:
    """Until the viewport canvas shows something (OHIF paints black first). The budget
    covers the canvas appearing too (Playwright's own default is 30 s): with the suite's
    parallel workers, OHIF can take longer than that to start on a 2-core machine."""
    started = time.monotonic()
    page.locator(CANVAS).first.wait_for(state="visible", timeout=timeout * 1000)
    timeout = max(5.0, timeout - (time.monotonic() - started))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not canvas_is_blank(page):
            time.sleep(0.5)  # let progressive loading settle
            return
        time.sleep(0.25)
    raise AssertionError("the viewer never painted the image")


def wait_for_change(page: Any, before: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = canvas_digest(page)
        if now != before:
            return now
        time.sleep(0.2)
    raise AssertionError("the canvas did not change")
