"""Issue 11, defect 12: tampering with the trail while the server runs is alerted.

Four edits an intruder with write access to the data directory could make while the
archive is running: change a record, delete one, cut the tail, append a forged record
(re-chained, signed with another key). Each time the practice's webhook must receive the
``audit-broken`` alert within a minute (the check runs every ``[audit] check_seconds``,
set to 2 s here, and on every append).
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from pacsvault.audit import AuditEvent, EventCode, Outcome
from tests.harness.webhook import Webhook
from tests.helpers import VaultDir, make_vault, start_server

pytestmark = pytest.mark.slow

ALERT_WITHIN = 60.0


def _canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _edit(lines: list[bytes]) -> list[bytes]:
    lines[2] = lines[2].replace(b'"action":"', b'"action":"x', 1)
    return lines


def _delete(lines: list[bytes]) -> list[bytes]:
    del lines[2]
    return lines


def _truncate(lines: list[bytes]) -> list[bytes]:
    return lines[:-2]


def _forge(lines: list[bytes]) -> list[bytes]:
    """A well-formed next record, chained to the last one, signed with another key."""
    last = json.loads(lines[-1])
    last.pop("sig")
    forged = dict(last, seq=int(last["seq"]) + 1,
                  prev=hashlib.sha256(_canonical(last)).hexdigest(),
                  action="node.remove", message="forged")
    forged.pop("refs", None)
    digest = hashlib.sha256(_canonical(forged)).digest()
    forged["sig"] = base64.b64encode(Ed25519PrivateKey.generate().sign(digest)).decode()
    return [*lines, _canonical(forged)]


def _trail(vault: VaultDir) -> Path:
    return vault.data / "audit" / "trail.jsonl"


@pytest.mark.timeout(150)
@pytest.mark.parametrize("tamper", [_edit, _delete, _truncate, _forge],
                         ids=["edit-a-line", "delete-a-line", "truncate-the-tail",
                              "append-a-forged-line"])
def test_running_server_alerts_within_a_minute(
    tamper: Callable[[list[bytes]], list[bytes]], hook: Webhook, tmp_path: Path
) -> None:
    vault = make_vault(tmp_path / "v")
    v = vault.open()
    try:  # a few records before the server starts
        for n in range(5):
            v.recorder.emit(AuditEvent(action="test.before", outcome=Outcome.SUCCESS,
                                       code=EventCode.APPLICATION_ACTIVITY, detail={"n": n}))
    finally:
        v.close()
    vault.set_toml("audit", "check_seconds", "2")
    vault.set_toml("alerts", "webhook_url", json.dumps(hook.url))
    vault.set_toml("alerts", "webhook_allow_http_loopback", "true")
    server = start_server(vault)
    try:
        time.sleep(1.0)  # past start-up (its own records and first check)
        assert len(_trail(vault).read_bytes().split(b"\n")) > 5
        assert not [b for b in hook.bodies if b["rule"] == "audit-broken"]
        path = _trail(vault)
        lines = path.read_bytes().split(b"\n")[:-1]
        path.write_bytes(b"\n".join(tamper(lines)) + b"\n")
        started = time.monotonic()
        alerts: list[dict[str, Any]] = []
        while time.monotonic() - started < ALERT_WITHIN and not alerts:
            alerts = [b for b in hook.bodies if b["rule"] == "audit-broken"]
            time.sleep(0.2)
        elapsed = time.monotonic() - started
        assert alerts, f"no alert within {ALERT_WITHIN:.0f} s:\n{server.log()}"
        assert alerts[0]["severity"] == "critical"
        assert "changed while the server was running" in alerts[0]["text"]
        assert elapsed < ALERT_WITHIN
        print(f"{tamper.__name__}: alerted after {elapsed:.1f} s")
        assert server.alive()
    finally:
        server.stop()
