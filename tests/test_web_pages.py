"""pacsvault's own pages: languages, where sign-in leads, first-sign-in passkey enrolment,
user roles, DICOM devices, the health panel, and what every page is made of
(labels, skip link, viewport, no inline script or style).

* Against the real ``pacsvault serve`` (module fixture ``served``): a DICOM device added
  through the page sends at once (dcmtk ``echoscu``/``storescu``), then edited and removed
  with the same events as ``pacsvault node``; the health panel shows the live listeners,
  the counts, the certificates, the audit chain and the exposure of an untrusted source.
* In-process (``local_web``, fake clock): languages, ``next``, passkey enrolment.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import pytest

from pacsvault.web import i18n
from pacsvault.web.ui import safe_next
from tests.corpus import synthetic_ct_series
from tests.helpers import Server, VaultDir, echoscu, events, make_vault, start_server, storescu
from tests.test_passkeys import SoftAuthenticator, json_post, origin_of
from tests.web_helpers import (
    FakeClock,
    LocalWeb,
    client,
    csrf_of,
    local_web,
    page_csrf,
    recovery_codes_of,
    sign_in,
)

PHYSICIAN = ("drmartin", "stethoscope-sur-le-bureau-du-matin")
FRENCH = "fr-FR,fr;q=0.9,en;q=0.5"
ENGLISH = "en-US,en;q=0.9"


# --- the real server ---------------------------------------------------------------------


@dataclass
class Served:
    server: Server
    vault: VaultDir
    admin: httpx.Client
    physician: httpx.Client

    def browser(self, local_address: str | None = None,
                headers: dict[str, str] | None = None) -> httpx.Client:
        return client(self.server.https_port, self.vault.data / "tls" / "ca.crt",
                      local_address=local_address, headers=headers)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    vault = make_vault(tmp_path_factory.mktemp("webpages") / "v")
    vault.set_toml("dicom", "trusted_networks", '["127.0.0.1/32"]')  # 127.0.0.2 is outside
    v = vault.open()
    try:
        v.accounts.add_user(PHYSICIAN[0], ["physician"], PHYSICIAN[1], by="test")
    finally:
        v.close()
    server = start_server(vault)
    ca = vault.data / "tls" / "ca.crt"
    admin = client(server.https_port, ca)
    physician = client(server.https_port, ca)
    try:
        sign_in(admin, "admin", vault.admin_password)
        sign_in(physician, *PHYSICIAN)
        yield Served(server, vault, admin, physician)
    finally:
        admin.close()
        physician.close()
        server.stop()


ADMIN_PAGES = ("/admin/users", "/admin/nodes", "/admin/health")


def test_physicians_get_403_on_administration(served: Served) -> None:
    csrf = page_csrf(served.physician)
    for path in ADMIN_PAGES:
        res = served.physician.get(path)
        assert res.status_code == 403, path
        assert "/admin/users" not in res.text  # no Administration link for them
    for path, data in (("/admin/nodes", {"ae_title": "EVIL", "host": "127.0.0.1",
                                         "roles": "store"}),
                       ("/admin/nodes/remove", {"ae_title": "EVIL"}),
                       ("/admin/users/admin/roles", {"roles": "physician"})):
        res = served.physician.post(path, data={"csrf": csrf, **data})
        assert res.status_code == 403, path
    page = served.physician.get("/account").text
    nav = page.split('<nav aria-label="Main menu">')[1].split("</nav>")[0]
    assert 'href="/"' in nav and 'href="/account"' in nav and 'action="/logout"' in nav
    assert "/admin/" not in nav and "/audit" not in nav
    admin_nav = served.admin.get("/account").text.split("</nav>")[0]
    assert 'href="/admin/users"' in admin_nav


def test_a_device_added_on_the_page_sends_at_once(served: Served, tmp_path: Path) -> None:
    admin = served.admin
    page = admin.get("/admin/nodes")
    assert page.status_code == 200 and "No device is registered" in page.text
    csrf = csrf_of(page.text)

    # Field errors: said next to the field, linked to it, nothing registered.
    bad: list[tuple[dict[str, Any], str, str]] = [
        ({"ae_title": "", "host": "127.0.0.1"}, "ae_title", "Enter the device"),
        ({"ae_title": "A" * 17, "host": "127.0.0.1"}, "ae_title", "at most 16"),
        ({"ae_title": "BAD\\AE", "host": "127.0.0.1"}, "ae_title", "backslash"),
        ({"ae_title": "ÉCHO", "host": "127.0.0.1"}, "ae_title", "ASCII"),
        ({"ae_title": "US1", "host": ""}, "host", "IP address or host name"),
        ({"ae_title": "US1", "host": "bad host!"}, "host", "Enter an IP address"),
        ({"ae_title": "US1", "host": "127.0.0.1", "port": "70000"}, "port", "1 to 65535"),
        ({"ae_title": "US1", "host": "127.0.0.1", "roles": ["retrieve"]}, "port",
         "its own DICOM port"),
        ({"ae_title": "US1", "host": "127.0.0.1", "roles": []}, "roles", "at least one"),
    ]
    for data, field, text in bad:
        form = {"csrf": csrf, "roles": ["store"], **data}
        res = admin.post("/admin/nodes", data=form)
        assert res.status_code == 400, data
        error = re.search(rf'<p id="{field}-error" class="field-error">([^<]*)</p>', res.text)
        assert error and text in error.group(1).replace("&#39;", "'"), (data, res.text[-3000:])
        assert f'{field}-error"' in res.text and 'aria-invalid="true"' in res.text
        if field != "roles":
            described = re.search(rf'<input id="{field}"[^>]*aria-describedby="([^"]*)"',
                                  res.text)
            assert described and f"{field}-error" in described.group(1).split(), data
    assert "No device is registered" in admin.get("/admin/nodes").text

    # Registered through the page: C-ECHO and C-STORE work at once, on the running server.
    res = admin.post("/admin/nodes", data={"csrf": csrf, "ae_title": "WEB_US",
                                           "host": "127.0.0.1", "roles": ["store"]})
    assert res.status_code == 303, res.text
    listed: Any = admin.get(res.headers["location"])
    assert "WEB_US" in listed.text and "may send now" in listed.text
    duplicate = admin.post("/admin/nodes", data={"csrf": csrf, "ae_title": "WEB_US",
                                                 "host": "127.0.0.1", "roles": ["store"]})
    assert duplicate.status_code == 400 and "already registered" in duplicate.text
    echo = echoscu(served.server.port, calling="WEB_US")
    assert echo.returncode == 0, echo.stdout + echo.stderr
    files = synthetic_ct_series(tmp_path, 2)
    sent = storescu(served.server.port, files, calling="WEB_US")
    assert sent.returncode == 0, sent.stdout + sent.stderr
    stored = [e for e in events(served.vault, "dicom.store.association")
              if e["ae"] == "WEB_US"]
    assert stored and stored[-1]["outcome"] == "success", stored

    # Edited: TLS only now, so the plain port refuses it; the page shows the change.
    edit = admin.get("/admin/nodes/edit", params={"ae": "WEB_US"})
    assert edit.status_code == 200 and 'value="WEB_US"' in edit.text
    res = admin.post("/admin/nodes/edit", data={"csrf": csrf, "ae_title": "WEB_US",
                                                "host": "127.0.0.1", "port": "11119",
                                                "tls": "1", "roles": ["store", "query"]})
    assert res.status_code == 303, res.text
    listed = admin.get("/admin/nodes").text
    assert "11119" in listed and "search (query)" in listed
    refused = echoscu(served.server.port, calling="WEB_US")
    assert refused.returncode != 0
    # the port can be emptied again (no retrieve role)
    res = admin.post("/admin/nodes/edit", data={"csrf": csrf, "ae_title": "WEB_US",
                                                "host": "127.0.0.1", "port": "",
                                                "roles": ["store"]})
    assert res.status_code == 303
    assert "11119" not in admin.get("/admin/nodes").text
    assert echoscu(served.server.port, calling="WEB_US").returncode == 0
    assert admin.get("/admin/nodes/edit", params={"ae": "NOPE"}).status_code == 404

    # Removed: refused at once.
    res = admin.post("/admin/nodes/remove", data={"csrf": csrf, "ae_title": "WEB_US"})
    assert res.status_code == 303
    assert "can no longer connect" in admin.get(res.headers["location"]).text
    assert echoscu(served.server.port, calling="WEB_US").returncode != 0
    assert admin.post("/admin/nodes/remove",
                      data={"csrf": csrf, "ae_title": "WEB_US"}).status_code == 404
    # CSRF as everywhere
    assert admin.post("/admin/nodes/remove", data={"ae_title": "X"}).status_code == 403

    # The same events as the command line, with the admin as actor.
    changes = [e for e in events(served.vault) if str(e["action"]).startswith("node.")]
    assert [(e["action"], e["node"], e["user"], e["address"], e["code"]) for e in changes] == [
        ("node.add", "WEB_US", "admin", "127.0.0.1", "110113"),
        ("node.set", "WEB_US", "admin", "127.0.0.1", "110113"),
        ("node.set", "WEB_US", "admin", "127.0.0.1", "110113"),
        ("node.remove", "WEB_US", "admin", "127.0.0.1", "110113"),
    ]
    assert changes[0]["roles"] == "store" and changes[1]["roles"] == "store,query"
    assert changes[1]["tls"] is True


def test_health_panel(served: Served) -> None:
    # an exposure: a source outside the trusted networks
    with served.browser(local_address="127.0.0.2") as outsider:
        assert outsider.get("/login").status_code == 403
    page = served.admin.get("/admin/health")
    assert page.status_code == 200, page.text
    text = page.text
    listeners = text.split('id="listeners"')[1].split("</table>")[0]
    for port in (served.server.port, served.server.tls_port, served.server.https_port):
        assert f"<td>{port}</td>" in listeners
    assert listeners.count(">up<") == 3, listeners
    counts = text.split('id="counts"')[1].split("</dl>")[0]
    assert re.search(r"<dt>Patients</dt><dd>\d+</dd>", counts)
    # min_free_mb = 512 (MiB), shown in decimal units like every page (web/formats)
    assert "Reserve (images refused below)" in text and "536.9 MB" in text
    assert "min_free_mb = 512" in text  # the setting as written, beside the decimal size
    certs = text.split('id="certificates"')[1].split("</table>")[0]
    assert "Certificate authority" in certs and "days left" in certs
    assert "The audit trail verifies" in text
    security = text.split('id="security-events"')[1].split("</table>")[0]
    assert "exposure" in security and "127.0.0.2" in security
    # no patient data (the corpus' synthetic names) and no event messages
    assert "^" not in security and "EXPOSURE:" not in text
    french = served.admin.get("/admin/health", headers={"accept-language": FRENCH})
    # the admin has no language preference: the browser's is used
    assert '<html lang="fr">' in french.text and "Services à l’écoute" in french.text


def test_roles_are_changed_from_the_users_page(served: Served) -> None:
    admin = served.admin
    csrf = page_csrf(admin)
    page = admin.get("/admin/users").text
    assert f'action="/admin/users/{PHYSICIAN[0]}/roles"' in page
    res = admin.post(f"/admin/users/{PHYSICIAN[0]}/roles",
                     data={"csrf": csrf, "roles": ["physician", "auditor"]})
    assert res.status_code == 303
    # the open session sees the new role at its next request
    assert served.physician.get("/audit").status_code == 200
    res = admin.post("/admin/users/admin/roles", data={"csrf": csrf, "roles": ["physician"]})
    assert res.status_code == 400 and "your own administrator role" in res.text
    res = admin.post(f"/admin/users/{PHYSICIAN[0]}/roles", data={"csrf": csrf})
    assert res.status_code == 400
    res = admin.post("/admin/users/nobody/roles", data={"csrf": csrf, "roles": ["auditor"]})
    assert res.status_code == 404
    res = admin.post(f"/admin/users/{PHYSICIAN[0]}/roles",
                     data={"csrf": csrf, "roles": ["physician"]})
    assert res.status_code == 303
    assert served.physician.get("/audit").status_code == 403
    changed = [r for r in _records(served.vault, "user.roles")
               if r.detail["user"] == PHYSICIAN[0]]
    assert [(c.actor_user, c.detail["roles"]) for c in changed] == [
        ("admin", "auditor,physician"), ("admin", "physician")]


def _records(vault: VaultDir, action: str) -> list[Any]:
    v = vault.open()
    try:
        return [r for r in v.audit.records() if r.action == action]
    finally:
        v.close()


# --- in-process ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vault_dir(tmp_path_factory: pytest.TempPathFactory) -> VaultDir:
    return make_vault(tmp_path_factory.mktemp("pages-local") / "v")


@pytest.fixture
def web(vault_dir: VaultDir) -> Iterator[LocalWeb]:
    with local_web(vault_dir, FakeClock()) as running:
        yield running


def _lang(html: str) -> str:
    found = re.search(r'<html lang="([a-z]+)">', html)
    assert found, html[:200]
    return found.group(1)


def test_language_from_browser_cookie_and_user_choice(web: LocalWeb) -> None:
    with web.browser() as browser:
        fr = browser.get("/login", headers={"accept-language": FRENCH})
        assert _lang(fr.text) == "fr"
        assert "Nom d’utilisateur" in fr.text and "Mot de passe" in fr.text
        assert ">Connexion</button>" in fr.text
        en = browser.get("/login", headers={"accept-language": ENGLISH})
        assert _lang(en.text) == "en" and "User name" in en.text
        assert _lang(browser.get("/login", headers={"accept-language": "de, es"}).text) == "en"
        q = browser.get("/login", headers={"accept-language": "en;q=0.4, fr-CA;q=0.8"})
        assert _lang(q.text) == "fr"
        # generic errors are translated too (a wrong password, in French)
        bad = browser.post("/login", headers={"accept-language": FRENCH},
                           data={"csrf": csrf_of(fr.text), "name": "x", "password": "y"})
        assert bad.status_code == 401
        assert "Nom d’utilisateur, mot de passe ou code incorrect." in bad.text
        assert 'aria-describedby="message"' in bad.text

        # the language switch of the sign-in page: a cookie that beats Accept-Language
        page = browser.get("/login", headers={"accept-language": ENGLISH})
        switch = browser.post("/language", data={"csrf": csrf_of(page.text), "lang": "fr",
                                                 "back": "/login"})
        assert switch.status_code == 303 and switch.headers["location"] == "/login"
        (cookie,) = [c for c in switch.headers.get_list("set-cookie")
                     if c.startswith("pvlang=")]
        assert "pvlang=fr" in cookie and "Secure" in cookie and "SameSite=Strict" in cookie
        assert _lang(browser.get("/login", headers={"accept-language": ENGLISH}).text) == "fr"
        evil = browser.post("/language", data={"csrf": csrf_of(page.text), "lang": "en",
                                               "back": "https://evil.example/"})
        assert evil.headers["location"] == "/login"
        assert _lang(browser.get("/login").text) == "en"

        # signed in: the account page's choice wins over cookie and browser
        web.accounts.add_user("louise", ["physician"], PHYSICIAN[1])
        web.sign_in(browser, "louise", PHYSICIAN[1])
        account = browser.get("/account", headers={"accept-language": FRENCH})
        assert _lang(account.text) == "en"  # no choice yet: the cookie's
        browser.cookies.delete("pvlang")
        account = browser.get("/account", headers={"accept-language": FRENCH})
        assert _lang(account.text) == "fr"  # nor cookie: the browser's
        res = browser.post("/account/language", data={"csrf": csrf_of(account.text),
                                                      "lang": "en"})
        assert res.status_code == 303
        page = browser.get(res.headers["location"], headers={"accept-language": FRENCH})
        assert _lang(page.text) == "en" and "Your language was saved." in page.text
        assert '<option value="en" lang="en" selected>' in page.text
        browser.cookies.delete("pvlang")
        browser.cookies.set("pvlang", "fr")
        assert _lang(browser.get("/account", headers={"accept-language": FRENCH}).text) == "en"
        browser.cookies.delete("pvlang")
        res = browser.post("/account/language", data={"csrf": csrf_of(page.text),
                                                      "lang": "fr"})
        fr_page = browser.get("/account", headers={"accept-language": ENGLISH})
        assert _lang(fr_page.text) == "fr" and "Votre compte" in fr_page.text
        assert "Votre langue a été enregistrée." in browser.get(res.headers["location"]).text
        # back to "as my browser asks" (and the cookie, which the choice of "fr" set)
        browser.post("/account/language", data={"csrf": csrf_of(fr_page.text), "lang": ""})
        assert browser.cookies.get("pvlang") == "fr"
        browser.cookies.delete("pvlang")
        assert _lang(browser.get("/account", headers={"accept-language": ENGLISH}).text) == "en"
        # errors in JSON too
        api = browser.get("/health", headers={"accept": "application/json",
                                               "accept-language": FRENCH})
        assert api.status_code == 403 and api.json() == {"error": "Votre rôle ne le permet pas."}


def test_locale_negotiation_and_safe_next() -> None:
    assert i18n.negotiate("fr-FR,fr;q=0.9,en-US;q=0.8,en;q=0.7") == "fr"
    assert i18n.negotiate("en-GB, fr;q=0.9") == "en"
    assert i18n.negotiate("de-DE, fr;q=0.1") == "fr"
    assert i18n.negotiate("fr;q=0, en;q=0.1") == "en"
    assert i18n.negotiate("*") is None and i18n.negotiate("") is None
    assert i18n.negotiate("fr;q=abc") is None
    assert i18n.translations("fr").gettext("Sign in") == "Connexion"
    assert i18n.translations("en").gettext("Sign in") == "Sign in"
    for good in ("/", "/account", "/viewer?StudyInstanceUIDs=1.2.3", "/admin/nodes?x=1#y"):
        assert safe_next(good) == good
    for bad in ("", "//evil.example/", "https://evil.example/", "/\\evil.example",
                "javascript:alert(1)", "evil", "/login", "/login/enrol", "/logout",
                "/a\nb", "/" + "a" * 3000, "\\\\evil"):
        assert safe_next(bad) == "", bad


def test_sign_in_goes_back_where_the_browser_was_going(web: LocalWeb) -> None:
    web.accounts.add_user("marc", ["physician"], PHYSICIAN[1])
    with web.browser() as browser:
        app = web.sign_in(browser, "marc", PHYSICIAN[1]).authenticator
        browser.post("/logout", data={"csrf": page_csrf(browser)})
        res = browser.get("/account?notice=token")
        assert res.status_code == 303
        assert res.headers["location"] == "/login?next=/account%3Fnotice%3Dtoken"
        form = browser.get(res.headers["location"])
        assert 'name="next" value="/account?notice=token"' in form.text
        answer = browser.post("/login", data={"csrf": csrf_of(form.text), "name": "marc",
                                              "password": PHYSICIAN[1]})
        page = browser.get(answer.headers["location"])
        done = browser.post("/login/second-factor", data={"csrf": csrf_of(page.text),
                                                          "code": app.code()})
        assert done.status_code == 303 and done.headers["location"] == "/account?notice=token"
        browser.post("/logout", data={"csrf": page_csrf(browser)})
        # an open redirect is not: another site becomes the study list
        form = browser.get("/login", params={"next": "//evil.example/x"})
        assert 'name="next" value=""' in form.text
        answer = browser.post("/login", data={"csrf": csrf_of(form.text), "name": "marc",
                                              "password": PHYSICIAN[1],
                                              "next": "https://evil.example/"})
        page = browser.get(answer.headers["location"])
        done = browser.post("/login/second-factor", data={"csrf": csrf_of(page.text),
                                                          "code": app.code()})
        assert done.headers["location"] == "/"
        # already signed in: /login?next= goes straight there
        res = browser.get("/login", params={"next": "/account"})
        assert res.status_code == 303 and res.headers["location"] == "/account"


def test_first_sign_in_with_a_passkey_instead_of_the_app(web: LocalWeb) -> None:
    web.accounts.add_user("nadia", ["physician"], PHYSICIAN[1])
    key = SoftAuthenticator()
    with web.browser() as browser:
        form = browser.get("/login", params={"next": "/account"})
        answer = browser.post("/login", data={"csrf": csrf_of(form.text), "name": "nadia",
                                              "password": PHYSICIAN[1]})
        assert answer.headers["location"] == "/login/enrol"
        page = browser.get("/login/enrol")
        assert 'id="passkey-create"' in page.text and "/login/enrol/passkey/options" in page.text
        assert "<svg" in page.text  # the app's QR code is still offered
        csrf = csrf_of(page.text)
        options = json_post(browser, "/login/enrol/passkey/options", csrf)
        assert options.status_code == 200, options.text
        opts = options.json()
        assert opts["user"]["name"] == "nadia"
        # a response for another site is refused and counted; the enrolment can go on
        evil = json_post(browser, "/login/enrol/passkey/verify", csrf,
                         {"credential": key.create(opts, "https://evil.example")})
        assert evil.status_code == 401
        opts = json_post(browser, "/login/enrol/passkey/options", csrf).json()
        done = json_post(browser, "/login/enrol/passkey/verify", csrf,
                         {"credential": key.create(opts, origin_of(web)), "label": "USB key"})
        assert done.status_code == 200, done.text
        assert done.json() == {"ok": True, "next": "/login/recovery-codes"}
        codes_page = browser.get("/login/recovery-codes")
        codes = recovery_codes_of(codes_page.text)
        assert len(codes) == 10 and 'href="/account"' in codes_page.text
        again = browser.get("/login/recovery-codes")  # shown once
        assert again.status_code == 303 and again.headers["location"] == "/account"
        account = browser.get("/account")
        assert "USB key" in account.text
        browser.post("/logout", data={"csrf": csrf_of(account.text)})

        # next time: the second-factor page (not the enrolment), with the passkey...
        form = browser.get("/login")
        answer = browser.post("/login", data={"csrf": csrf_of(form.text), "name": "nadia",
                                              "password": PHYSICIAN[1]})
        assert answer.headers["location"] == "/login/second-factor"
        assert browser.get("/login/enrol").headers["location"] == "/login/second-factor"
        page = browser.get("/login/second-factor")
        csrf = csrf_of(page.text)
        # ... and a password alone cannot add a factor to an enrolled account
        assert json_post(browser, "/login/enrol/passkey/options", csrf).status_code == 401
        opts = json_post(browser, "/login/passkey/options", csrf).json()
        done = json_post(browser, "/login/passkey/verify", csrf,
                         {"credential": key.get(opts, origin_of(web))})
        assert done.status_code == 200 and done.json()["next"] == "/"
        browser.post("/logout", data={"csrf": page_csrf(browser)})

        # a recovery code works for a passkey-only account; a 6-digit guess does not
        form = browser.get("/login")
        browser.post("/login", data={"csrf": csrf_of(form.text), "name": "nadia",
                                     "password": PHYSICIAN[1]})
        page = browser.get("/login/second-factor")
        guess = browser.post("/login/second-factor", data={"csrf": csrf_of(page.text),
                                                           "code": "123456"})
        assert guess.status_code == 401
        ok = browser.post("/login/second-factor", data={"csrf": csrf_of(page.text),
                                                        "code": codes[0]})
        assert ok.status_code == 200 and "9 left" in ok.text
        # new recovery codes from the account page work for her too
        res = browser.post("/account/recovery-codes", data={"csrf": page_csrf(browser)})
        assert res.status_code == 200 and len(recovery_codes_of(res.text)) == 10

    trail = [r for r in web.vault.audit.records() if r.actor_user == "nadia"]
    enrolled = [r for r in trail if r.action == "auth.second_factor.enrolled"]
    assert [r.detail["factor"] for r in enrolled] == ["passkey"]
    assert [r.detail["factor"] for r in trail if r.action == "auth.login"] == [
        "passkey", "passkey", "recovery"]
    assert any(r.action == "auth.passkey.added" for r in trail)
    assert web.accounts.get_user("nadia").passkeys == 1


# --- what every page is made of ------------------------------------------------------------


class _Page(HTMLParser):
    """Inputs, labels, ids, scripts and styles of one page."""

    def __init__(self) -> None:
        super().__init__()
        self.inputs: list[dict[str, str]] = []
        self.label_for: set[str] = set()
        self.ids: list[str] = []
        self.in_label = 0
        self.problems: list[str] = []
        self.meta_viewport = False
        self.skip_link = False
        self.main_id = False
        self._script_src = ""
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if "id" in a:
            self.ids.append(a["id"])
        if "style" in a or any(k.startswith("on") for k in a):
            self.problems.append(f"inline style or handler on <{tag}>")
        if tag == "style":
            self.problems.append("<style> element")
        if tag == "script":
            self._in_script = True
            if not a.get("src"):
                self.problems.append("inline <script>")
        if tag == "label":
            self.in_label += 1
            if a.get("for"):
                self.label_for.add(a["for"])
        if tag in ("input", "select", "textarea") and a.get("type") != "hidden":
            self.inputs.append({**a, "_wrapped": "1" if self.in_label else ""})
        if tag == "meta" and a.get("name") == "viewport":
            self.meta_viewport = "width=device-width" in a.get("content", "")
        if tag == "a" and a.get("href") == "#main" and "skip" in a.get("class", ""):
            self.skip_link = True
        if tag == "main" and a.get("id") == "main":
            self.main_id = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "label":
            self.in_label -= 1
        if tag == "script":
            self._in_script = False


def check_page(html: str, where: str) -> None:
    page = _Page()
    page.feed(html)
    assert not page.problems, (where, page.problems)
    assert page.meta_viewport and page.skip_link and page.main_id, where
    duplicates = {i for i in page.ids if page.ids.count(i) > 1}
    assert not duplicates, (where, duplicates)
    for field in page.inputs:
        labelled = (field.get("id") in page.label_for or field["_wrapped"]
                    or field.get("aria-label"))
        assert labelled, (where, field)
        for ref in field.get("aria-describedby", "").split():
            assert ref in page.ids, (where, field, ref)


def _pages_of(browser: httpx.Client) -> dict[str, str]:
    return {path: browser.get(path).text for path in
            ("/account", "/admin/users", "/admin/nodes", "/admin/health", "/audit")}


def test_every_page_is_labelled_and_has_no_inline_code(web: LocalWeb) -> None:
    web.accounts.add_user("olga", ["admin", "auditor"], PHYSICIAN[1])
    web.accounts.add_user("paul", ["physician"], PHYSICIAN[1])
    with web.browser() as browser, web.browser() as fresh:
        for lang in (FRENCH, ENGLISH):
            login = fresh.get("/login", headers={"accept-language": lang})
            check_page(login.text, "/login")
        form = fresh.get("/login")
        fresh.post("/login", data={"csrf": csrf_of(form.text), "name": "paul",
                                   "password": PHYSICIAN[1]})
        check_page(fresh.get("/login/enrol").text, "/login/enrol")
        web.sign_in(browser, "olga", PHYSICIAN[1])
        for lang in (FRENCH, ENGLISH):
            browser.headers["accept-language"] = lang
            for path, html in _pages_of(browser).items():
                check_page(html, f"{path} ({lang})")
        # an error page and a form with field errors
        check_page(browser.get("/admin/nodes/edit", params={"ae": "NONE"}).text, "404")
        bad = browser.post("/admin/nodes", data={"csrf": page_csrf(browser), "ae_title": "",
                                                 "host": ""})
        check_page(bad.text, "node errors")
        css = browser.get("/static/style.css", headers={"accept": "*/*"}).text
        assert ":focus-visible" in css and ".skip:focus" in css
        assert "overflow-x: auto" in css  # wide tables scroll in their box, not the page


def _all_templates_extend_base() -> list[Any]:
    root = Path(i18n.__file__).parent / "templates"
    return sorted(root.glob("*.html"))


@pytest.mark.parametrize("template", _all_templates_extend_base(), ids=lambda p: p.name)
def test_templates_have_no_untranslated_text(template: Path) -> None:
    """Text between tags is a ``_()`` call, a variable, or punctuation: an English word
    typed straight into a template would stay English on the French pages."""
    source = template.read_text()
    source = re.sub(r"{#.*?#}", "", source, flags=re.S)
    source = re.sub(r"{%.*?%}|{{.*?}}", "", source, flags=re.S)
    source = re.sub(r"<script.*?</script>", "", source, flags=re.S)
    # names that are the same in both languages (formats, protocols)
    source = re.sub(r"\b(PDF|Markdown|TLS|CSV|DICOM)\b", "", source)
    texts = [t.strip() for t in re.findall(r">([^<]+)<", source)]
    words = [t for t in texts if re.search(r"[A-Za-z]{3,}", t)
             and t not in {"pacsvault", "· pacsvault", "UTC", "(UTC)"}]
    assert not words, words
