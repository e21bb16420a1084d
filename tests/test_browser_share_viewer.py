"""A share link opened in a real Chromium (issue 19): the code, then OHIF on the one study.

The physician makes the link on the web page (httpx); a fresh browser with no account opens
it, types the code and lands in OHIF's viewer on the shared study's series, with a menu that
offers the share's download and sign-out and nothing of an account. The study's UID is put
in the address bar by the share session's configuration, client-side.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest

from tests import browser_data
from tests.browser import ErrorLog, chromium, new_page, wait_for_image
from tests.helpers import make_vault, start_server
from tests.web_helpers import client, page_csrf, sign_in

pytestmark = [pytest.mark.browser, pytest.mark.slow]

PHYSICIAN, PASSWORD = "drshare", "le phare de la pointe au lever du jour"
LINK_RE = re.compile(r'<code id="share-url">https://[^/]+/share/([A-Za-z0-9_-]+)</code>')
CODE_RE = re.compile(r'<code id="share-code" class="secret">([A-Z0-9-]+)</code>')


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, str, str]]:
    """(base URL, link id, code, study UID)."""
    root = tmp_path_factory.mktemp("share-viewer")
    vault = make_vault(root / "v")
    ct = browser_data.knee_ct(root / "ct", count=3, size=128)
    v = vault.open()
    try:
        v.accounts.add_user(PHYSICIAN, ["physician"], PASSWORD, by="test")
        for path in ct.files:
            v.archive.store(path.read_bytes(), source_ae="TEST")
    finally:
        v.close()
    server = start_server(vault)
    try:
        with client(server.https_port, vault.data / "tls" / "ca.crt") as doctor:
            sign_in(doctor, PHYSICIAN, PASSWORD)
            res = doctor.post("/account/shares", data={
                "csrf": page_csrf(doctor), "study": ct.study_uid, "days": "2", "download": "1"})
            link, code = LINK_RE.search(res.text), CODE_RE.search(res.text)
            assert res.status_code == 200 and link and code, res.text[:2000]
        yield f"https://localhost:{server.https_port}", link.group(1), code.group(1), ct.study_uid
    finally:
        server.stop()


def test_the_link_and_code_open_ohif_on_the_one_study(
        shared: tuple[str, str, str, str]) -> None:
    base, link, code, study = shared
    errors = ErrorLog()
    with chromium() as browser:
        page: Any = new_page(browser, errors=errors)
        page.goto(f"{base}/share/{link}")
        page.locator("#code").fill(code)
        page.locator("#code").press("Enter")
        page.wait_for_url(re.compile(r"/viewer\?StudyInstanceUIDs="))
        assert study in page.url  # client-side only: the server redirected to /viewer
        wait_for_image(page)
        page.get_by_text("GENOU DROIT").first.wait_for()  # the series, in OHIF's panel
        page.locator("[data-cy='pacsvault-menu']").first.click()
        items = page.locator("[data-cy='pacsvault-menu-items']")
        items.wait_for()
        assert items.locator("[data-cy='pacsvault-share-download']").count() == 1
        assert items.locator("[data-cy='pacsvault-sign-out']").count() == 1
        for absent in ("account", "admin", "media", "send", "share", "study-actions"):
            assert items.locator(f"[data-cy='pacsvault-{absent}']").count() == 0, absent
        # the study list is not there: any route is this study's viewer
        page.goto(base + "/")
        page.wait_for_url(re.compile(r"/viewer\?StudyInstanceUIDs="))
        wait_for_image(page)
        assert errors.entries == [], "\n".join(errors.entries)
