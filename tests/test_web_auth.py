"""Browser sign-in, sessions and account administration, end to end.

* Against the real ``pacsvault serve`` over HTTPS (real clock, production Argon2): the
  sign-in with password and TOTP enrolment, cookie flags, new session ids at each step,
  logout, TOTP replay, recovery codes, CSRF, security headers on every response (checked by
  the client on each one), the ``user``/``token`` commands, an untrusted source address,
  and an ``sslscan`` of the HTTPS port.
* In-process (the real application and ``WebService`` with a fake clock and cheap Argon2,
  over a real vault): throttling and locking, idle and absolute session expiry, and
  ``remote_access = "internet"``.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from pacsvault.audit.trail import Record
from tests.helpers import Server, VaultDir, make_vault, start_server
from tests.web_helpers import (
    COOKIE,
    Authenticator,
    FakeClock,
    check_security_headers,
    client,
    csrf_of,
    local_web,
    page_csrf,
    session_cookies,
    session_id,
    sign_in,
    write_secret,
)

PASSWORDS = {
    "alice": "velo-rouge-sous-la-pluie",
    "bob": "tartine-de-confiture-aux-figues",
    "carol": "phare-breton-dans-la-tempete",
}
DICOMWEB_SEARCH = "/dicom-web/studies"


@dataclass
class Served:
    server: Server
    vault: VaultDir

    @property
    def ca(self) -> Path:
        return self.vault.data / "tls" / "ca.crt"

    def browser(self, local_address: str | None = None) -> httpx.Client:
        return client(self.server.https_port, self.ca, local_address=local_address)

    def cli(self, *args: str | Path) -> subprocess.CompletedProcess[str]:
        return self.vault.cli(*args, check=False)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    vault = make_vault(tmp_path_factory.mktemp("webauth") / "v")
    v = vault.open()
    try:  # users made in-process here; the CLI has its own tests below
        for name, password in PASSWORDS.items():
            v.accounts.add_user(name, ["physician"], password, by="test")
    finally:
        v.close()
    server = start_server(vault)
    yield Served(server, vault)
    server.stop()


def records(vault: VaultDir, action: str | None = None) -> list[Record]:
    """The trail's records (actor and detail kept apart)."""
    v = vault.open()
    try:
        return [r for r in v.audit.records() if action is None or r.action == action]
    finally:
        v.close()


def by(vault: VaultDir, user: str, action: str | None = None) -> list[Record]:
    return [r for r in records(vault, action) if r.actor_user == user]


# --- the real server -----------------------------------------------------------------------


# Each test signs in from its own loopback address: failures are also counted per source
# address (and a success does not reset that count), so tests must not add up.
ALICE_AT, BOB_AT, CAROL_AT, DAVE_AT = "127.0.0.11", "127.0.0.12", "127.0.0.13", "127.0.0.14"


def test_sign_in_with_password_and_totp(served: Served) -> None:
    with served.browser(ALICE_AT) as browser:
        form = browser.get("/login")
        assert form.status_code == 200
        # The session cookie: __Host- prefix, Secure, HttpOnly, SameSite=Strict, Path=/,
        # no Domain and no lifetime (gone with the browser); 256 random bits.
        (raw,) = session_cookies(form)
        attributes = {a.strip().split("=")[0].lower(): a.strip() for a in raw.split(";")[1:]}
        assert set(attributes) == {"path", "secure", "httponly", "samesite"}, raw
        assert attributes["path"] == "Path=/" and attributes["samesite"] == "SameSite=Strict"
        anonymous_id = session_id(form)
        assert re.fullmatch(r"[A-Za-z0-9_-]{43}", anonymous_id)

        answer = browser.post("/login", data={"csrf": csrf_of(form.text), "name": "Alice",
                                              "password": PASSWORDS["alice"]})
        assert answer.status_code == 303 and answer.headers["location"] == "/login/enrol"
        pending_id = session_id(answer)
        assert pending_id != anonymous_id  # new id once the password is right

        page = browser.get("/login/enrol")
        assert page.status_code == 200
        assert "<svg" in page.text and "<img" not in page.text  # the QR code is inline
        secret = re.search(r'id="totp-secret"[^>]*>([A-Z2-7 ]+)<', page.text)
        assert secret
        app = Authenticator(secret.group(1).replace(" ", ""))
        wrong = browser.post("/login/enrol", data={"csrf": csrf_of(page.text),
                                                   "code": app.code_at(app.last_step + 999)})
        assert wrong.status_code == 401 and "Wrong code" in wrong.text  # issue 12 #8
        first_code = app.code()
        done = browser.post("/login/enrol", data={"csrf": csrf_of(page.text),
                                                  "code": first_code})
        assert done.status_code == 200
        codes = re.findall(r"<li><code>([0-9A-Z-]+)</code></li>", done.text)
        assert len(codes) == 10 and len(set(codes)) == 10
        signed_in_id = session_id(done)
        assert signed_in_id not in (anonymous_id, pending_id)  # new id at sign-in

        account = browser.get("/account")
        assert account.status_code == 200 and "alice" in account.text
        assert ALICE_AT in account.text and "signed in" in account.text  # last sign-ins

        # Ids of earlier stages are worth nothing now.
        for old in (anonymous_id, pending_id):
            with served.browser() as other:
                other.cookies.set(COOKIE, old)
                res = other.get("/account")
                assert res.status_code == 303
                assert res.headers["location"] == "/login?next=/account"

        # Logout invalidates the session on the server, not just in this browser.
        out = browser.post("/logout", data={"csrf": page_csrf(browser)})
        assert out.status_code == 303 and out.headers["location"] == "/login"
        assert "Max-Age=0" in session_cookies(out)[0]
        with served.browser() as replay:
            replay.cookies.set(COOKIE, signed_in_id)
            res = replay.get("/account")
            assert res.status_code == 303 and res.headers["location"] == "/login?next=/account"

        # TOTP replay: the code used at enrolment is refused, even within its window.
        form = browser.get("/login")
        answer = browser.post("/login", data={"csrf": csrf_of(form.text), "name": "alice",
                                              "password": PASSWORDS["alice"]})
        assert answer.headers["location"] == "/login/second-factor"
        page = browser.get("/login/second-factor")
        replayed = browser.post("/login/second-factor",
                                data={"csrf": csrf_of(page.text), "code": first_code})
        assert replayed.status_code == 401
        ok = browser.post("/login/second-factor",
                          data={"csrf": csrf_of(page.text), "code": app.code()})
        assert ok.status_code == 303 and ok.headers["location"] == "/"  # the study list
        browser.post("/logout", data={"csrf": page_csrf(browser)})

        # A recovery code signs in once.
        for attempt, expected in ((1, 200), (2, 401)):
            form = browser.get("/login")
            browser.post("/login", data={"csrf": csrf_of(form.text), "name": "alice",
                                         "password": PASSWORDS["alice"]})
            page = browser.get("/login/second-factor")
            res = browser.post("/login/second-factor",
                               data={"csrf": csrf_of(page.text), "code": codes[0]})
            assert res.status_code == expected, (attempt, res.text)
            if expected == 200:
                assert "9 left" in res.text
                browser.post("/logout", data={"csrf": page_csrf(browser)})

    recorded = by(served.vault, "alice")
    actions = [r.action for r in recorded]
    assert "auth.second_factor.enrolled" in actions
    logins = [r for r in recorded if r.action == "auth.login"]
    assert [r.detail["factor"] for r in logins] == ["totp", "totp", "recovery"]
    assert all(r.actor_address == ALICE_AT and r.code == "110114" for r in logins)
    failures = [r.detail["reason"] for r in recorded if r.action == "auth.login.failed"]
    assert {"bad-code", "replayed-code", "bad-recovery-code"} <= set(failures)
    assert actions.count("auth.logout") == 3
    # Nothing secret in the trail.
    trail = (served.vault.data / "audit" / "trail.jsonl").read_text()
    for secret_text in (PASSWORDS["alice"], first_code, codes[0], secret.group(1)):
        assert secret_text not in trail


def test_csrf_missing_or_wrong_is_refused(served: Served) -> None:
    with served.browser(BOB_AT) as browser, served.browser(BOB_AT) as stranger:
        # The sign-in form itself: missing or wrong token.
        browser.get("/login")
        for data in ({}, {"csrf": "x" * 43}, {"csrf": csrf_of(stranger.get("/login").text)}):
            res = browser.post("/login", data={**data, "name": "bob",
                                               "password": PASSWORDS["bob"]})
            assert res.status_code == 403, data
        sign_in(browser, "bob", PASSWORDS["bob"])
        token = page_csrf(browser)
        other = csrf_of(stranger.get("/login").text)  # a real token, of another session
        for data in ({}, {"csrf": ""}, {"csrf": token[:-2] + "AA"}, {"csrf": other}):
            res = browser.post("/account/recovery-codes", data=data)
            assert res.status_code == 403 and "reload the page" in res.text, data
            res = browser.post("/logout", data=data)
            assert res.status_code == 403, data
        # wrong header, right form field: the header is what counts
        res = browser.post("/account/recovery-codes", data={"csrf": token},
                           headers={"x-csrf-token": other})
        assert res.status_code == 403
        # a JSON body cannot carry the form field: only the header works
        res = browser.post("/account/recovery-codes", json={"csrf": token})
        assert res.status_code == 403
        assert browser.get("/account").status_code == 200  # still signed in
        res = browser.post("/account/recovery-codes", headers={"x-csrf-token": token})
        assert res.status_code == 200 and len(re.findall(r"<li><code>", res.text)) == 10
    refused = by(served.vault, "bob", "web.csrf.refused")
    assert len(refused) >= 10 and {r.detail["token"] for r in refused} == {"missing", "wrong"}
    assert {r.detail["area"] for r in refused} == {"account", "logout"}
    assert records(served.vault, "web.csrf.refused")  # the sign-in form's refusals too


def test_security_headers_and_generic_errors(served: Served) -> None:
    """The client checks the headers of every response of every test; here, one of each
    kind of answer, and error bodies that say nothing about the server."""
    with served.browser() as browser, served.browser() as api:
        api.headers["accept"] = "application/json"
        answers = [
            browser.get("/login"),  # 200 page
            browser.get("/static/style.css"),  # 200 static
            browser.get("/"),  # 303
            browser.get("/account"),  # 303 to sign in
            api.get("/health"),  # 401
            api.get("/account", headers={"authorization": "Bearer pv_0_x"}),  # 401 token
            browser.get("/static/no-such-file.css"),  # 404
            api.request("PUT", "/login"),  # 405
            api.get(DICOMWEB_SEARCH),  # 401 DICOMweb
        ]
        assert [a.status_code for a in answers] == [200, 200, 303, 303, 401, 401, 404, 405,
                                                    401]
        assert answers[1].headers["content-type"].startswith("text/css")
        assert answers[6].headers["content-type"].startswith("text/html")
        assert answers[4].json() == {"error": "Please sign in."}
        for answer in answers:
            body = answer.text.lower()
            assert "traceback" not in body and "uvicorn" not in body
            assert "fastapi" not in body and "starlette" not in body
            assert "0.1.0" not in body  # no version banner


def test_untrusted_source_is_refused_with_an_exposure_event(tmp_path: Path) -> None:
    vault = make_vault(tmp_path / "v")
    vault.set_toml("dicom", "trusted_networks", '["127.0.0.1/32"]')
    server = start_server(vault)
    try:
        ca = vault.data / "tls" / "ca.crt"
        with client(server.https_port, ca, local_address="127.0.0.2") as outside:
            for path in ("/login", "/account", DICOMWEB_SEARCH, "/admin/users"):
                res = outside.get(path)
                assert res.status_code == 403 and "sign in" not in res.text.lower(), path
            res = outside.post("/login", data={"name": "admin",
                                               "password": vault.admin_password})
            assert res.status_code == 403
        with client(server.https_port, ca) as inside:
            assert inside.get("/login").status_code == 200
    finally:
        server.stop()
    exposures = records(vault, "exposure")
    assert len(exposures) == 5
    assert {r.actor_address for r in exposures} == {"127.0.0.2"}
    assert all(r.code == "110113" and r.detail["port"] == "https" for r in exposures)
    assert all(r.outcome == "major_failure" for r in exposures)
    assert "EXPOSURE" in exposures[0].message
    assert not records(vault, "auth.login.failed")  # the password was never even looked at


def test_tls_scan_only_tls12_and_13_with_forward_secret_aead(served: Served) -> None:
    sslscan = shutil.which("sslscan")
    if sslscan is None:
        pytest.fail("Debian's sslscan is missing: scripts/install.sh --test installs it")
    out = subprocess.run(
        [sslscan, "--no-colour", f"127.0.0.1:{served.server.https_port}"],
        capture_output=True, text=True, timeout=120, check=True).stdout
    protocols = dict(re.findall(r"^(SSLv2|SSLv3|TLSv1\.[0-3])\s+(enabled|disabled)", out,
                                re.MULTILINE))
    assert protocols == {"SSLv2": "disabled", "SSLv3": "disabled", "TLSv1.0": "disabled",
                         "TLSv1.1": "disabled", "TLSv1.2": "enabled",
                         "TLSv1.3": "enabled"}, out
    suites = re.findall(r"^(?:Preferred|Accepted)\s+(\S+)\s+\d+ bits\s+(\S+)", out,
                        re.MULTILINE)
    assert {p for p, _ in suites} == {"TLSv1.2", "TLSv1.3"}, out
    for protocol, suite in suites:
        if protocol == "TLSv1.3":  # every TLS 1.3 suite is ephemeral (EC)DHE + AEAD
            assert suite in {"TLS_AES_256_GCM_SHA384", "TLS_AES_128_GCM_SHA256",
                             "TLS_CHACHA20_POLY1305_SHA256"}, suite
        else:
            assert suite.startswith(("ECDHE-", "DHE-")), suite  # forward secrecy
            assert "GCM" in suite or "CHACHA20-POLY1305" in suite, suite  # AEAD
    assert "Session renegotiation not supported" in out or "Secure session" in out


# --- the user and token commands, against the running server -------------------------------


def test_user_add_password_rules_and_list(served: Served, tmp_path: Path) -> None:
    good = write_secret(tmp_path / "dave.pw", "coquelicots-au-bord-du-canal")
    res = served.cli("user", "add", "dave", "--role", "physician", "--role", "auditor",
                     "--password-file", good)
    assert res.returncode == 0, res.stderr
    assert res.stdout == ""  # nothing secret printed
    assert "coquelicots" not in res.stderr

    readable = write_secret(tmp_path / "open.pw", "coquelicots-au-bord-du-canal", 0o644)
    weak = write_secret(tmp_path / "weak.pw", "Motdepasse1")
    refusals = {  # independent commands: run side by side (each one starts Python)
        "readable": ("--password-file", readable),
        "weak": ("--password-file", weak),
        "no terminal": (),
        "argv": ("--password", "x"),
    }
    with ThreadPoolExecutor(len(refusals) + 1) as pool:
        running = {k: pool.submit(served.cli, "user", "add", "erin", "--role", "physician",
                                  *extra) for k, extra in refusals.items()}
        listing_job = pool.submit(served.cli, "user", "list")
        done = {k: job.result() for k, job in running.items()}
    assert all(res.returncode == 2 for res in done.values()), done
    assert "chmod 600" in done["readable"].stderr
    assert "password refused" in done["weak"].stderr
    assert "common passwords" in done["weak"].stderr  # says why
    assert "--password-file" in done["no terminal"].stderr
    assert "unrecognized arguments" in done["argv"].stderr  # never on the command line

    listing = listing_job.result()
    assert listing.returncode == 0, listing.stderr
    rows = {line.split()[0]: line.split() for line in listing.stdout.splitlines()[1:]}
    assert rows["dave"][1:3] == ["auditor,physician", "active"]
    assert rows["admin"][1] == "admin"
    assert "erin" not in rows
    # dave signs in with that password
    with served.browser(DAVE_AT) as browser:
        sign_in(browser, "dave", "coquelicots-au-bord-du-canal")
    added = by(served.vault, "local-admin", "user.add")
    assert [(r.detail["user"], r.detail["roles"]) for r in added] == [
        ("dave", "auditor,physician")]


def test_disable_reset_enable_unlock(served: Served) -> None:
    with served.browser(CAROL_AT) as browser:
        app = sign_in(browser, "carol", PASSWORDS["carol"]).authenticator
        assert browser.get("/account").status_code == 200
        res: Any = served.cli("user", "disable", "carol")
        assert res.returncode == 0, res.stderr
        # the open session ends at its next request, in the server process
        res = browser.get("/account")
        assert res.status_code == 303 and res.headers["location"] == "/login?next=/account"
        form = browser.get("/login")
        res = browser.post("/login", data={"csrf": csrf_of(form.text), "name": "carol",
                                           "password": PASSWORDS["carol"]})
        assert res.status_code == 401 and "Wrong user name, password or code" in res.text
        listing = served.cli("user", "list").stdout
        assert re.search(r"^carol\s+physician\s+disabled\s+enrolled", listing, re.MULTILINE)

        assert served.cli("user", "enable", "carol").returncode == 0
        reset = served.cli("user", "reset", "carol")
        assert reset.returncode == 0, reset.stderr
        new_password = reset.stdout.strip()
        assert re.fullmatch(r"[a-z2-9]{5}(-[a-z2-9]{5}){3}", new_password), reset.stdout
        form = browser.get("/login")
        res = browser.post("/login", data={"csrf": csrf_of(form.text), "name": "carol",
                                           "password": PASSWORDS["carol"]})
        assert res.status_code == 401  # the old password is gone
        sign_in(browser, "carol", new_password, app)  # second factor kept
        res = served.cli("user", "unlock", "carol")
        assert res.returncode == 0 and "had no active sign-in block" in res.stderr
    admin_events = {r.action for r in by(served.vault, "local-admin")
                    if r.detail.get("user") == "carol"}
    assert {"user.disable", "user.enable", "user.reset", "auth.account.unlocked"} <= \
        admin_events
    ended = by(served.vault, "carol", "auth.session.ended")
    assert [r.detail["reason"] for r in ended] == ["account-changed"]
    failed = by(served.vault, "carol", "auth.login.failed")
    assert [r.detail["reason"] for r in failed] == ["disabled", "bad-password"]


def test_token_create_list_revoke(served: Served) -> None:
    res = served.cli("token", "create", "--user", "alice", "--expires", "30d", "--label",
                     "viewer")
    assert res.returncode == 0, res.stderr
    token = res.stdout.strip()
    assert re.fullmatch(r"pv_[0-9a-f]{16}_[a-z2-7]{32}", token), res.stdout
    token_id = token.split("_")[1]
    with served.browser() as api:
        api.headers["accept"] = "application/dicom+json"
        bearer = {"authorization": f"Bearer {token}"}
        assert api.get(DICOMWEB_SEARCH, headers=bearer).status_code in (200, 204)
        assert api.get("/account", headers=bearer).status_code == 401  # DICOMweb only

        listing = served.cli("token", "list").stdout
        row = next(line for line in listing.splitlines() if line.startswith(token_id))
        assert row.split()[1:3] == ["alice", "active"] and row.endswith("viewer")
        assert token.split("_")[2] not in listing  # never the secret

        res = served.cli("token", "revoke", token_id)
        assert res.returncode == 0, res.stderr
        assert api.get(DICOMWEB_SEARCH, headers=bearer).status_code == 401
        listing = served.cli("token", "list", "--user", "alice").stdout
        assert re.search(rf"^{token_id}\s+alice\s+revoked", listing, re.MULTILINE), listing
        res = served.cli("token", "revoke", "0123456789abcdef")
        assert res.returncode == 2 and "no such token" in res.stderr
    recorded = {r.action for r in records(served.vault) if r.detail.get("token") == token_id}
    # its creation, its first use from an address (issue 19), the search it made (the
    # request's record names the token, issue 18) and its revocation
    assert recorded == {"token.create", "token.new-address", "dicomweb.search",
                        "token.revoke"}
    trail = (served.vault.data / "audit" / "trail.jsonl").read_text()
    assert token not in trail and token.split("_")[2] not in trail


# --- in-process, with a fake clock ---------------------------------------------------------


@pytest.fixture(scope="module")
def local_vault(tmp_path_factory: pytest.TempPathFactory) -> VaultDir:
    return make_vault(tmp_path_factory.mktemp("weblocal") / "v")


@pytest.fixture(scope="module")
def clock() -> FakeClock:
    """One clock for the module: time only moves forward across tests."""
    return FakeClock()


def test_throttling_delays_after_5_failures_and_blocks_the_source_after_10(local_vault: VaultDir,
                                                               clock: FakeClock) -> None:
    with local_web(local_vault, clock) as web, web.browser() as browser:
        web.accounts.add_user("frank", ["physician"], "horloge-comtoise-du-salon")
        csrf = csrf_of(browser.get("/login").text)

        def attempt(password: str) -> httpx.Response:
            return browser.post("/login", data={"csrf": csrf, "name": "frank",
                                                "password": password})

        for n in range(1, 5):  # people mistype: no delay
            res = attempt(f"wrong guess {n}")
            assert res.status_code == 401 and "Retry-After" not in res.headers, n
        res = attempt("wrong guess 5")
        assert res.status_code == 401 and res.headers["Retry-After"] == "1"
        # too soon: refused without even looking at the (right) password
        res = attempt("horloge-comtoise-du-salon")
        assert res.status_code == 429 and res.headers["Retry-After"] == "1"
        assert "Too many attempts. Wait 1 s before trying again." in res.text
        for n, delay in zip(range(6, 10), (1, 2, 4, 8), strict=True):
            clock.advance(delay)
            res = attempt(f"wrong guess {n}")
            assert res.status_code == 401, n
            assert res.headers["Retry-After"] == str(delay * 2), n
        clock.advance(16)
        res = attempt("wrong guess 10")  # the 10th consecutive failure blocks this source
        assert res.status_code == 429 and "blocked" in res.text
        assert int(res.headers["Retry-After"]) == 30 * 60
        clock.advance(60)
        res = attempt("horloge-comtoise-du-salon")
        assert res.status_code == 429 and "blocked for 29 min" in res.text
        # the wording says what is blocked and what still works, never "ask to unlock the
        # account" (issue 12 #4); it does not depend on the account existing (see
        # test_hardening_accounts)
        assert "from this computer" in res.text and "signed in with before" in res.text
        assert "unlock the account" not in res.text

        # an admin unlock of the user name lifts the block at once
        web.accounts.unlock("frank", by="test")
        res = attempt("horloge-comtoise-du-salon")
        assert res.status_code == 303 and res.headers["location"] == "/login/enrol"

    failures = [r.detail["reason"] for r in by(local_vault, "frank", "auth.login.failed")]
    assert failures.count("bad-password") == 10
    assert failures.count("throttled") == 1 and failures.count("locked") == 1
    locks = by(local_vault, "frank", "auth.account.locked")
    assert len(locks) == 1 and locks[0].actor_address == "127.0.0.1"
    assert locks[0].outcome == "serious_failure" and locks[0].detail["scope"] == "source"


def test_session_idle_and_absolute_expiry(local_vault: VaultDir, clock: FakeClock) -> None:
    local_vault.set_toml("web", "session_idle_minutes", "1")
    local_vault.set_toml("web", "session_absolute_hours", "1")
    try:
        with local_web(local_vault, clock) as web, web.browser() as browser:
            web.accounts.add_user("gina", ["physician"], "cerf-volant-sur-la-dune")
            app = web.sign_in(browser, "gina", "cerf-volant-sur-la-dune").authenticator
            for _ in range(3):  # activity keeps the session alive past the idle time
                clock.advance(50)
                assert browser.get("/account").status_code == 200
            clock.advance(61)
            res = browser.get("/account")
            assert res.status_code == 303 and res.headers["location"] == "/login?next=/account"

            web.sign_in(browser, "gina", "cerf-volant-sur-la-dune", app)
            n = 0
            while n < 100:  # active all along, but only for one hour
                n += 1
                clock.advance(50)
                res = browser.get("/account")
                if res.status_code != 200:
                    break
            assert res.status_code == 303 and n * 50 >= 3600 > (n - 1) * 50, n
    finally:
        local_vault.set_toml("web", "session_idle_minutes", "30")
        local_vault.set_toml("web", "session_absolute_hours", "12")
    ended = by(local_vault, "gina", "auth.session.ended")
    assert [r.detail["reason"] for r in ended] == ["idle", "absolute"]


def test_internet_mode_keeps_administration_inside(local_vault: VaultDir,
                                                   clock: FakeClock) -> None:
    local_vault.set_toml("dicom", "trusted_networks", '["127.0.0.1/32"]')
    local_vault.set_toml("web", "remote_access", '"internet"')
    try:
        with local_web(local_vault, clock) as web:
            with web.browser(local_address="127.0.0.2") as outside:
                assert outside.get("/login").status_code == 200  # deliberately reachable
                app = web.sign_in(outside, "admin", local_vault.admin_password).authenticator
                assert outside.get("/account").status_code == 200
                for path in ("/admin/users", "/health", "/admin/openapi.json"):
                    assert outside.get(path).status_code == 403, path
                res = outside.post("/admin/users", data={"csrf": page_csrf(outside),
                                                         "name": "mallory",
                                                         "roles": "admin"})
                assert res.status_code == 403
            with web.browser() as inside:
                web.sign_in(inside, "admin", local_vault.admin_password, app)
                assert inside.get("/admin/users").status_code == 200
                res = inside.post("/admin/users", data={"csrf": page_csrf(inside),
                                                        "name": "hugo",
                                                        "roles": ["physician"]})
                assert res.status_code == 200
                password = re.search(r'id="one-time-secret"[^>]*>([^<]+)<', res.text)
                assert password
            with web.browser(local_address="127.0.0.2") as hugo:
                web.sign_in(hugo, "hugo", password.group(1))  # physicians may come in
    finally:
        local_vault.set_toml("dicom", "trusted_networks", '["127.0.0.0/8"]')
        local_vault.set_toml("web", "remote_access", '"lan"')
    assert not records(local_vault, "exposure")
    refused = records(local_vault, "web.admin.refused")
    assert len(refused) == 4 and {r.actor_address for r in refused} == {"127.0.0.2"}
    assert all(r.code == "110113" for r in refused)
    added = [r.detail["user"] for r in records(local_vault, "user.add")]
    assert "hugo" in added and "mallory" not in added
    assert [r.actor_address for r in by(local_vault, "hugo", "auth.login")] == ["127.0.0.2"]


def test_server_errors_are_generic_and_keep_the_headers(local_vault: VaultDir) -> None:
    """A route that fails: a generic 500, no exception text, and the security headers
    (Starlette answers those outside every middleware, so the app adds them itself)."""
    from pacsvault.web.app import create_app

    v = local_vault.open()
    try:
        app = create_app(v, v.accounts)

        @app.get("/boom")
        def boom() -> None:
            raise RuntimeError("DOE^JOHN 1.2.826.0.1.3680043.10.999.1")

        app.router.routes.insert(0, app.router.routes.pop())  # before the viewer's catch-all

        async def call(accept: str) -> httpx.Response:
            transport = httpx.ASGITransport(app=app, raise_app_exceptions=False,
                                            client=("127.0.0.1", 40000))
            async with httpx.AsyncClient(transport=transport,
                                         base_url="https://127.0.0.1") as http:
                return await http.get("/boom", headers={"accept": accept})

        for accept in ("text/html", "application/json"):
            res = asyncio.run(call(accept))
            assert res.status_code == 500
            check_security_headers(res)
            assert "DOE" not in res.text and "1.2.826" not in res.text
            assert "RuntimeError" not in res.text and "Traceback" not in res.text
    finally:
        v.close()


def test_account_and_administration_pages(local_vault: VaultDir, clock: FakeClock) -> None:
    with local_web(local_vault, clock) as web, web.browser() as phone, \
            web.browser() as desk, web.browser() as admin:
        web.accounts.add_user("ines", ["physician"], "galets-ronds-de-la-riviere")
        web.accounts.add_user("root", ["admin"], "lanterne-du-gardien-de-phare")
        app = web.sign_in(phone, "ines", "galets-ronds-de-la-riviere").authenticator
        web.sign_in(desk, "ines", "galets-ronds-de-la-riviere", app)
        web.sign_in(admin, "root", "lanterne-du-gardien-de-phare")

        # change of password: checks, then the other sessions end, this one goes on
        csrf = page_csrf(phone)

        def change(current: str, new: str, repeat: str) -> httpx.Response:
            return phone.post("/account/password", data={"csrf": csrf, "current": current,
                                                         "new": new, "repeat": repeat})

        assert "differ" in change("galets-ronds-de-la-riviere", "a-b-c", "a-b-d").text
        res = change("not-the-password", "sentier-des-douaniers-en-hiver",
                     "sentier-des-douaniers-en-hiver")
        assert res.status_code == 400 and "current password is wrong" in res.text
        res = change("galets-ronds-de-la-riviere", "azertyuiop", "azertyuiop")
        assert res.status_code == 400 and "too weak" in res.text
        res = change("galets-ronds-de-la-riviere", "sentier-des-douaniers-en-hiver",
                     "sentier-des-douaniers-en-hiver")
        assert res.status_code == 303 and res.headers["location"] == "/account?notice=password"
        assert "Your password was changed" in phone.get(res.headers["location"]).text
        assert desk.get("/account").headers["location"] == "/login?next=/account"

        # the user's own tokens: listed, revocable; someone else's are not theirs to revoke
        own = web.accounts.create_token("ines", "1d", label="viewer")
        other = web.accounts.create_token("root", "1d")
        page = phone.get("/account").text
        assert own.token_id in page and other.token_id not in page
        assert own.token.split("_")[2] not in page
        res = phone.post(f"/account/tokens/{other.token_id}/revoke", data={"csrf": csrf})
        assert res.status_code == 404
        res = phone.post(f"/account/tokens/{own.token_id}/revoke", data={"csrf": csrf})
        assert res.status_code == 303
        assert not web.accounts.verify_token(own.token, "127.0.0.1").ok
        assert web.accounts.verify_token(other.token, "127.0.0.1").ok

        # administration through the forms
        acsrf = page_csrf(admin)
        users = admin.get("/admin/users")
        assert users.status_code == 200 and "ines" in users.text
        res = admin.post("/admin/users/root/disable", data={"csrf": acsrf})
        assert res.status_code == 400 and "your own account" in res.text
        for data in ({"name": "Bad Name!", "roles": ["physician"]}, {"name": "jules"}):
            res = admin.post("/admin/users", data={"csrf": acsrf, **data})
            assert res.status_code == 400, data
        res = admin.post("/admin/users/ines/disable", data={"csrf": acsrf})
        assert res.status_code == 303
        assert phone.get("/account").headers["location"].startswith("/login")  # signed out
        assert admin.post("/admin/users/ines/enable", data={"csrf": acsrf}).status_code == 303
        assert admin.post("/admin/users/ines/unlock", data={"csrf": acsrf}).status_code == 303
        assert admin.post("/admin/users/nobody/enable", data={"csrf": acsrf}).status_code == 404
        res = admin.post("/admin/users/ines/reset", data={"csrf": acsrf, "second_factor": "1"})
        assert res.status_code == 200 and "new second factor" in res.text
        found = re.search(r'id="one-time-secret"[^>]*>([^<]+)<', res.text)
        assert found
        # the new password works, and the second factor must be set up again
        form = phone.get("/login")
        res = phone.post("/login", data={"csrf": csrf_of(form.text), "name": "ines",
                                         "password": found.group(1)})
        assert res.headers["location"] == "/login/enrol"
        health = admin.get("/health").json()
        assert health["status"] == "ok" and health["signed_in_sessions"] >= 1

    actions = {(r.action, r.detail.get("user")) for r in by(local_vault, "root")}
    assert {("user.disable", "ines"), ("user.enable", "ines"), ("user.reset", "ines"),
            ("auth.account.unlocked", "ines")} <= actions
    changed = by(local_vault, "ines", "user.reset")
    assert [r.detail["generated"] for r in changed] == [False]  # her own change
    assert {r.action for r in by(local_vault, "ines")} >= {"token.revoke", "auth.login"}
