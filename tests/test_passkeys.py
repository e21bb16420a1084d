"""Passkeys (WebAuthn) as the alternative second factor, against the real HTTPS server.

A software authenticator stands in for the browser and its security key: an EC P-256 key,
``clientDataJSON``, ``authenticatorData`` and a "none" attestation built by hand, so the
server's checks (challenge, origin, RP ID, signature, counter) meet real bytes.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cbor2
import httpx
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from pacsvault.accounts.passkeys import PasskeyError, relying_party
from tests.helpers import VaultDir, make_vault
from tests.web_helpers import FakeClock, LocalWeb, csrf_of, local_web, page_csrf, session_id

PASSWORD = "clef-de-sol-sous-la-lune"

UP, UV, AT = 0x01, 0x04, 0x40


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class SoftAuthenticator:
    """One passkey: a P-256 key and its counter."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.credential_id = secrets.token_bytes(32)
        self.sign_count = 0

    def _cose_key(self) -> bytes:
        numbers = self.key.public_key().public_numbers()
        return cbor2.dumps({1: 2, 3: -7, -1: 1, -2: numbers.x.to_bytes(32, "big"),
                            -3: numbers.y.to_bytes(32, "big")})

    @staticmethod
    def _client_data(kind: str, challenge: str, origin: str) -> bytes:
        return json.dumps({"type": kind, "challenge": challenge, "origin": origin,
                           "crossOrigin": False}).encode()

    def create(self, options: dict[str, Any], origin: str) -> dict[str, Any]:
        rp_id = options["rp"]["id"]
        client_data = self._client_data("webauthn.create", options["challenge"], origin)
        attested = (bytes(16) + struct.pack(">H", len(self.credential_id))
                    + self.credential_id + self._cose_key())
        auth_data = (hashlib.sha256(rp_id.encode()).digest() + bytes([UP | UV | AT])
                     + struct.pack(">I", self.sign_count) + attested)
        attestation = cbor2.dumps({"fmt": "none", "attStmt": {}, "authData": auth_data})
        return {"id": b64url(self.credential_id), "rawId": b64url(self.credential_id),
                "type": "public-key", "clientExtensionResults": {},
                "response": {"clientDataJSON": b64url(client_data),
                             "attestationObject": b64url(attestation),
                             "transports": ["usb", "nonsense"]}}

    def get(self, options: dict[str, Any], origin: str, *,
            sign_count: int | None = None) -> dict[str, Any]:
        allowed = [unb64url(d["id"]) for d in options["allowCredentials"]]
        assert self.credential_id in allowed
        if sign_count is None:
            self.sign_count += 1
            sign_count = self.sign_count
        client_data = self._client_data("webauthn.get", options["challenge"], origin)
        auth_data = (hashlib.sha256(options["rpId"].encode()).digest() + bytes([UP | UV])
                     + struct.pack(">I", sign_count))
        signature = self.key.sign(auth_data + hashlib.sha256(client_data).digest(),
                                  ec.ECDSA(hashes.SHA256()))
        return {"id": b64url(self.credential_id), "rawId": b64url(self.credential_id),
                "type": "public-key", "clientExtensionResults": {},
                "response": {"clientDataJSON": b64url(client_data),
                             "authenticatorData": b64url(auth_data),
                             "signature": b64url(signature)}}


@pytest.fixture(scope="module")
def vault_dir(tmp_path_factory: pytest.TempPathFactory) -> VaultDir:
    return make_vault(tmp_path_factory.mktemp("passkeys") / "v")


@pytest.fixture
def web(vault_dir: VaultDir) -> Iterator[LocalWeb]:
    with local_web(vault_dir, FakeClock()) as running:
        yield running


def origin_of(web: LocalWeb) -> str:
    return f"https://127.0.0.1:{web.port}"


def json_post(browser: httpx.Client, url: str, csrf: str,
              body: dict[str, Any] | None = None) -> httpx.Response:
    return browser.post(url, json=body or {}, headers={"x-csrf-token": csrf,
                                                       "accept": "application/json"})


def register(web: LocalWeb, browser: httpx.Client, key: SoftAuthenticator,
             label: str = "my key") -> None:
    csrf = page_csrf(browser)
    options = json_post(browser, "/account/passkeys/options", csrf)
    assert options.status_code == 200, options.text
    opts = options.json()
    assert opts["rp"]["id"] == "127.0.0.1" and opts["user"]["name"]
    done = json_post(browser, "/account/passkeys/verify", csrf,
                     {"credential": key.create(opts, origin_of(web)), "label": label})
    assert done.status_code == 200, done.text


def password_step(browser: httpx.Client, name: str) -> str:
    """Sign in with the password only; the CSRF token of the second-factor page."""
    form = browser.get("/login")
    answer = browser.post("/login", data={"csrf": csrf_of(form.text), "name": name,
                                          "password": PASSWORD})
    assert answer.status_code == 303, answer.text
    assert answer.headers["location"] == "/login/second-factor"
    page = browser.get("/login/second-factor")
    assert page.status_code == 200 and 'id="passkey-get"' in page.text
    assert '<script src="/static/passkey.js"' in page.text
    return csrf_of(page.text)


def login_options(browser: httpx.Client, csrf: str) -> dict[str, Any]:
    res = json_post(browser, "/login/passkey/options", csrf)
    assert res.status_code == 200, res.text
    opts: dict[str, Any] = res.json()
    assert opts["rpId"] == "127.0.0.1"
    return opts


def events(web: LocalWeb, user: str, action: str) -> list[Any]:
    return [r for r in web.vault.audit.records() if r.actor_user == user
            and r.action == action]


def test_register_then_sign_in_with_a_passkey(web: LocalWeb) -> None:
    web.accounts.add_user("paula", ["physician"], PASSWORD, by="test")
    key = SoftAuthenticator()
    with web.browser() as browser:
        web.sign_in(browser, "paula", PASSWORD)  # first sign-in enrols TOTP
        register(web, browser, key)
        page = browser.get("/account")
        assert "my key" in page.text and 'action="/account/passkeys/remove"' in page.text
        browser.post("/logout", data={"csrf": csrf_of(page.text)})
        assert browser.get("/account").status_code == 303

        csrf = password_step(browser, "paula")
        opts = login_options(browser, csrf)
        pending = browser.cookies.get("__Host-pvsession")
        done = json_post(browser, "/login/passkey/verify", csrf,
                         {"credential": key.get(opts, origin_of(web))})
        assert done.status_code == 200, done.text
        assert done.json() == {"ok": True, "next": "/"}
        assert session_id(done) != pending  # a new session id once signed in
        account = browser.get("/account")
        assert account.status_code == 200 and "paula" in account.text
        section = account.text.split('id="passkeys"')[1].split("</table>")[0]
        assert ">never<" not in section  # last used: now

    logins = events(web, "paula", "auth.login")
    assert [r.detail["factor"] for r in logins] == ["totp", "passkey"]
    assert [r.detail["user"] for r in events(web, "paula", "auth.passkey.added")] == ["paula"]


def test_replay_lower_count_and_wrong_origin_are_refused(web: LocalWeb) -> None:
    web.accounts.add_user("quentin", ["physician"], PASSWORD, by="test")
    key = SoftAuthenticator()
    with web.browser() as browser:
        app = web.sign_in(browser, "quentin", PASSWORD).authenticator
        register(web, browser, key)
        browser.post("/logout", data={"csrf": page_csrf(browser)})

        # A good assertion, then the same one again (same challenge): refused.
        csrf = password_step(browser, "quentin")
        opts = login_options(browser, csrf)
        assertion = key.get(opts, origin_of(web))
        assert json_post(browser, "/login/passkey/verify", csrf,
                         {"credential": assertion}).status_code == 200
        browser.post("/logout", data={"csrf": page_csrf(browser)})
        csrf = password_step(browser, "quentin")
        replay = json_post(browser, "/login/passkey/verify", csrf, {"credential": assertion})
        assert replay.status_code == 401, replay.text
        # ... even with fresh options (a new challenge that the old response lacks)
        login_options(browser, csrf)
        replay = json_post(browser, "/login/passkey/verify", csrf, {"credential": assertion})
        assert replay.status_code == 401, replay.text

        # A counter that does not increase: a cloned key.
        opts = login_options(browser, csrf)
        low = key.get(opts, origin_of(web), sign_count=key.sign_count)
        assert json_post(browser, "/login/passkey/verify", csrf,
                         {"credential": low}).status_code == 401

        # Made for another site.
        opts = login_options(browser, csrf)
        evil = key.get(opts, "https://evil.example")
        assert json_post(browser, "/login/passkey/verify", csrf,
                         {"credential": evil}).status_code == 401
        assert browser.get("/account").status_code == 303  # still not signed in

        # The pending sign-in is still usable with TOTP: passkeys broke nothing there.
        page = browser.get("/login/second-factor")
        done = browser.post("/login/second-factor", data={"csrf": csrf_of(page.text),
                                                          "code": app.code()})
        assert done.status_code == 303 and done.headers["location"] == "/"

    failures = [r.detail["reason"] for r in events(web, "quentin", "auth.login.failed")]
    assert failures == ["no-passkey-challenge", "bad-passkey-assertion",
                        "passkey-sign-count", "bad-passkey-assertion"]
    logins = events(web, "quentin", "auth.login")
    assert [r.detail["factor"] for r in logins] == ["totp", "passkey", "totp"]


def test_passkey_endpoints_need_a_pending_or_signed_in_session(web: LocalWeb) -> None:
    web.accounts.add_user("rita", ["physician"], PASSWORD, by="test")
    with web.browser() as browser:
        assert browser.post("/login/passkey/options").status_code == 401
        assert browser.post("/account/passkeys/options").status_code == 401
        # A user without a passkey gets no options (TOTP stays the way in).
        web.sign_in(browser, "rita", PASSWORD)
        browser.post("/logout", data={"csrf": page_csrf(browser)})
        csrf = password_step(browser, "rita")
        assert json_post(browser, "/login/passkey/options", csrf).status_code == 400
        # CSRF applies as to every POST.
        assert browser.post("/login/passkey/options", json={}).status_code == 403
        js = browser.get("/static/passkey.js", headers={"accept": "*/*"})
        assert js.status_code == 200 and js.headers["content-type"].startswith(
            "text/javascript")
        assert "navigator.credentials.get" in js.text


def test_remove_a_passkey(web: LocalWeb) -> None:
    web.accounts.add_user("sami", ["physician"], PASSWORD, by="test")
    with web.browser() as browser:
        web.sign_in(browser, "sami", PASSWORD)
        register(web, browser, SoftAuthenticator(), "old key")
        page = browser.get("/account")
        found = page.text.split('name="key" value="')[1].split('"')[0]
        res = browser.post("/account/passkeys/remove", data={"csrf": csrf_of(page.text),
                                                             "key": found})
        assert res.status_code == 303 and res.headers["location"] == "/account?notice=passkey"
        assert "old key" not in browser.get("/account").text
        res = browser.post("/account/passkeys/remove", data={"csrf": page_csrf(browser),
                                                             "key": found})
        assert res.status_code == 404


def test_relying_party_from_the_host_header(tmp_path: Path) -> None:
    allowed = {"pacs.example.org", "192.168.1.10"}
    assert relying_party("pacs.example.org:8443", allowed).origin == \
        "https://pacs.example.org:8443"
    assert relying_party("PACS.example.org", allowed).id == "pacs.example.org"
    assert relying_party("pacs.example.org:443", allowed).origin == "https://pacs.example.org"
    assert relying_party("127.0.0.1:9000", allowed).id == "127.0.0.1"
    assert relying_party("[::1]:9000", allowed).origin == "https://[::1]:9000"
    assert relying_party("localhost", allowed).id == "localhost"
    for bad in ("evil.example", "", "pacs.example.org:x", "a@pacs.example.org",
                "pacs.example.org.evil.example", "[::1]x"):
        with pytest.raises(PasskeyError):
            relying_party(bad, allowed)
