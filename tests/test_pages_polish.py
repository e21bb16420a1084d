"""French done properly on pacsvault's pages, and the admin pages' polish (issue 20, items 2
and 8), in-process against a real vault (``local_web``, fake clock, one server per module):

* numbers, sizes, dates and times through the one filter set of every template: French
  ``10,5 Mo`` and ``11/01/2026 00:30`` in Europe/Paris, English ``10.5 MB`` and
  ``2026-01-11 00:30``; a real page (the users page's last sign-in) shows them so;
* the menu per role: no "Studies" link for an auditor or an administrator;
* the new user's one-time password after the sentence that introduces it;
* the TOTP secret in groups of four;
* recovery codes: a Print button (external script) and a text/plain download;
* a TLS node's certificate bundle: issued, downloaded once (a second download is refused),
  its certificates verify against the vault CA, its key matches.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterator

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlalchemy import select

from pacsvault.index.deployment_state import NodeBundleRow
from pacsvault.web import formats, pages
from tests.helpers import VaultDir, make_vault
from tests.test_web_pages import check_page
from tests.web_helpers import FakeClock, LocalWeb, csrf_of, local_web, page_csrf

PASSWORD = "stethoscope-sur-le-bureau-du-matin"
FRENCH = "fr-FR,fr;q=0.9"
ENGLISH = "en-US,en;q=0.9"
# 23:30 UTC on 10 January is 00:30 on the 11th in Paris (UTC+1 in winter).
SIGN_IN_AT = dt.datetime(2026, 1, 10, 23, 30, tzinfo=dt.UTC)
NARROW = "\u202f"


@pytest.fixture(scope="module")
def vault_dir(tmp_path_factory: pytest.TempPathFactory) -> VaultDir:
    return make_vault(tmp_path_factory.mktemp("polish") / "v")


@pytest.fixture(scope="module")
def web(vault_dir: VaultDir) -> Iterator[LocalWeb]:
    clock = FakeClock()
    clock.now = SIGN_IN_AT
    with local_web(vault_dir, clock) as running:
        running.accounts.add_user("ada", ["admin"], PASSWORD)
        running.accounts.add_user("otto", ["auditor"], PASSWORD)
        running.accounts.add_user("paula", ["physician"], PASSWORD)
        yield running


@pytest.fixture(scope="module")
def admin(web: LocalWeb) -> Iterator[httpx.Client]:
    with web.browser() as browser:
        web.sign_in(browser, "ada", PASSWORD)
        yield browser


def test_filters_format_numbers_sizes_and_times_per_language() -> None:
    source = "{{ s|size }}|{{ n|number }}|{{ t|when }}|{{ t|day }}|{{ b|size }}"
    values = {"s": 10_500_000, "n": 1_234_567, "t": SIGN_IN_AT, "b": 512,
              "tz": formats.zone("Europe/Paris")}
    fr = pages.environment("fr").from_string(source).render(lang="fr", **values)
    assert fr.replace(NARROW, " ").replace("\xa0", " ").split("|") == [
        "10,5 Mo", "1 234 567", "11/01/2026 00:30", "11/01/2026", "512 o"]
    assert NARROW in fr  # no plain space inside a number: it would break the line
    en = pages.environment("en").from_string(source).render(lang="en", **values)
    assert en.replace(NARROW, " ").split("|") == [
        "10.5 MB", "1,234,567", "2026-01-11 00:30", "2026-01-11", "512 B"]
    summer = pages.environment("fr").from_string("{{ t|when }}").render(
        lang="fr", t=dt.datetime(2026, 7, 14, 20, 5, tzinfo=dt.UTC))
    assert summer == "14/07/2026 22:05"  # 24-hour, UTC+2 in summer
    assert formats.groups("ABCDEFGHIJ") == "ABCD EFGH IJ"


def test_pages_show_local_times_in_the_readers_format(web: LocalWeb,
                                                      admin: httpx.Client) -> None:
    fr = admin.get("/admin/users", headers={"accept-language": FRENCH}).text
    assert "11/01/2026 00:30" in fr and "UTC" not in fr.split("<main", 1)[1]
    en = admin.get("/admin/users", headers={"accept-language": ENGLISH}).text
    assert "2026-01-11 00:30" in en and "11/01/2026" not in en


def _main_menu(html: str) -> str:
    found = re.search(r'<nav aria-label="[^"]+">(.*?)</nav>', html, re.S)
    assert found, html[:1500]
    return found.group(1)


def test_the_menu_offers_studies_to_physicians_only(web: LocalWeb,
                                                    admin: httpx.Client) -> None:
    assert 'href="/"' not in _main_menu(admin.get("/account").text)
    with web.browser() as auditor, web.browser() as physician:
        web.sign_in(auditor, "otto", PASSWORD)
        web.sign_in(physician, "paula", PASSWORD)
        assert 'href="/"' not in _main_menu(auditor.get("/account").text)
        assert 'href="/"' in _main_menu(physician.get("/account").text)


def test_new_users_password_comes_after_its_sentence(admin: httpx.Client) -> None:
    res = admin.post("/admin/users", data={"csrf": page_csrf(admin), "name": "nadia",
                                           "roles": "physician"},
                     headers={"accept-language": ENGLISH})
    assert res.status_code == 200, res.text
    sentence = res.text.index("User nadia was created.")
    secret = res.text.index('id="one-time-secret"')
    assert sentence < secret
    check_page(res.text, "new user")


def test_totp_secret_in_groups_of_four(web: LocalWeb) -> None:
    web.accounts.add_user("gus", ["physician"], PASSWORD)
    with web.browser() as browser:
        form = browser.get("/login")
        browser.post("/login", data={"csrf": csrf_of(form.text), "name": "gus",
                                     "password": PASSWORD})
        page = browser.get("/login/enrol").text
    found = re.search(r'id="totp-secret"[^>]*>([A-Z2-7 ]+)<', page)
    assert found, page
    groups = found.group(1).split(" ")
    assert len(groups) > 3 and all(len(g) == 4 for g in groups[:-1]) and len(groups[-1]) <= 4


def test_recovery_codes_print_and_download(admin: httpx.Client) -> None:
    page = admin.post("/account/recovery-codes", data={"csrf": page_csrf(admin)},
                      headers={"accept-language": FRENCH})
    assert page.status_code == 200, page.text
    codes = re.findall(r"<li><code>([0-9A-Z-]+)</code></li>", page.text)
    assert len(codes) >= 8
    assert "data-print" in page.text and '<script src="/static/print.js"' in page.text
    check_page(page.text, "recovery codes")
    script = admin.get("/static/print.js", headers={"accept": "*/*"})
    assert script.status_code == 200 and "window.print()" in script.text
    css = admin.get("/static/style.css", headers={"accept": "*/*"}).text
    assert "@media print" in css
    res = admin.post("/account/recovery-codes/download",
                     data={"csrf": csrf_of(page.text), "codes": codes})
    assert res.status_code == 200
    assert res.headers["content-type"].startswith("text/plain")
    assert res.headers["content-disposition"].startswith("attachment;")
    assert res.headers["cache-control"] == "no-store"
    assert all(code in res.text.splitlines() for code in codes)
    bad = admin.post("/account/recovery-codes/download",
                     data={"csrf": csrf_of(page.text), "codes": ["<script>"]})
    assert bad.status_code == 400


def test_tls_node_bundle_is_downloaded_once_and_verifies(web: LocalWeb,
                                                         admin: httpx.Client) -> None:
    web.vault.nodes.add("WORKSTATION", "127.0.0.1", 11112, tls=True, client_cert=True,
                        roles=("store", "retrieve"))
    edit = admin.get("/admin/nodes/edit", params={"ae": "WORKSTATION"})
    assert 'id="bundle-issue"' in edit.text
    check_page(edit.text, "node edit")
    issued = admin.post("/admin/nodes/certificate",
                        data={"csrf": csrf_of(edit.text), "ae_title": "WORKSTATION"})
    assert issued.status_code == 200 and 'id="bundle-download"' in issued.text
    with web.vault.sessions() as session:  # in the index: any instance delivers it
        pending = list(session.scalars(select(NodeBundleRow.body)))
    assert len(pending) == 1
    assert b"ENCRYPTED PRIVATE KEY" in pending[0]  # never plain at rest
    res = admin.post("/admin/nodes/certificate/download",
                     data={"csrf": csrf_of(issued.text), "ae_title": "WORKSTATION"})
    assert res.status_code == 200
    assert res.headers["content-disposition"].startswith("attachment;")
    ca = x509.load_pem_x509_certificate(web.vault.layout.tls.ca_cert.read_bytes())
    certs = x509.load_pem_x509_certificates(res.content)
    keys = [serialization.load_pem_private_key(block.encode(), None) for block in
            re.findall(r"-----BEGIN PRIVATE KEY-----.*?-----END PRIVATE KEY-----",
                       res.text, re.S)]
    assert certs[-1] == ca and len(certs) == 3 and len(keys) == 2  # client, listener, CA
    for cert, key in zip(certs[:2], keys, strict=True):
        cert.verify_directly_issued_by(ca)
        assert cert.public_key() == key.public_key()
    again = admin.post("/admin/nodes/certificate/download",
                       data={"csrf": csrf_of(issued.text), "ae_title": "WORKSTATION"})
    assert again.status_code == 410 and "BEGIN" not in again.text
    with web.vault.sessions() as session:
        assert not list(session.scalars(select(NodeBundleRow.body)))
    serials = {f"{c.serial_number:x}" for c in certs[:2]}
    client = certs[0]
    assert web.vault.nodes.certificate_status("WORKSTATION", client.serial_number) == "valid"
    assert len(serials) == 2


def test_every_alert_rule_has_a_translated_name() -> None:
    """A page shows a rule's name, never its code nor the English title (French pages)."""
    from pathlib import Path

    from pacsvault.audit import alerts
    from pacsvault.web import alert_names, i18n

    sources = "".join(p.read_text() for p in Path(alerts.__file__).parent.glob("*.py"))
    rules = set(re.findall(r'rule="([a-z-]+)"', sources)) - {"test"}
    assert rules and rules <= set(alert_names.RULES), rules - set(alert_names.RULES)
    fr = i18n.gettext_for("fr")
    assert alert_names.rule_name("failed-logins", "Failed logins", fr) == \
        "Échecs de connexion répétés"
    assert alert_names.rule_name("new-rule", "New rule", fr) == "New rule"
    assert alert_names.level_name("critical", fr) == "critique"
