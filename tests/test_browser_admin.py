"""The practice's admin in a real Chromium: adds a colleague and registers a new ultrasound
unit from the pages (the unit can send at once with dcmtk's storescu), the colleague signs
in with the keyboard only on a tablet-sized screen and registers a passkey (Chromium's
virtual authenticator) that then replaces the code at sign-in. No page scrolls sideways on
a 10-inch tablet, and no JavaScript error or CSP violation happens on the way.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests import corpus
from tests.browser import (
    ErrorLog,
    first_sign_in,
    new_page,
    password_step,
    shot,
)
from tests.browser import browser_fixture as browser_fixture  # fixture 'browser'
from tests.helpers import Server, VaultDir, echoscu, events, make_vault, start_server, storescu

pytestmark = [pytest.mark.browser, pytest.mark.slow]

TABLET_PORTRAIT, TABLET_LANDSCAPE = (800, 1280), (1280, 800)


@dataclass
class Site:
    vault: VaultDir
    server: Server
    base: str


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    vault = make_vault(tmp_path_factory.mktemp("admin"))
    server = start_server(vault)
    try:
        yield Site(vault, server, f"https://localhost:{server.https_port}")
    finally:
        server.stop()


@dataclass
class AdminSession:
    """The admin's signed-in page (shared by the module's tests) and where sign-in landed,
    recorded before any test moves the page elsewhere."""

    page: Any
    errors: ErrorLog
    landed: str


@pytest.fixture(scope="module")
def admin_session(site: Site, browser: Any) -> Iterator[AdminSession]:
    errors = ErrorLog()
    page = new_page(browser, locale="fr-FR", errors=errors, viewport=TABLET_LANDSCAPE)
    first_sign_in(page, site.base, "admin", site.vault.admin_password)
    yield AdminSession(page, errors, page.url)
    page.context.close()


@dataclass(frozen=True)
class Colleague:
    """What the admin made from the pages: a physician colleague and an ultrasound unit
    (``ECHO_SALLE2``) that has sent one multi-frame US."""

    name: str
    password: str


def _no_sideways_scroll(page: Any) -> None:
    width = page.evaluate("document.documentElement.scrollWidth")
    inner = page.evaluate("window.innerWidth")
    assert width <= inner, f"{page.url} scrolls sideways ({width} > {inner})"


@pytest.fixture(scope="module")
def colleague(site: Site, admin_session: AdminSession,
              tmp_path_factory: pytest.TempPathFactory) -> Colleague:
    """The admin adds a colleague and an ultrasound unit from the pages, and the unit sends
    at once. A fixture, so each test that needs them gets them whatever ran before."""
    page, errors = admin_session.page, admin_session.errors
    page.goto(site.base + "/admin/users")
    _no_sideways_scroll(page)
    form = page.locator("form#add-user")
    form.locator("input[name=name]").fill("drdupont")
    form.locator("input[name=roles][value=physician]").check()
    with page.expect_navigation():
        form.locator("button[type=submit]").click()
    password = page.locator("#one-time-secret").inner_text().strip()
    assert len(password) >= 12
    shot(page, "admin-user-added")

    page.goto(site.base + "/admin/nodes")
    form = page.locator("form#add-node")
    form.locator("input[name=ae_title]").fill("ECHO_SALLE2")
    form.locator("input[name=host]").fill("127.0.0.1")
    form.locator("input[name=roles][value=store]").check()
    with page.expect_navigation():
        form.locator("button[type=submit]").click()
    assert page.get_by_text("ECHO_SALLE2").count() >= 1
    shot(page, "admin-node-added")
    _no_sideways_scroll(page)

    # The new unit sends at once: no restart, no config file.
    tmp = tmp_path_factory.mktemp("admin-corpus")
    us = next(f for f in corpus.build(tmp / "corpus") if "examples_ybr" in f.path.name)
    assert echoscu(site.server.port, calling="ECHO_SALLE2").returncode == 0
    result = storescu(site.server.port, [us.path], calling="ECHO_SALLE2", extra=us.proposal)
    assert result.returncode == 0, result.stderr
    assert errors.entries == []
    return Colleague("drdupont", password)


def test_admin_lands_on_the_health_panel(site: Site, admin_session: AdminSession) -> None:
    page, errors = admin_session.page, admin_session.errors
    # An admin without the physician role has no study list: the health panel instead.
    assert admin_session.landed.endswith("/admin/health"), admin_session.landed
    if page.url != admin_session.landed:  # another test moved the shared page on
        page.goto(admin_session.landed)
    assert page.locator("html").get_attribute("lang") == "fr"
    # issue 20 item 7: a problem forced by a fresh vault (no backup target) is a banner
    # in French with what to do, and the activity charts are drawn (SVG, no script)
    banner = page.locator("#problems [data-code='backup.none']")
    assert banner.is_visible() and "Que faire" in banner.inner_text()
    assert page.locator("svg#chart-received g.bar").count() == 90
    assert page.locator("svg#chart-received").bounding_box()["height"] > 50
    shot(page, "admin-health")
    _no_sideways_scroll(page)
    assert errors.entries == []


def test_admin_adds_a_colleague_and_an_ultrasound_unit(
        site: Site, admin_session: AdminSession, colleague: Colleague) -> None:
    assert colleague.name == "drdupont" and len(colleague.password) >= 12
    assert [e["user"] for e in events(site.vault, "node.add")] == ["admin"]
    assert admin_session.errors.entries == []


def test_colleague_signs_in_with_the_keyboard_on_a_tablet_and_adds_a_passkey(
        site: Site, browser: Any, colleague: Colleague) -> None:
    name, password = colleague.name, colleague.password
    errors = ErrorLog()
    page = new_page(browser, locale="fr-FR", errors=errors, viewport=TABLET_PORTRAIT)
    cdp = page.context.new_cdp_session(page)
    cdp.send("WebAuthn.enable")
    cdp.send("WebAuthn.addVirtualAuthenticator", {"options": {
        "protocol": "ctap2", "transport": "internal", "hasResidentKey": True,
        "hasUserVerification": True, "isUserVerified": True,
        "automaticPresenceSimulation": True,
    }})

    # Keyboard only: Tab to the user name, type, Tab, type, Enter.
    page.goto(site.base + "/")
    _no_sideways_scroll(page)
    for _ in range(12):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement && document.activeElement.name") == "name":
            break
    else:
        raise AssertionError("the user name field cannot be reached with Tab")
    page.keyboard.type(name)
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.name") == "password"
    page.keyboard.type(password)
    with page.expect_navigation():
        page.keyboard.press("Enter")
    assert "/login/enrol" in page.url, page.url
    shot(page, "tablet-enrol")
    _no_sideways_scroll(page)
    page.goto(site.base + "/login")  # start again with the app instead (first_sign_in)
    page.context.clear_cookies()
    first_sign_in(page, site.base, name, password)

    # The study list shows the ultrasound the new unit just sent.
    page.goto(site.base + "/")
    page.get_by_text("Quetzal").first.wait_for()
    shot(page, "tablet-study-list")

    # A passkey from the account page (passkey.js in a real browser).
    page.goto(site.base + "/account")
    _no_sideways_scroll(page)
    page.locator("#passkey-label").fill("tablette")
    page.locator("#passkey-create").click()
    page.get_by_text("tablette").first.wait_for()
    shot(page, "account-passkey-added")

    # Sign out, then in with password + passkey instead of the code.
    with page.expect_navigation():
        page.locator("form[action='/logout'] button").first.click()
    password_step(page, site.base, name, password)
    assert "/login/second-factor" in page.url, page.url
    with page.expect_navigation():
        page.locator("#passkey-get").click()
    assert page.url.rstrip("/") == site.base, page.url
    page.get_by_text("Quetzal").first.wait_for()
    sign_ins = [e for e in events(site.vault, "auth.login") if e["user"] == name]
    assert len(sign_ins) == 2, sign_ins  # with the app, then with the passkey
    assert errors.entries == []
    page.context.close()
