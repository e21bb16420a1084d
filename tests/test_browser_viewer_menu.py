"""pacsvault inside OHIF, in a real Chromium (issue 20, items 1 and 2 for the viewer).

The practice's name instead of OHIF's logo, the pacsvault menu in OHIF's header (language
switch that changes OHIF and pacsvault's pages alike, sign-out that ends the server-side
session, so a doctor can leave a shared reception PC), only the modes a practice uses, and
OHIF's study list in a French practice's words ("IPP", "N° d’accès", DD/MM/YYYY, 24-hour).
One server, one browser, one signed-in doctor for the module; sign-out comes last.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pydicom
import pytest

from tests import browser_data
from tests.browser import ErrorLog, first_sign_in, new_page, shot, wait_for_image
from tests.browser import browser_fixture as browser_fixture  # fixture 'browser'
from tests.helpers import Server, make_vault, start_server, storescu
from tests.web_helpers import write_secret

pytestmark = [pytest.mark.browser, pytest.mark.slow]

DOCTOR, DOCTOR_PASSWORD = "drbernard", "la mer est calme au petit matin 1984"
PRACTICE = "Cabinet d’imagerie du Parc"
# The basic viewer's route name; every hidden mode's (TMTV, microscopy, preclinical 4D,
# US pleura, segmentation, OHIF's non-longitudinal basic).
SHOWN = "viewer"
ACTIONS = "pacsvault-study-actions"  # pacsvault's study actions, a "mode" of the list
HIDDEN = ("tmtv", "microscopy", "dynamic-volume", "usAnnotation", "segmentation", "basic")


@dataclass
class Site:
    server: Server
    base: str
    study: str


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("viewer-menu")
    vault = make_vault(root)
    vault.set_toml("web", "practice_name", '"Cabinet d’imagerie du Parc"')
    vault.add_node("MODALITY")
    # A workstation the study may be sent to (the send page's form needs one; not used).
    vault.add_node("WORKSTATION", "--port", "11119", "--roles", "store,retrieve")
    secret = write_secret(root / "doctor.pw", DOCTOR_PASSWORD + "\n")
    vault.cli("user", "add", DOCTOR, "--role", "physician", "--password-file", secret)
    server = start_server(vault)
    try:
        ct = browser_data.knee_ct(root / "ct", count=4, size=128)
        for path in ct.files:  # an afternoon study: 24-hour time is visible
            ds = pydicom.dcmread(path)
            ds.StudyTime = "143000"
            ds.save_as(path)
        result = storescu(server.port, ct.files, calling="MODALITY")
        assert result.returncode == 0, result.stderr
        study = str(pydicom.dcmread(ct.files[0]).StudyInstanceUID)
        yield Site(server, f"https://localhost:{server.https_port}", study)
    finally:
        server.stop()


@dataclass
class Doctor:
    page: Any
    errors: ErrorLog


@pytest.fixture(scope="module")
def doctor(site: Site, browser: Any) -> Doctor:
    errors = ErrorLog()
    page = new_page(browser, locale="fr-FR", errors=errors)
    first_sign_in(page, site.base, DOCTOR, DOCTOR_PASSWORD)
    return Doctor(page, errors)


def _study_list(page: Any, base: str) -> None:
    page.goto(base + "/")
    page.get_by_text("Lefebvre").first.wait_for()


def _menu(page: Any) -> Any:
    page.locator("[data-cy='pacsvault-menu']").first.click()
    items = page.locator("[data-cy='pacsvault-menu-items']")
    items.wait_for()
    return items


def _clean(errors: ErrorLog) -> None:
    assert errors.entries == [], "\n".join(errors.entries)


def test_practice_name_and_french_study_list(site: Site, doctor: Doctor) -> None:
    page = doctor.page
    _study_list(page, site.base)
    assert page.locator("[data-cy='pacsvault-practice']").inner_text() == PRACTICE
    assert page.title() == PRACTICE
    # OHIF's own French, with pacsvault's words for a French practice.
    page.get_by_text("IPP", exact=True).first.wait_for()
    assert page.get_by_text("N° d’accès", exact=True).count() >= 1
    assert page.get_by_text("Numéro DSN").count() == 0
    row = page.locator(f"[data-cy='studyRow-{site.study}']").first.inner_text()
    today = dt.date.today().strftime("%d/%m/%Y")
    assert today in row and "14:30" in row, row
    assert not re.search(r"\b(AM|PM)\b", row), row
    # The menu of a physician: no administration.
    items = _menu(page)
    assert items.locator("[data-cy='pacsvault-account']").count() == 1
    assert items.locator("[data-cy='pacsvault-admin']").count() == 0
    assert "Déconnexion" in items.inner_text()
    shot(page, "ohif-menu-fr")
    page.keyboard.press("Escape")
    _clean(doctor.errors)


def test_only_the_practice_modes_are_offered(site: Site, doctor: Doctor) -> None:
    page = doctor.page
    _study_list(page, site.base)
    page.get_by_text("Lefebvre").first.click()
    buttons = page.locator("[data-cy^='mode-']")
    buttons.first.wait_for()
    cy = [str(b.get_attribute("data-cy")) for b in buttons.all()]
    # pacsvault's study actions (patient CD, send, share) are a "mode" button too.
    assert all(c in (f"mode-{SHOWN}-{site.study}", f"mode-{ACTIONS}-{site.study}")
               for c in cy), cy
    assert cy[0] == f"mode-{SHOWN}-{site.study}", cy  # viewing first, then the actions
    assert not any(f"mode-{h}-" in c for c in cy for h in HIDDEN), cy
    assert page.get_by_text("Visionneuse de base").count() >= 1
    _clean(doctor.errors)


def test_language_switch_from_ohif_changes_ohif_and_pacsvault(site: Site,
                                                               doctor: Doctor) -> None:
    page = doctor.page
    _study_list(page, site.base)
    with page.expect_navigation():
        _menu(page).locator("[data-cy='pacsvault-language-en']").click()
    page.get_by_text("Lefebvre").first.wait_for()
    page.get_by_text("Study List", exact=True).first.wait_for()
    assert page.get_by_text("IPP", exact=True).count() == 0
    assert "Sign out" in _menu(page).inner_text()
    page.keyboard.press("Escape")
    page.goto(site.base + "/account")
    assert page.locator("html").get_attribute("lang") == "en"
    # And back to French, from inside the viewer this time.
    page.goto(f"{site.base}/viewer?StudyInstanceUIDs={site.study}")
    wait_for_image(page)
    with page.expect_navigation():
        _menu(page).locator("[data-cy='pacsvault-language-fr']").click()
    wait_for_image(page)
    assert "Déconnexion" in _menu(page).inner_text()
    page.keyboard.press("Escape")
    page.goto(site.base + "/account")
    assert page.locator("html").get_attribute("lang") == "fr"
    _study_list(page, site.base)
    page.get_by_text("IPP", exact=True).first.wait_for()
    _clean(doctor.errors)


def test_ohif_preferences_offer_our_languages_and_change_the_account(site: Site,
                                                                    doctor: Doctor) -> None:
    """OHIF's own Preferences dialog: only pacsvault's two languages, and a choice there
    is the account's choice (pacsvault's pages follow)."""
    page = doctor.page
    _study_list(page, site.base)
    page.locator("button.mt-2.h-full.w-full.text-primary").first.click()
    page.get_by_role("menuitem", name="Préférences").click()
    page.locator("[aria-label='Language']").first.click()
    options = page.get_by_role("option")
    options.first.wait_for()
    assert options.count() == 2, options.all_inner_texts()
    texts = options.all_inner_texts()
    english = [t for t in texts if not re.search(r"fran", t, re.I)]
    assert len(english) == 1, texts
    options.filter(has_text=english[0]).first.click()
    with page.expect_navigation():
        page.get_by_role("button", name="Enregistrer").first.click()
    page.get_by_text("Study List", exact=True).first.wait_for()
    page.goto(site.base + "/account")
    assert page.locator("html").get_attribute("lang") == "en"
    _study_list(page, site.base)
    with page.expect_navigation():
        _menu(page).locator("[data-cy='pacsvault-language-fr']").click()
    page.get_by_text("IPP", exact=True).first.wait_for()
    _clean(doctor.errors)


def _viewer(page: Any, site: Site) -> None:
    page.goto(f"{site.base}/viewer?StudyInstanceUIDs={site.study}")
    wait_for_image(page)


def test_viewer_menu_opens_the_study_actions_with_the_open_study(site: Site,
                                                                 doctor: Doctor) -> None:
    """From the viewer: the patient CD page and the send page, the open study filled in,
    the study posted (never in the URL)."""
    page = doctor.page
    for action, field in (("media", "#media-study"), ("send", "#send-study")):
        _viewer(page, site)
        with page.expect_navigation():
            _menu(page).locator(f"[data-cy='pacsvault-{action}']").click()
        assert page.url.endswith("/account/studies/open"), page.url
        assert page.locator(field).input_value() == site.study
    _clean(doctor.errors)


def test_study_list_offers_the_actions_of_one_study(site: Site, doctor: Doctor) -> None:
    """From OHIF's study list: its menu's "Study actions" lists the recent studies, whose
    "Share…" opens the share page with the study filled in; a study's own "Download,
    send, share…" button leads to that study's actions, and Back to the study list."""
    page = doctor.page
    _study_list(page, site.base)
    with page.expect_navigation():
        _menu(page).locator("[data-cy='pacsvault-study-actions']").click()
    row = page.locator(f"#study-actions tr[data-study='{site.study}']")
    assert row.count() == 1 and "Lefebvre" in row.inner_text()
    with page.expect_navigation():
        row.locator("button[data-action='share']").click()
    assert page.locator("#share-study").input_value() == site.study
    _study_list(page, site.base)
    page.get_by_text("Lefebvre").first.click()
    with page.expect_navigation():
        page.locator(f"[data-cy='mode-{ACTIONS}-{site.study}']").first.click()
    page.wait_for_url(re.compile(r"/account/studies$"))
    rows = page.locator("#study-actions tbody tr")
    assert rows.count() == 1 and rows.first.get_attribute("data-study") == site.study
    page.go_back()
    page.wait_for_url(site.base + "/")
    page.get_by_text("Lefebvre").first.wait_for()
    _clean(doctor.errors)


def test_sign_out_from_the_viewer_ends_the_session(site: Site, doctor: Doctor,
                                                   browser: Any) -> None:
    page = doctor.page
    page.goto(f"{site.base}/viewer?StudyInstanceUIDs={site.study}")
    wait_for_image(page)
    # The viewer's side panel speaks of "examens" too.
    page.get_by_text("Examens", exact=True).first.wait_for()
    assert page.get_by_text("Études", exact=True).count() == 0
    cookies = page.context.cookies()
    menu = _menu(page)
    shot(page, "ohif-viewer-menu-fr")
    with page.expect_navigation():
        menu.locator("[data-cy='pacsvault-sign-out']").click()
    page.wait_for_url(re.compile(r"/login"))
    assert "/login" in page.url
    # The old session cookie, replayed from elsewhere, is refused: the server ended it.
    other = browser.new_context(ignore_https_errors=True)
    try:
        other.add_cookies(cookies)
        answer = other.request.get(site.base + "/dicom-web/studies", max_redirects=0)
        assert answer.status == 401, answer.status
    finally:
        other.close()
    _clean(doctor.errors)
