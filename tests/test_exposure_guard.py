"""Issue 19: exposure switches that cannot be flipped silently, a person always told, and
no query string (patient names in OHIF's searches) kept by any log.

Two vaults for the module: ``silent`` made by ``init`` without an alert channel (what a
script that says nothing gets), ``told`` made with ``init --alert-email`` to a local SMTP
server (aiosmtpd on 127.0.0.1, plain SMTP as allowed for a relay on this machine), which
receives init's test and then the alerts of the running server. Sources outside the
trusted networks are played by 127.0.0.2 (trusted networks narrowed to 127.0.0.1/32).
"""

from __future__ import annotations

import datetime as dt
import email
import email.policy
import signal
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Any

import httpx
import pytest
from aiosmtpd.controller import Controller

from tests.harness.peers import free_port
from tests.helpers import (
    AE,
    Server,
    VaultDir,
    events,
    first_run_secrets,
    make_vault,
    pv,
    start_server,
    wait_events,
    wait_until,
)
from tests.web_helpers import client, sign_in

pytestmark = pytest.mark.slow

MARKER = "QZXMARKERVONTESTE"


@dataclass
class Mailbox:
    port: int
    messages: list[EmailMessage] = field(default_factory=list)

    def subjects(self) -> list[str]:
        return [str(m["Subject"]) for m in self.messages]

    def wait_for(self, text: str, timeout: float = 20) -> EmailMessage:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for message in self.messages:
                if text in str(message["Subject"]):
                    return message
            time.sleep(0.05)
        raise AssertionError(f"no mail with {text!r} in its subject: {self.subjects()}")


@pytest.fixture(scope="module")
def mailbox() -> Iterator[Mailbox]:
    box = Mailbox(free_port())

    class Handler:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            raw = bytes(envelope.original_content or envelope.content)
            parsed = email.message_from_bytes(raw, policy=email.policy.default)
            assert isinstance(parsed, EmailMessage)
            box.messages.append(parsed)
            return "250 OK"

    controller = Controller(Handler(), hostname="127.0.0.1", port=box.port)
    controller.start()
    try:
        yield box
    finally:
        controller.stop()


@pytest.fixture(scope="module")
def silent(tmp_path_factory: pytest.TempPathFactory) -> VaultDir:
    return make_vault(tmp_path_factory.mktemp("silent"))


@pytest.fixture(scope="module")
def told(tmp_path_factory: pytest.TempPathFactory, mailbox: Mailbox) -> VaultDir:
    root = tmp_path_factory.mktemp("told")
    key = root / "keys" / "master.key"
    proc = pv("init", "--data", root / "data", "--key-file", key, "--ae-title", AE,
              "--admin", "admin", "--alert-email", "dr.martin@example.org",
              "--smtp-host", f"127.0.0.1:{mailbox.port}", "--smtp-security", "none")
    assert "A test alert was sent by mail" in proc.stderr, proc.stderr
    found = first_run_secrets(proc.stdout)
    return VaultDir(root, key, found.recovery_code, found.admin_password, found.admin_name)


def _outside(server: Server, path: str) -> int:
    """Status of a GET from 127.0.0.2 (outside the narrowed trusted networks)."""
    ctx = ssl.create_default_context(cafile=str(server.vault.data / "tls" / "ca.crt"))
    transport = httpx.HTTPTransport(verify=ctx, local_address="127.0.0.2")
    with httpx.Client(base_url=f"https://127.0.0.1:{server.https_port}",
                      transport=transport, timeout=30) as c:
        return c.get(path).status_code


def _check_ids(vault: VaultDir, section: str) -> set[str]:
    from pacsvault.check import CheckContext, run

    v = vault.open()
    try:
        return run(CheckContext(v, dt.datetime.now(dt.UTC), probe=False),
                   sections=(section,)).ids()
    finally:
        v.close()


def test_init_without_alert_channel_is_recorded_and_a_standing_finding(
        silent: VaultDir) -> None:
    choice = events(silent, "alerts.choice")
    assert [e["channels"] for e in choice] == ["none"] and choice[0]["user"] == "init"
    assert "alerts.no-channel" in _check_ids(silent, "alerts")
    shown = silent.cli("check", "--section", "alerts", "--json", check=False)
    assert shown.returncode == 1 and "alerts.no-channel" in shown.stdout, shown.stdout
    res = silent.cli("alerts", "test", check=False)
    assert res.returncode != 0 and "no alert channel is configured" in res.stderr


def test_internet_mode_without_a_tested_channel_is_refused(silent: VaultDir) -> None:
    silent.set_toml("dicom", "trusted_networks", '["127.0.0.1/32"]')
    silent.set_toml("web", "remote_access", '"internet"')
    server = start_server(silent)
    try:
        log = server.log()
        assert "EXPOSURE CHANGE REFUSED" in log and "no alert channel has delivered a test" \
            in log, log
        refused = wait_events(silent, "exposure.refused")
        assert refused and "remote_access: lan -> internet" in str(refused[0]["changes"])
        assert refused[0]["kept"] == "lan only"
        # the server kept the practice network only: the outside is refused
        assert _outside(server, "/login") == 403
        with client(server.https_port, silent.data / "tls" / "ca.crt") as browser:
            sign_in(browser, silent.admin_name, silent.admin_password)
            page = browser.get("/admin/health")
            assert 'id="exposure-refused"' in page.text and "remote_access = internet" \
                in page.text, page.text
            assert 'id="admin-alerts"' in page.text  # the refusal's alert, on every page
    finally:
        server.stop()
        silent.set_toml("web", "remote_access", '"lan"')


def test_a_sealed_start_never_widens(silent: VaultDir) -> None:
    """Without the master key there is no network check to run: a widening waits for the
    unseal and a restart, the server keeps its previous values."""
    silent.set_toml("dicom", "tls_from_anywhere", "true")
    away = silent.root / "away.key"
    silent.key.rename(away)
    try:
        server = start_server(silent)
        try:
            assert "EXPOSURE CHANGE REFUSED while sealed" in server.log()
            assert "tls_from_anywhere = true" in server.log()
        finally:
            server.stop()
    finally:
        away.rename(silent.key)
        silent.set_toml("dicom", "tls_from_anywhere", "false")


def test_internet_mode_with_a_tested_channel_is_recorded_alerted_and_shown(
        told: VaultDir, mailbox: Mailbox) -> None:
    mailbox.wait_for("Test alert")  # sent by init
    assert [e["channels"] for e in events(told, "alerts.choice")] == ["mail"]
    assert "alerts.no-channel" not in _check_ids(told, "alerts")
    assert told.cli("alerts", "test").returncode == 0  # the command, recorded again
    assert [e["delivered"] for e in events(told, "alerts.test")][-1] == "mail"
    told.set_toml("dicom", "trusted_networks", '["127.0.0.1/32"]')
    told.set_toml("web", "remote_access", '"internet"')
    server = start_server(told)
    try:
        switched = wait_events(told, "exposure.switch")
        assert switched and "remote_access: lan -> internet" in str(switched[0]["changes"])
        assert switched[0]["widened"] == "remote_access = internet"
        assert switched[0]["file_owner"] and switched[0]["file_modified"]
        mail = mailbox.wait_for("Archive exposure changed")
        assert "remote_access: lan -> internet" in mail.get_content()
        assert _outside(server, "/login") == 200  # the switch took effect
        with client(server.https_port, told.data / "tls" / "ca.crt") as browser:
            sign_in(browser, told.admin_name, told.admin_password)
            page = browser.get("/admin/health")
            assert 'id="exposure-active"' in page.text and "remote_access = internet" \
                in page.text
            assert 'id="admin-alerts"' in browser.get("/admin/users").text
            account = browser.get("/account").text
            assert 'id="notifications"' in account and 'data-rule="exposure-switch"' \
                in account

        # Edited behind the running server's back: seen at SIGHUP (or within seconds)
        told.set_toml("dicom", "tls_from_anywhere", "true")
        server.proc.send_signal(signal.SIGHUP)
        pending = wait_events(told, "exposure.pending")
        assert pending and "tls_from_anywhere: false -> true" in str(pending[0]["changes"])
        assert pending[0]["verdict"] == "takes effect at the next start"
        mailbox.wait_for("Exposure settings edited on the server")
    finally:
        server.stop()

    # ... and at the next start: applied (the channel is tested), recorded, alerted.
    told.set_toml("dicom", "tls_from_anywhere", "false")
    told.set_toml("web", "remote_access", '"lan"')
    server = start_server(told)
    try:
        assert wait_until(lambda: len(events(told, "exposure.switch")) == 2, 10)
        back = events(told, "exposure.switch")[-1]
        assert back["changes"] == "remote_access: internet -> lan" and back["widened"] == ""
        assert _outside(server, "/login") == 403
    finally:
        server.stop()


def test_no_query_string_in_any_log(told: VaultDir) -> None:
    """OHIF puts patient names in QIDO query strings: none may stay in a log, an error
    page or the trail."""
    v = told.open()
    try:
        v.accounts.add_user("drq", ["physician"], "plume-de-paon-sous-la-pluie")
        token = v.accounts.create_token("drq", "1d").token
    finally:
        v.close()
    server = start_server(told, log_name="serve-qs.log")
    bodies: list[str] = []
    try:
        ca = told.data / "tls" / "ca.crt"
        ctx = ssl.create_default_context(cafile=str(ca))
        with httpx.Client(base_url=f"https://127.0.0.1:{server.https_port}", verify=ctx,
                          timeout=30) as c:
            auth = {"Authorization": f"Bearer {token}",
                    "Accept": "application/dicom+json"}
            ok = c.get("/dicom-web/studies", params={"PatientName": f"{MARKER}*"},
                       headers=auth)
            assert ok.status_code in (200, 204), ok.text
            for path, params, headers in (
                ("/dicom-web/studies", {"PatientName": MARKER, "fuzzymatching": "maybe"},
                 auth),
                ("/dicom-web/studies", {"PatientName": MARKER, "NoSuchKeyword": "1"}, auth),
                ("/dicom-web/studies", {"PatientName": MARKER, "00100010": "x" * 9000},
                 auth),
                ("/dicom-web/studies", {"PatientName": MARKER},
                 {"Accept": "application/dicom+json"}),
                ("/nowhere", {"PatientName": MARKER}, {"Accept": "text/html"}),
                ("/admin/health", {"PatientName": MARKER}, {"Accept": "text/html"}),
            ):
                res = c.get(path, params=params, headers=headers)
                if res.status_code >= 400:  # an error page never repeats the query
                    bodies.append(res.text)
        assert len(bodies) >= 3
        assert wait_events(told, "dicomweb.search", count=2)
    finally:
        server.stop()
    marker = MARKER.encode()
    for body in bodies:
        assert MARKER not in body, body[:300]
    leaked = [p for p in told.root.rglob("*") if p.is_file() and marker in p.read_bytes()]
    assert not leaked, leaked  # server logs, the trail, state files, everything
    for record in events(told):
        assert MARKER not in str(record), record
