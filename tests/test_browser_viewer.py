"""The doctor's story in a real Chromium: sign in with password + TOTP, find the patient in
OHIF's study list, read a CT, a JPEG 2000 MR and a multi-frame US with scrolling and
window/level (the canvas pixels must change each time), every corpus transfer syntax
displays, no JavaScript error or CSP violation, French or English, physicians kept out of
administration, and an expired session that comes back to the same study after sign-in.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from tests import browser_data, corpus
from tests.browser import (
    CANVAS,
    ErrorLog,
    canvas_digest,
    first_sign_in,
    new_page,
    password_step,
    second_factor,
    shot,
    wait_for_change,
    wait_for_image,
)
from tests.browser import browser_fixture as browser_fixture  # fixture 'browser'
from tests.helpers import Server, VaultDir, make_vault, start_server, storescu
from tests.web_helpers import Authenticator, write_secret

pytestmark = [pytest.mark.browser, pytest.mark.slow]

DOCTOR, DOCTOR_PASSWORD = "drmartin", "genou droit et cheville gauche 1987"


@dataclass
class Site:
    vault: VaultDir
    server: Server
    base: str
    ct: browser_data.Series
    mr: browser_data.Series
    corpus: list[corpus.CorpusFile]


def _build_site(root: Path, *, idle_minutes: str | None = None) -> tuple[VaultDir, Server]:
    vault = make_vault(root)
    if idle_minutes is not None:
        vault.set_toml("web", "session_idle_minutes", idle_minutes)
    vault.add_node("MODALITY")
    secret = write_secret(root / "doctor.pw", DOCTOR_PASSWORD + "\n")
    vault.cli("user", "add", DOCTOR, "--role", "physician", "--password-file", secret)
    return vault, start_server(vault)


def _store(server: Server, files: list[Path], proposal: tuple[str, ...] = ()) -> None:
    result = storescu(server.port, files, calling="MODALITY", extra=proposal)
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("viewer")
    vault, server = _build_site(root)
    try:
        ct = browser_data.knee_ct(root / "ct")
        mr = browser_data.j2k_mr(root / "mr")
        files = corpus.build(root / "corpus")
        _store(server, ct.files)
        _store(server, mr.files, mr.proposal)
        for f in files:
            _store(server, [f.path], f.proposal)
        yield Site(vault, server, f"https://localhost:{server.https_port}", ct, mr, files)
    finally:
        server.stop()


@dataclass
class Doctor:
    page: Any
    app: Authenticator
    errors: ErrorLog


@pytest.fixture(scope="module")
def doctor(site: Site, browser: Any) -> Doctor:
    errors = ErrorLog()
    page = new_page(browser, locale="fr-FR", errors=errors)
    app = first_sign_in(page, site.base, DOCTOR, DOCTOR_PASSWORD)
    return Doctor(page, app, errors)


def _clean(errors: ErrorLog) -> None:
    assert errors.entries == [], "\n".join(errors.entries)


def _open_from_list(page: Any, base: str, patient: str) -> None:
    """What a doctor does: the study list, the patient's row, "Basic Viewer"."""
    if page.url.rstrip("/") != base:
        page.goto(base + "/")
    row = page.get_by_text(patient).first
    row.wait_for()
    row.click()
    with page.expect_navigation():
        page.locator("[data-cy^='mode-viewer-']").first.click()
    wait_for_image(page)


def _scroll(page: Any) -> None:
    box = page.locator(CANVAS).first.bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    for _ in range(3):
        page.mouse.wheel(0, 120)
        time.sleep(0.15)


def _window_level(page: Any) -> None:
    """Left-drag: OHIF's default primary tool is window/level."""
    box = page.locator(CANVAS).first.bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x + 120, y + 90, steps=12)
    page.mouse.up()


def _read_series(doctor: Doctor, base: str, patient: str, name: str, *,
                 url: str | None = None) -> None:
    page = doctor.page
    if url is None:
        _open_from_list(page, base, patient)
    else:
        page.goto(base + url)
        wait_for_image(page)
    first = canvas_digest(page)
    shot(page, f"{name}-1-opened")
    _scroll(page)
    scrolled = wait_for_change(page, first)
    shot(page, f"{name}-2-scrolled")
    _window_level(page)
    wait_for_change(page, scrolled)
    shot(page, f"{name}-3-window-level")


def test_doctor_signs_in_with_totp_and_finds_the_patient(site: Site, doctor: Doctor) -> None:
    page = doctor.page
    if page.url.rstrip("/") != site.base:
        page.goto(site.base + "/")
    page.get_by_text("Lefebvre").first.wait_for()
    assert page.get_by_text("Moreau").count() >= 1
    # The study list is OHIF's own, in French for a French browser (pacsvault's words).
    assert page.get_by_text("Liste des examens").count() >= 1
    shot(page, "study-list-fr")
    _clean(doctor.errors)


def test_ct_scroll_and_window_level_change_the_pixels(site: Site, doctor: Doctor) -> None:
    doctor.errors.clear()
    _read_series(doctor, site.base, "Lefebvre", "ct")
    _clean(doctor.errors)


def _drag(page: Any, dx: float, dy: float, start: tuple[float, float] = (0.5, 0.5)) -> None:
    box = page.locator(CANVAS).first.bounding_box()
    x = box["x"] + box["width"] * start[0]
    y = box["y"] + box["height"] * start[1]
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x + dx, y + dy, steps=10)
    page.mouse.up()


def test_ct_zoom_pan_and_length_measurement(site: Site, doctor: Doctor) -> None:
    """The other tools a radiologist expects, from OHIF's toolbar."""
    page = doctor.page
    doctor.errors.clear()
    _open_from_list(page, site.base, "Lefebvre")
    before = canvas_digest(page)
    page.locator("[data-cy='Zoom']").first.click()
    _drag(page, 0, -120)
    zoomed = wait_for_change(page, before)
    page.locator("[data-cy='Pan']").first.click()
    _drag(page, 90, 40)
    wait_for_change(page, zoomed)
    shot(page, "ct-4-zoom-pan")
    page.locator("[data-cy='MeasurementTools-split-button-primary']").first.click()
    _drag(page, 120, 0, start=(0.4, 0.5))
    # The length is drawn as an annotation over the image, with its value in mm.
    page.locator("[data-annotation-uid]").first.wait_for()
    assert page.get_by_text("mm").count() >= 1
    shot(page, "ct-5-length")
    _clean(doctor.errors)


def test_jpeg2000_mr_scroll_and_window_level(site: Site, doctor: Doctor) -> None:
    doctor.errors.clear()
    _read_series(doctor, site.base, "Moreau", "mr-j2k")
    _clean(doctor.errors)


def test_multiframe_us_scroll_and_window_level(site: Site, doctor: Doctor) -> None:
    us = next(f for f in site.corpus if "examples_ybr_color" in f.path.name)
    doctor.errors.clear()
    _read_series(doctor, site.base, us.patient_name, "us-multiframe",
                 url=f"/viewer?StudyInstanceUIDs={us.study_uid}")
    _clean(doctor.errors)


def test_every_corpus_transfer_syntax_displays(site: Site, doctor: Doctor) -> None:
    page = doctor.page
    doctor.errors.clear()
    failed = []
    for f in site.corpus:
        page.goto(f"{site.base}/viewer?StudyInstanceUIDs={f.study_uid}")
        try:
            wait_for_image(page)
        except Exception:  # collect every failure, then report them all
            shot(page, f"corpus-FAILED-{f.path.stem}")
            failed.append(f"{f.path.name} ({f.transfer_syntax})")
            continue
        shot(page, f"corpus-{f.path.stem}")
    assert failed == [], f"not displayed: {failed}"
    _clean(doctor.errors)


def test_no_patient_data_in_the_server_log(site: Site, doctor: Doctor) -> None:
    # OHIF's searches carry patient names and IDs in their query strings: none may reach
    # the log (no access log; errors never quote a request).
    log = site.server.log()
    assert "dicom-web" not in log
    for secret in [*corpus.secrets_of(site.corpus), "Lefebvre", "PVKNEE001", "Moreau",
                   "PVKNEE002"]:
        assert secret not in log, secret


def test_physician_cannot_open_admin_pages(site: Site, doctor: Doctor) -> None:
    for path in ("/admin/users", "/admin/nodes", "/admin/health"):
        response = doctor.page.goto(site.base + path)
        assert response is not None and response.status == 403, path
    shot(doctor.page, "physician-admin-refused")


def test_english_browser_gets_english(site: Site, browser: Any, doctor: Doctor) -> None:
    errors = ErrorLog()
    page = new_page(browser, locale="en-US", errors=errors)
    page.goto(site.base + "/")
    assert page.locator("html").get_attribute("lang") == "en"
    shot(page, "login-en")
    password_step(page, site.base, DOCTOR, DOCTOR_PASSWORD)
    second_factor(page, doctor.app)
    if page.url.rstrip("/") != site.base:
        page.goto(site.base + "/")
    page.get_by_text("Study List").first.wait_for()
    assert page.get_by_text("Liste des examens").count() == 0
    shot(page, "study-list-en")
    page.context.close()
    _clean(errors)


def test_french_browser_gets_french_sign_in(site: Site, browser: Any) -> None:
    errors = ErrorLog()
    page = new_page(browser, locale="fr-FR", errors=errors)
    page.goto(site.base + "/")
    assert "/login" in page.url
    assert page.locator("html").get_attribute("lang") == "fr"
    assert page.get_by_role("button", name="Connexion").count() == 1
    shot(page, "login-fr")
    page.context.close()
    _clean(errors)


# --- an expiring session: back to sign-in, then back to the same study -----------------


def test_expired_session_returns_to_the_study_after_sign_in(
        tmp_path: Path, browser: Any) -> None:
    # 0.1 minute of inactivity ends a session: the viewer must send the doctor to the
    # sign-in page and, after it, back to the study that was open.
    _, server = _build_site(tmp_path / "expiring", idle_minutes="0.1")
    try:
        ct = browser_data.knee_ct(tmp_path / "ct", count=4, size=128)
        _store(server, ct.files)
        base = f"https://localhost:{server.https_port}"
        errors = ErrorLog()
        page = new_page(browser, locale="fr-FR", errors=errors)
        app = first_sign_in(page, base, DOCTOR, DOCTOR_PASSWORD)
        study = f"/viewer?StudyInstanceUIDs={ct.study_uid}"
        page.goto(base + study)
        wait_for_image(page)

        time.sleep(7)  # the session expires on the server
        # A request OHIF makes (a search) gets 401: the page goes to sign-in with `next`.
        with page.expect_navigation():
            page.evaluate("fetch('/dicom-web/studies')")
        assert page.url == f"{base}/login?next={quote(study, safe='')}", page.url
        shot(page, "expired-to-sign-in")
        page.fill("input[name=name]", DOCTOR)
        page.fill("input[name=password]", DOCTOR_PASSWORD)
        with page.expect_navigation():
            page.press("input[name=password]", "Enter")
        second_factor(page, app)
        assert page.url == base + study, page.url
        wait_for_image(page)
        shot(page, "expired-back-to-study")

        time.sleep(7)  # again, now coming back to the tab by reloading it
        page.reload()
        assert page.url == f"{base}/login?next={quote(study, safe='')}", page.url
        # The 401s above are what the test provoked; nothing else may have failed.
        assert [e for e in errors.entries if "401" not in e] == []
        page.context.close()
    finally:
        server.stop()
