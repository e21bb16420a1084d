"""Issue 11, defect 6 (and issue 12, defect 4): sign-in lockouts an attacker on the practice
network cannot turn against the owner, and cannot use to learn which user names exist.

* Against the real ``pacsvault serve`` (real clock, production Argon2), over HTTPS from
  several loopback addresses (all of 127.0.0.0/8 is a trusted network in the test config):
  an attacker's 50 wrong passwords do not stop the owner signing in from a known device;
  unknown and existing names get the same answers with similar timing; a valid API token
  works from a throttled address; ``user blocks`` / ``user unlock`` / ``user
  unblock-address`` list and lift real blocks; the first administrator is not ``admin``.
* In-process (the real application and HTTPS listener, fake clock, cheap Argon2): an
  address block ends by itself; the admin page lists and lifts blocks (CSRF, audited,
  in French too).
"""

from __future__ import annotations

import re
import statistics
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from pacsvault.accounts.service import Accounts, AuthOutcome
from tests.helpers import Server, VaultDir, first_run_secrets, make_vault, pv, start_server
from tests.web_helpers import (
    Authenticator,
    FakeClock,
    cheap_hasher,
    client,
    csrf_of,
    local_web,
    page_csrf,
    post_login,
)

pytestmark = pytest.mark.slow  # real servers, production Argon2

OWNER, OWNER_PW = "docteur.martin", "velo-bleu-sous-les-tilleuls"
OTHER, OTHER_PW = "secretariat", "confiture-de-mirabelles-maison"
DEVICE_COOKIE = "__Host-pvdevice"
_CSRF_VALUE = re.compile(r'name="csrf" value="[^"]+"')


@dataclass
class Served:
    server: Server
    vault: VaultDir

    @property
    def ca(self) -> Path:
        return self.vault.data / "tls" / "ca.crt"

    def browser(self, local_address: str | None = None) -> httpx.Client:
        return client(self.server.https_port, self.ca, local_address=local_address)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.vault.cli(*args, check=False)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    vault = make_vault(tmp_path_factory.mktemp("lockout") / "v")
    v = vault.open()
    try:
        v.accounts.add_user(OWNER, ["physician"], OWNER_PW, by="test")
        v.accounts.add_user(OTHER, ["physician"], OTHER_PW, by="test")
    finally:
        v.close()
    server = start_server(vault)
    yield Served(server, vault)
    server.stop()


def second_step(browser: httpx.Client, app: Authenticator) -> httpx.Response:
    page = browser.get("/login/second-factor")
    return browser.post("/login/second-factor", data={"csrf": csrf_of(page.text),
                                                      "code": app.code()})


def enrol(browser: httpx.Client, name: str, password: str) -> tuple[Authenticator, list[str]]:
    """First sign-in with TOTP enrolment; returns the app and the final Set-Cookie values."""
    answer = post_login(browser, name, password)
    assert answer.headers["location"] == "/login/enrol", answer.text[-500:]
    page = browser.get("/login/enrol")
    secret = re.search(r'id="totp-secret"[^>]*>([A-Z2-7 ]+)<', page.text)
    assert secret
    app = Authenticator(secret.group(1).replace(" ", ""))
    done = browser.post("/login/enrol", data={"csrf": csrf_of(page.text), "code": app.code()})
    assert done.status_code == 200, done.text[-500:]
    return app, done.headers.get_list("set-cookie")


def in_process_accounts(v: object, clock: FakeClock) -> Accounts:
    """The vault's accounts with a fake clock (same keys as the server's), to build a block
    without waiting through the real delays."""
    real: Accounts = v.accounts  # type: ignore[attr-defined]
    return Accounts(v.sessions, v.recorder,  # type: ignore[attr-defined]
                    secret_key=real._key, clock=clock, hasher=cheap_hasher(),
                    recovery_hasher=cheap_hasher())


# --- the real server -------------------------------------------------------------------------


def test_attackers_50_wrong_passwords_do_not_stop_the_owner(served: Served) -> None:
    with served.browser("127.0.0.1") as owner:
        app, set_cookies = enrol(owner, OWNER, OWNER_PW)
        # The known-device cookie: set at the full sign-in, long-lived, locked down.
        raw = [v for v in set_cookies if v.startswith(DEVICE_COOKIE + "=")]
        assert raw, "no device cookie after a full sign-in"
        attributes = {a.strip().split("=")[0].lower() for a in raw[0].split(";")[1:]}
        assert {"path", "secure", "httponly", "samesite", "max-age"} <= attributes, raw
        assert "domain" not in attributes and "SameSite=Strict" in raw[0]
        owner.post("/logout", data={"csrf": page_csrf(owner)})

        # The attacker: 50 wrong passwords from another machine, then 50 more from the
        # owner's own address but without the owner's device cookie.
        for address in ("127.0.0.2", "127.0.0.1"):
            with served.browser(address) as attacker:
                statuses = {post_login(attacker, OWNER, f"guess-{n}").status_code
                            for n in range(50)}
                assert statuses <= {401, 429}, statuses
                assert 429 in statuses  # the attacker was slowed down

        # The owner, from the known device, signs in at once.
        answer = post_login(owner, OWNER, OWNER_PW)
        assert answer.status_code == 303, (answer.status_code, answer.text[-600:])
        assert answer.headers["location"] == "/login/second-factor"
        done = second_step(owner, app)
        assert done.status_code == 303 and done.headers["location"] == "/"


def test_unknown_and_existing_names_answer_alike(served: Served) -> None:
    """From rotating addresses (one attempt each), 12 failures for an existing name and 12
    for a name that does not exist: same statuses, bodies, Retry-After, similar time."""
    answers: dict[str, list[tuple[int, str, str]]] = {"known": [], "unknown": []}
    times: dict[str, list[float]] = {"known": [], "unknown": []}
    for n in range(12):
        for kind, name, net in (("known", OTHER, 1), ("unknown", "nobody.here", 2)):
            with served.browser(f"127.0.{net}.{n + 10}") as browser:
                form = browser.get("/login")
                started = time.perf_counter()
                res = browser.post("/login", data={"csrf": csrf_of(form.text), "name": name,
                                                   "password": f"wrong-{n}"})
                elapsed = time.perf_counter() - started
            body = _CSRF_VALUE.sub("", res.text)
            answers[kind].append((res.status_code, res.headers.get("retry-after", ""), body))
            if res.status_code == 401:
                times[kind].append(elapsed)
    assert answers["known"] == answers["unknown"]
    assert [a[0] for a in answers["known"]][:6] == [401] * 6
    # Both evaluated the password (Argon2): similar times, loosely (a loaded machine): the
    # median of the ratios of attempts made one right after the other.
    ratios = [u / k for k, u in zip(times["known"], times["unknown"], strict=True)]
    assert 0.4 < statistics.median(ratios) < 2.5, (times, ratios)


def test_valid_api_token_works_from_a_throttled_address(served: Served) -> None:
    made = served.cli("token", "create", "--user", OWNER, "--expires", "1d")
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    address = "127.0.0.5"
    with served.browser(address) as sprayer:
        throttled = False
        for n in range(40):  # spraying names from one address
            if post_login(sprayer, f"name{n}", "Printemps2024").status_code == 429:
                throttled = True
                break
        assert throttled
    with served.browser(address) as api:
        res = api.get("/dicom-web/studies", headers={"authorization": f"Bearer {token}",
                                                      "accept": "application/dicom+json"})
        assert res.status_code in (200, 204), (res.status_code, res.text[:300])
        bad = api.get("/dicom-web/studies", headers={"authorization": f"Bearer {token}x",
                                                      "accept": "application/dicom+json"})
        assert bad.status_code == 401


def test_cli_lists_and_lifts_account_and_address_blocks(served: Served) -> None:
    v = served.vault.open()
    try:
        # (the address first: spraying moves the fake clock an hour on, which would make
        # the owner's block look over and be cleaned up)
        for address, name in (("127.0.0.7", None), ("127.0.0.6", OWNER)):
            clock = FakeClock()  # starts now: each block lasts from now on
            accounts = in_process_accounts(v, clock)
            for n in range(40):
                result = accounts.authenticate(name or f"spray{n}", f"wrong-{n}", address)
                if result.outcome is AuthOutcome.LOCKED or (
                        result.decision is not None and not result.decision.allowed
                        and result.decision.verdict.value == "locked"):
                    break
                clock.advance(max(result.retry_after, 0) + 0.01)
            else:
                raise AssertionError(f"no block for {address}")
    finally:
        v.close()

    listing = served.cli("user", "blocks")
    assert listing.returncode == 0, listing.stderr
    assert OWNER in listing.stdout and "127.0.0.6" in listing.stdout
    assert "127.0.0.7" in listing.stdout

    # Blocked: the owner from 127.0.0.6 (a machine she never used), anyone from 127.0.0.7.
    # The message says what happened, for how long, and what to do.
    for address, name, password in (("127.0.0.6", OWNER, OWNER_PW),
                                    ("127.0.0.7", OTHER, OTHER_PW)):
        with served.browser(address) as browser:
            res = post_login(browser, name, password)
            assert res.status_code == 429, address
            assert "blocked" in res.text and "min" in res.text
            assert "unlock the account" not in res.text
            assert "administrator" in res.text

    unlocked = served.cli("user", "unlock", OWNER)
    assert unlocked.returncode == 0 and "lifted" in unlocked.stderr, unlocked.stderr
    unblocked = served.cli("user", "unblock-address", "127.0.0.7")
    assert unblocked.returncode == 0 and "lifted" in unblocked.stderr, unblocked.stderr
    with served.browser("127.0.0.6") as browser:
        assert post_login(browser, OWNER, OWNER_PW).status_code == 303
    with served.browser("127.0.0.7") as browser:
        assert post_login(browser, OTHER, OTHER_PW).status_code == 303
    after = served.cli("user", "blocks")
    assert "127.0.0.6" not in after.stdout and "127.0.0.7" not in after.stdout


def test_first_administrator_name_is_not_predictable(tmp_path: Path) -> None:
    names = set()
    for n in range(2):
        proc = pv("init", "--data", tmp_path / f"d{n}", "--key-file",
                  tmp_path / f"k{n}" / "master.key")
        found = first_run_secrets(proc.stdout)
        assert re.fullmatch(r"admin-[a-z2-9]{6}", found.admin_name), found.admin_name
        names.add(found.admin_name)
        listing = pv("user", "list", "--data", tmp_path / f"d{n}", "--key-file",
                     tmp_path / f"k{n}" / "master.key").stdout
        assert re.search(rf"^{found.admin_name}\s+admin\s", listing, re.MULTILINE)
        assert not re.search(r"^admin\s", listing, re.MULTILINE)
    assert len(names) == 2
    chosen = pv("init", "--data", tmp_path / "d3", "--key-file", tmp_path / "k3" / "m.key",
                "--admin", "Dr.Durand")
    assert first_run_secrets(chosen.stdout).admin_name == "dr.durand"


# --- in-process, fake clock ------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_vault(tmp_path_factory: pytest.TempPathFactory) -> VaultDir:
    return make_vault(tmp_path_factory.mktemp("lockout-local") / "v")


def test_address_block_ends_by_itself_and_admin_page_lifts_blocks(
        local_vault: VaultDir) -> None:
    clock = FakeClock()
    with local_web(local_vault, clock) as web:
        web.accounts.add_user("olivier", ["physician"], "galets-ronds-de-la-riviere")
        web.accounts.add_user("chef", ["admin"], "lanterne-du-gardien-de-phare")
        with web.browser("127.0.0.1") as admin:
            # Spraying from 127.0.0.9 until the address is blocked.
            blocked = None
            with web.browser("127.0.0.9") as sprayer:
                for n in range(60):
                    res = post_login(sprayer, f"who{n}", "Printemps2024")
                    if res.status_code == 429 and "blocked" in res.text:
                        blocked = res
                        break
                    clock.advance(int(res.headers.get("retry-after", "0")) + 1)
            assert blocked is not None
            # ... which ends by itself (not forever) ...
            clock.advance(int(blocked.headers["retry-after"]) + 1)
            with web.browser("127.0.0.9") as later:
                assert post_login(later, "olivier", "galets-ronds-de-la-riviere") \
                    .status_code == 303
            # ... and a new block, made by guessing olivier's password from 127.0.0.8,
            # is listed on the admin page and lifted there.
            with web.browser("127.0.0.8") as guesser:
                for n in range(30):
                    res = post_login(guesser, "olivier", f"guess-{n}")
                    if res.status_code == 429 and "blocked" in res.text:
                        break
                    clock.advance(int(res.headers.get("retry-after", "0")) + 1)
                assert res.status_code == 429 and "blocked" in res.text
                web.sign_in(admin, "chef", "lanterne-du-gardien-de-phare")
                page = admin.get("/admin/users")
                assert page.status_code == 200
                assert 'id="blocks"' in page.text and "127.0.0.8" in page.text
                ids = re.findall(r'name="block" value="([^"]+)"', page.text)
                assert ids, page.text
                # CSRF required
                assert admin.post("/admin/users/blocks/lift",
                                  data={"block": ids[0]}).status_code == 403
                french = admin.get("/admin/users", headers={"accept-language": "fr"})
                assert "Blocages" in french.text
                done = admin.post("/admin/users/blocks/lift",
                                  data={"csrf": page_csrf(admin), "block": ids[0]})
                assert done.status_code == 303
                assert "127.0.0.8" not in admin.get("/admin/users").text
                assert post_login(guesser, "olivier", "galets-ronds-de-la-riviere") \
                    .status_code == 303
    v = local_vault.open()
    try:
        lifted = [r for r in v.audit.records() if r.action in (
            "auth.account.unlocked", "auth.address.unlocked", "auth.block.lifted")
            and r.actor_user == "chef"]
    finally:
        v.close()
    assert lifted, "lifting a block from the page is not audited"
