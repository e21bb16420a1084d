"""Issue 19: a widening exposure switch is refused when the security check's network
section reports something critical, even though an alert channel delivered its test.

The vault is made by ``init --alert-email`` to a local SMTP server (aiosmtpd on
127.0.0.1), which receives init's test: the channel condition holds. A first run of the
real server, with the trusted networks narrowed to 127.0.0.1/32, is reached from
127.0.0.2 (outside them): a real ``exposure`` event, so the network section's
``network.exposure-events`` is critical for 30 days. Internet mode asked for then is
refused at the next start for that reason alone: in English in the log, the trail and
the alert mail, in French on the Health page (and in English there too).
"""

from __future__ import annotations

import email
import email.policy
import html
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
    pv,
    start_server,
    wait_events,
)
from tests.web_helpers import client, sign_in

pytestmark = pytest.mark.slow

REASON_EN = ("the security check's network section reports network.exposure-events "
             "(run 'pacsvault check')")
REASON_FR = ("la partie réseau du contrôle de sécurité signale network.exposure-events "
             "(run 'pacsvault check')")


@dataclass
class Mailbox:
    port: int
    messages: list[EmailMessage] = field(default_factory=list)

    def wait_for(self, text: str, timeout: float = 30) -> EmailMessage:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for message in list(self.messages):
                if text in str(message["Subject"]):
                    return message
            time.sleep(0.05)
        raise AssertionError(f"no mail with {text!r} in its subject: "
                             f"{[str(m['Subject']) for m in self.messages]}")


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
def reached(tmp_path_factory: pytest.TempPathFactory, mailbox: Mailbox) -> VaultDir:
    """A vault with a tested alert channel, reached once from outside its networks."""
    root = tmp_path_factory.mktemp("reached")
    key = root / "keys" / "master.key"
    proc = pv("init", "--data", root / "data", "--key-file", key, "--ae-title", AE,
              "--admin", "admin", "--alert-email", "dr.martin@example.org",
              "--smtp-host", f"127.0.0.1:{mailbox.port}", "--smtp-security", "none")
    assert "A test alert was sent by mail" in proc.stderr, proc.stderr
    found = first_run_secrets(proc.stdout)
    vault = VaultDir(root, key, found.recovery_code, found.admin_password, found.admin_name)
    vault.set_toml("dicom", "trusted_networks", '["127.0.0.1/32"]')  # narrowing: taken
    server = start_server(vault)
    try:
        assert _outside(server, "/login") == 403
        assert wait_events(vault, "exposure", lambda e: e["address"] == "127.0.0.2")
    finally:
        server.stop()
    return vault


def _outside(server: Server, path: str) -> int:
    """Status of a GET from 127.0.0.2 (outside the narrowed trusted networks)."""
    ctx = ssl.create_default_context(cafile=str(server.vault.data / "tls" / "ca.crt"))
    transport = httpx.HTTPTransport(verify=ctx, local_address="127.0.0.2")
    with httpx.Client(base_url=f"https://127.0.0.1:{server.https_port}",
                      transport=transport, timeout=30) as c:
        return c.get(path).status_code


def test_internet_mode_refused_while_the_network_section_is_critical(
        reached: VaultDir, mailbox: Mailbox) -> None:
    reached.set_toml("web", "remote_access", '"internet"')
    server = start_server(reached)
    try:
        log = server.log()
        assert "EXPOSURE CHANGE REFUSED" in log and REASON_EN in log, log
        assert "no alert channel" not in log  # the channel condition held: this one alone
        refused = wait_events(reached, "exposure.refused")
        assert refused and refused[0]["reasons"] == REASON_EN
        assert "remote_access: lan -> internet" in str(refused[0]["changes"])
        assert refused[0]["kept"] == "lan only"
        assert events(reached, "exposure.switch") == []
        mail = mailbox.wait_for("Exposure change refused")
        assert "network.exposure-events" in mail.get_content()
        assert _outside(server, "/login") == 403  # still the practice network only
        with client(server.https_port, reached.data / "tls" / "ca.crt") as browser:
            sign_in(browser, reached.admin_name, reached.admin_password)
            english, french = (
                html.unescape(browser.get("/admin/health",
                                          headers={"accept-language": lang}).text)
                for lang in ("en", "fr"))
    finally:
        server.stop()
        reached.set_toml("web", "remote_access", '"lan"')
    assert 'id="exposure-refused"' in english and REASON_EN in english, english
    assert "remote_access = internet" in english
    assert 'id="exposure-refused"' in french and REASON_FR in french, french
    assert REASON_EN not in french
