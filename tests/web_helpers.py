"""Browser-side helpers for the web tests: an HTTPS client that checks the security headers
of every response, the sign-in flow (password, TOTP enrolment, second factor), an
authenticator app, and the web application run in-process with a fake clock.

Everything talks to 127.0.0.1 (or 127.0.0.2 for "outside" sources) only.
"""

from __future__ import annotations

import base64
import datetime as dt
import re
import secrets
import ssl
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from argon2 import PasswordHasher
from cryptography.hazmat.primitives.hashes import SHA1
from cryptography.hazmat.primitives.twofactor.totp import TOTP

from tests.helpers import VaultDir

COOKIE = "__Host-pvsession"
REQUIRED_HEADERS = {
    "strict-transport-security": "max-age=",
    "content-security-policy": "frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}
_CSRF_RE = re.compile(r'name="csrf" value="([^"]+)"')
_SECRET_RE = re.compile(r'id="totp-secret"[^>]*>([A-Z2-7 ]+)<')  # shown by groups of 4
_CODES_RE = re.compile(r"<li><code>([0-9A-Z-]+)</code></li>")


def check_security_headers(response: httpx.Response) -> None:
    """Every response, whatever its status, carries the security headers and no banner."""
    for name, needle in REQUIRED_HEADERS.items():
        value = response.headers.get(name, "")
        assert needle in value, (f"{response.request.method} {response.request.url.path} "
                                 f"({response.status_code}): {name} is {value!r}")
    csp = response.headers["content-security-policy"]
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert "script-src 'self'" in csp and "style-src 'self'" in csp
    assert "server" not in response.headers, response.headers["server"]


def client(port: int, ca: Path, *, local_address: str | None = None,
           headers: dict[str, str] | None = None) -> httpx.Client:
    """An HTTPS client for 127.0.0.1:port that trusts the vault CA and checks every
    response's security headers (a missing header fails the request that got it)."""
    transport = httpx.HTTPTransport(verify=ssl.create_default_context(cafile=str(ca)),
                                    local_address=local_address)
    return httpx.Client(
        base_url=f"https://127.0.0.1:{port}", transport=transport, timeout=30,
        headers={"accept": "text/html", **(headers or {})},
        event_hooks={"response": [check_security_headers]},
    )


def csrf_of(html: str) -> str:
    found = _CSRF_RE.search(html)
    assert found, html[:2000]
    return found.group(1)


def recovery_codes_of(html: str) -> list[str]:
    return _CODES_RE.findall(html)


def session_cookies(response: httpx.Response) -> list[str]:
    """The raw Set-Cookie values for the session cookie."""
    return [v for v in response.headers.get_list("set-cookie") if v.startswith(COOKIE + "=")]


def session_id(response: httpx.Response) -> str:
    values = session_cookies(response)
    assert len(values) == 1, response.headers.get_list("set-cookie")
    return values[0].split(";", 1)[0].split("=", 1)[1]


class Authenticator:
    """An authenticator app: RFC 6238 codes from the secret shown at enrolment.

    The server accepts the codes of the previous, current and next 30-second step, each
    step once: ``code()`` hands out the earliest step still unused (waiting when needed),
    so several sign-ins in a row need no sleep.
    """

    def __init__(self, secret_b32: str, clock: Callable[[], float] = time.time,
                 wait: Callable[[float], None] = time.sleep) -> None:
        key = base64.b32decode(secret_b32 + "=" * (-len(secret_b32) % 8))
        self._totp = TOTP(key, 6, SHA1(), 30)  # noqa: S303 (what RFC 6238 apps use)
        self._clock = clock
        self._wait = wait
        self.last_step = -1

    def code_at(self, step: int) -> str:
        return self._totp.generate(step * 30).decode("ascii")

    def code(self) -> str:
        while True:
            now = self._clock()
            step = int(now // 30)
            # The previous step's code only early in a step: it must stay valid (and a replay
            # of it be refused as a replay) for the next several seconds.
            earliest = step - 1 if now % 30 < 10 else step
            candidate = max(self.last_step + 1, earliest)
            if candidate <= step + 1:
                self.last_step = candidate
                return self.code_at(candidate)
            self._wait((candidate - 1) * 30 - now + 0.5)


@dataclass
class SignIn:
    authenticator: Authenticator
    recovery_codes: list[str]
    cookie: str


def post_login(browser: httpx.Client, name: str, password: str) -> httpx.Response:
    """The sign-in form's first step, answer as it comes (tests of refusals and limits)."""
    form = browser.get("/login")
    return browser.post("/login", data={"csrf": csrf_of(form.text), "name": name,
                                        "password": password})


def sign_in(browser: httpx.Client, name: str, password: str,
            authenticator: Authenticator | None = None, *,
            clock: Callable[[], float] = time.time,
            wait: Callable[[float], None] = time.sleep) -> SignIn:
    """The whole browser sign-in; enrols the second factor when the page asks for it."""
    form = browser.get("/login")
    assert form.status_code == 200, form.text
    answer = browser.post("/login", data={"csrf": csrf_of(form.text), "name": name,
                                          "password": password})
    assert answer.status_code == 303, (answer.status_code, answer.text)
    codes: list[str] = []
    if answer.headers["location"] == "/login/enrol":
        page = browser.get("/login/enrol")
        assert page.status_code == 200 and "<svg" in page.text, page.text
        found = _SECRET_RE.search(page.text)
        assert found, page.text
        authenticator = Authenticator(found.group(1).replace(" ", ""), clock, wait)
        done = browser.post("/login/enrol", data={"csrf": csrf_of(page.text),
                                                  "code": authenticator.code()})
        assert done.status_code == 200, (done.status_code, done.text)
        codes = recovery_codes_of(done.text)
        assert len(codes) == 10, done.text
    else:
        assert answer.headers["location"] == "/login/second-factor"
        assert authenticator is not None, "the account has a second factor already"
        page = browser.get("/login/second-factor")
        done = browser.post("/login/second-factor", data={"csrf": csrf_of(page.text),
                                                          "code": authenticator.code()})
        assert done.status_code == 303 and done.headers["location"] == "/", \
            (done.status_code, done.text)
    return SignIn(authenticator, codes, session_id(done))


def page_csrf(browser: httpx.Client) -> str:
    """The CSRF token of the signed-in session (from the account page's forms)."""
    page = browser.get("/account")
    assert page.status_code == 200, page.status_code
    return csrf_of(page.text)


def write_secret(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text + "\n")
    path.chmod(mode)
    return path


# --- the application in-process, with a fake clock ------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = dt.datetime.now(dt.UTC)

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += dt.timedelta(seconds=seconds)

    def timestamp(self) -> float:
        return self.now.timestamp()


def cheap_hasher() -> PasswordHasher:
    return PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)


@dataclass
class LocalWeb:
    vault: Any  # pacsvault.vault.Vault
    accounts: Any  # pacsvault.accounts.service.Accounts
    port: int
    clock: FakeClock
    ca: Path

    def browser(self, local_address: str | None = None) -> httpx.Client:
        return client(self.port, self.ca, local_address=local_address)

    def sign_in(self, browser: httpx.Client, name: str, password: str,
                authenticator: Authenticator | None = None) -> SignIn:
        return sign_in(browser, name, password, authenticator, clock=self.clock.timestamp,
                       wait=self.clock.advance)


@contextmanager
def local_web(vault_dir: VaultDir, clock: FakeClock) -> Iterator[LocalWeb]:
    """The real application and HTTPS listener (``WebService``) in this process, over the
    real vault, with a fake clock and cheap password hashing."""
    from pacsvault.accounts.service import Accounts
    from pacsvault.crypto.tls import server_context
    from pacsvault.web.app import create_app
    from pacsvault.web.server import WebService

    vault = vault_dir.open()
    try:
        accounts = Accounts(vault.sessions, vault.recorder, secret_key=secrets.token_bytes(32),
                            clock=clock, hasher=cheap_hasher(), recovery_hasher=cheap_hasher())
        web = WebService(create_app(vault, accounts),
                         server_context(vault.layout.tls, vault.tls_password()))
        port = web.start("127.0.0.1", 0)
        try:
            yield LocalWeb(vault, accounts, port, clock, vault_dir.data / "tls" / "ca.crt")
        finally:
            web.stop()
    finally:
        vault.close()
