"""Detection rules and alert delivery.

The rules are pure logic, so most tests feed synthetic ``AuditEvent``s with chosen times to
a ``Detector`` and move a fake clock: a whole working day replays in milliseconds. Sign-in
events come from the web issue; here they are synthetic events with the agreed action names
(``auth.login``, ``auth.login.failed``, ``auth.account.locked``).

Delivery is tested against real servers on 127.0.0.1 only: an aiosmtpd SMTP server that
requires STARTTLS (certificate from a CA made by the test, trusted through
``smtp_ca_file``) and authentication, and a small https/http webhook receiver. Every
message that leaves is scanned, raw bytes and decoded text, for the patient identifiers
used in the events.
"""

from __future__ import annotations

import datetime as dt
import email
import email.policy
import ipaddress
import json
import os
import socket
import ssl
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pydantic import ValidationError

from pacsvault.audit import AuditEvent, EventCode, Outcome, Recorder
from pacsvault.audit.alerts import (
    Alert,
    AlertConfigError,
    AlertSettings,
    AlertSink,
    Detector,
    Severity,
    render_section,
)
from tests.harness.webhook import Webhook
from tests.helpers import free_port

PARIS = "Europe/Paris"
# Monday 6 May 2024, 10:00 in Paris (08:00 UTC).
MONDAY_10 = dt.datetime(2024, 5, 6, 8, 0, tzinfo=dt.UTC)

# Patient data used in events; none of it may ever appear in an alert.
PATIENT_ID = "PAT-0042-DUPONT"
PATIENT_NAME = "DUPONT^MARIE"
UID_ROOT = "1.2.826.0.1.3680043.8.498.77"


def study_uid(n: int) -> str:
    return f"{UID_ROOT}.{1000 + n}"


def patient_id(n: int) -> str:
    return f"{PATIENT_ID}-{n:03d}"


SECRETS = [PATIENT_ID, PATIENT_NAME, "DUPONT", UID_ROOT]


class Clock:
    """Injectable clock: only decides when grouping windows are over."""

    def __init__(self, now: dt.datetime) -> None:
        self.now = now

    def __call__(self) -> dt.datetime:
        return self.now


def settings(**kw: Any) -> AlertSettings:
    base: dict[str, Any] = {"timezone": PARIS}
    base.update(kw)
    return AlertSettings(**base)


def detector(**kw: Any) -> tuple[Detector, Clock]:
    clock = Clock(MONDAY_10)
    return Detector(settings(**kw), clock=clock), clock


def ev(action: str, at: dt.datetime, *, code: EventCode = EventCode.SECURITY_ALERT,
       outcome: Outcome = Outcome.SUCCESS, **kw: Any) -> AuditEvent:
    return AuditEvent(action=action, outcome=outcome, code=code, time=at, **kw)


def move(at: dt.datetime, node: str, studies: list[str], *, address: str = "192.168.1.20",
         patients: tuple[str, ...] = (), message: str = "") -> list[AuditEvent]:
    """What the Q/R SCP records for one C-MOVE: begin, then the final outcome."""
    common: dict[str, Any] = {
        "actor_ae": node, "actor_address": address, "study_uids": tuple(studies),
        "patient_ids": patients, "message": message,
    }
    return [
        ev("dicom.move.begin", at, code=EventCode.BEGIN_TRANSFERRING,
           detail={"destination": node, "instances": 12}, **common),
        ev("dicom.move", at + dt.timedelta(seconds=20), code=EventCode.INSTANCES_TRANSFERRED,
           detail={"destination": node, "sent": 12}, **common),
    ]


def find(at: dt.datetime, node: str, matches: int) -> AuditEvent:
    return ev("dicom.find", at, code=EventCode.QUERY, actor_ae=node,
              actor_address="192.168.1.21", detail={"level": "STUDY", "matches": matches})


def store(at: dt.datetime, node: str, studies: list[str]) -> AuditEvent:
    return ev("dicom.store.association", at, code=EventCode.INSTANCES_TRANSFERRED,
              actor_ae=node, actor_address="192.168.1.10", study_uids=tuple(studies),
              detail={"stored": 40})


def run(det: Detector, clock: Clock, events: list[AuditEvent]) -> list[Alert]:
    """Feed events in time order, moving the clock and ticking as a worker would."""
    alerts: list[Alert] = []
    for event in sorted(events, key=lambda e: e.time):
        clock.now = event.time
        alerts += det.tick()
        alerts += det.observe(event)
    return alerts


def assert_no_patient_data(text: str | bytes) -> None:
    data = text.encode() if isinstance(text, str) else text
    for secret in SECRETS:
        assert secret.encode() not in data, f"{secret} leaked"


def alert_text(alert: Alert) -> str:
    return " ".join([alert.title, alert.text, alert.look, alert.subject, str(alert.facts)])


# --- rules ------------------------------------------------------------------------------


def test_exposure_alerts_at_once_and_groups_a_scan() -> None:
    det, clock = detector()
    first = det.observe(ev("exposure", MONDAY_10, outcome=Outcome.MAJOR_FAILURE,
                           actor_address="203.0.113.7", detail={"port": "plain"}))
    assert len(first) == 1
    alert = first[0]
    assert alert.rule == "exposure" and alert.severity is Severity.CRITICAL
    assert not alert.summary and alert.count == 1
    assert "203.0.113.7" in alert.text and "port forwarding" in alert.text
    assert "pacsvault audit show --action exposure --since 2024-05-06T07:59" in alert.text

    # An internet scan: 40 more connections from 20 addresses within the group window.
    scan = [ev("exposure", MONDAY_10 + dt.timedelta(seconds=20 * i),
               outcome=Outcome.MAJOR_FAILURE, actor_address=f"198.51.100.{i % 20}",
               detail={"port": "plain"}) for i in range(1, 41)]
    assert run(det, clock, scan) == []
    clock.now = MONDAY_10 + dt.timedelta(minutes=16)
    follow = det.tick()
    assert len(follow) == 1 and follow[0].summary and follow[0].count == 40
    assert "from 20 different sources" in follow[0].text
    assert follow[0].look == alert.look  # the command covers the whole episode
    # Nothing more happened: the group closes silently; the next connection is news again.
    clock.now += dt.timedelta(hours=1)
    assert det.tick() == []
    again = det.observe(ev("exposure", clock.now, actor_address="203.0.113.9"))
    assert len(again) == 1 and not again[0].summary


def test_a_day_long_scan_gives_a_handful_of_messages() -> None:
    det, clock = detector()
    events = [ev("exposure", MONDAY_10 + dt.timedelta(minutes=i), actor_address="203.0.113.7")
              for i in range(24 * 60)]
    alerts = run(det, clock, events)
    clock.now = MONDAY_10 + dt.timedelta(days=1)
    alerts += det.tick() + det.flush()
    assert 1 + sum(a.count for a in alerts if a.summary) == len(events)  # every one counted
    assert len(alerts) <= 12, [a.first_seen for a in alerts]


def test_unknown_node_association_rejected() -> None:
    det, _ = detector()
    alerts = det.observe(ev(
        "dicom.association.rejected", MONDAY_10, outcome=Outcome.MINOR_FAILURE,
        actor_ae="INTRUDER", actor_address="192.168.1.66",
        message="calling AE title is not a registered node",
        detail={"called_ae": "PACSVAULT", "tls": False},
    ))
    assert len(alerts) == 1
    alert = alerts[0]
    assert alert.rule == "unknown-node" and alert.severity is Severity.WARNING
    assert "INTRUDER" in alert.text and "192.168.1.66" in alert.text
    assert "not a registered node" in alert.text
    assert "pacsvault audit show --node INTRUDER" in alert.look
    assert "pacsvault node add" in alert.text
    # The same device retrying is grouped; another device is news.
    assert det.observe(ev("dicom.association.rejected", MONDAY_10 + dt.timedelta(seconds=5),
                          actor_ae="INTRUDER", actor_address="192.168.1.66")) == []
    other = det.observe(ev("dicom.association.rejected", MONDAY_10, actor_ae="SCANNER",
                           actor_address="192.168.1.67"))
    assert len(other) == 1


def test_move_to_unregistered_destination() -> None:
    det, _ = detector()
    alerts = det.observe(ev("dicom.move.unknown_destination", MONDAY_10,
                            outcome=Outcome.SERIOUS_FAILURE, actor_ae="VIEWER",
                            actor_address="192.168.1.20", detail={"destination": "LAPTOP"}))
    assert len(alerts) == 1 and alerts[0].rule == "unknown-node"
    assert "'LAPTOP'" in alerts[0].text and "Nothing was sent" in alerts[0].text


def failed_login(at: dt.datetime, user: str, address: str) -> AuditEvent:
    return ev("auth.login.failed", at, code=EventCode.USER_AUTHENTICATION,
              outcome=Outcome.MINOR_FAILURE, actor_user=user, actor_address=address)


def test_repeated_failed_logins_from_one_address() -> None:
    det, clock = detector()
    tries = [failed_login(MONDAY_10 + dt.timedelta(minutes=2 * i), user, "198.51.100.9")
             for i, user in enumerate(["admin", "admin", "root", "dr.martin", "admin"])]
    alerts = run(det, clock, tries[:4])
    assert alerts == []  # four typos are not an attack
    alerts = run(det, clock, tries[4:])
    assert len(alerts) == 1
    alert = alerts[0]
    assert alert.rule == "failed-logins" and alert.subject == "address:198.51.100.9"
    assert "5 failed sign-ins within 10 minutes from 198.51.100.9" in alert.text
    assert "--action auth.login" in alert.look
    # The guessing run goes on: grouped, not one mail per attempt.
    more = [failed_login(MONDAY_10 + dt.timedelta(minutes=9, seconds=i), "admin",
                         "198.51.100.9") for i in range(50)]
    assert run(det, clock, more) == []


def test_failed_logins_spread_out_stay_silent_and_distributed_guessing_fires() -> None:
    det, clock = detector()
    slow = [failed_login(MONDAY_10 + dt.timedelta(minutes=3 * i), "dr.martin", "192.168.1.30")
            for i in range(10)]  # at most 4 within any 10 minutes
    assert run(det, clock, slow) == []
    det, clock = detector()
    spread = [failed_login(MONDAY_10 + dt.timedelta(minutes=i), "dr.martin", f"203.0.113.{i}")
              for i in range(5)]
    alerts = run(det, clock, spread)
    assert len(alerts) == 1 and alerts[0].subject == "user:dr.martin"
    assert "for user 'dr.martin'" in alerts[0].text


def test_locked_account() -> None:
    det, _ = detector()
    alerts = det.observe(ev("auth.account.locked", MONDAY_10,
                            code=EventCode.USER_AUTHENTICATION, outcome=Outcome.MINOR_FAILURE,
                            actor_user="secretariat", actor_address="192.168.1.31"))
    assert len(alerts) == 1
    assert alerts[0].rule == "account-locked"
    assert "'secretariat' was locked" in alerts[0].text
    assert "--user secretariat" in alerts[0].look


def test_bulk_access_fires_once_on_a_scripted_copy() -> None:
    """A node pulls 60 distinct studies within an hour: one alert, then one follow-up."""
    det, clock = detector()
    start = MONDAY_10 + dt.timedelta(hours=1)
    script = [e for i in range(60)
              for e in move(start + dt.timedelta(seconds=55 * i), "VIEWER2", [study_uid(i)])]
    alerts = run(det, clock, script)
    assert len(alerts) == 1
    alert = alerts[0]
    assert alert.rule == "bulk-access" and alert.severity is Severity.CRITICAL
    assert alert.subject == "node:VIEWER2"
    assert "Node 'VIEWER2' (192.168.1.20) has read 51 different studies" in alert.text
    assert alert.facts["studies"] == 51
    assert "pacsvault audit show --node VIEWER2 --since 2024-05-06T08:45" in alert.look
    assert_no_patient_data(alert_text(alert))
    # After the group window: one follow-up with the count of what came after.
    clock.now = start + dt.timedelta(hours=2)
    follow = det.tick()
    assert len(follow) == 1 and follow[0].summary
    assert "60 different studies" in follow[0].text
    clock.now += dt.timedelta(hours=8)
    assert det.tick() == [] and det.flush() == []


def test_bulk_access_counts_patients_when_known() -> None:
    det, clock = detector(bulk_patients_per_hour=10)
    reads = [ev("dicomweb.retrieve", MONDAY_10 + dt.timedelta(minutes=i),
                code=EventCode.INSTANCES_ACCESSED, actor_user="remplacant",
                actor_address="192.168.1.40", study_uids=(study_uid(i),),
                patient_ids=(patient_id(i),)) for i in range(11)]
    alerts = run(det, clock, reads)
    assert len(alerts) == 1
    assert "User 'remplacant' from 192.168.1.40 has read 11 different studies of 11 " \
           "different patients" in alerts[0].text


def test_bulk_access_resolves_patients_through_the_index() -> None:
    """Q/R events carry study UIDs only; an injected resolver maps them to patients."""
    owners = {study_uid(i): patient_id(i % 12) for i in range(40)}
    det = Detector(settings(bulk_patients_per_hour=10), clock=Clock(MONDAY_10),
                   patients_of=lambda uids: {owners[u] for u in uids})
    alerts: list[Alert] = []
    for i in range(40):
        alerts += det.observe(move(MONDAY_10 + dt.timedelta(minutes=i), "VIEWER",
                                   [study_uid(i)])[0])
    first = [a for a in alerts if not a.summary]
    assert len(first) == 1 and first[0].facts["patients"] == 11


def normal_day() -> list[AuditEvent]:
    """30 studies acquired and read over 8 working hours by 3 nodes, queries included."""
    day = MONDAY_10 - dt.timedelta(hours=2)  # 08:00 Paris
    events: list[AuditEvent] = []
    viewers = ["VIEWER1", "VIEWER2", "VIEWER3"]
    for i in range(30):
        at = day + dt.timedelta(minutes=16 * i)
        events.append(store(at, "MODALITY", [study_uid(i)]))
        reader = viewers[i % 3]
        events += move(at + dt.timedelta(minutes=10), reader, [study_uid(i)])
        # Comparison with a prior exam, and a second opinion by another viewer later.
        if i >= 3:
            events += move(at + dt.timedelta(minutes=11), reader, [study_uid(i - 3)])
        if i % 5 == 0:
            events += move(at + dt.timedelta(minutes=40), viewers[(i + 1) % 3],
                           [study_uid(i)])
    for minute in range(0, 8 * 60, 2):  # study lists refreshed all day, large answers
        events.append(find(day + dt.timedelta(minutes=minute), viewers[minute % 3], 200))
    for who in ("dr.martin", "dr.bernard", "secretariat"):  # sign-ins, one typo each
        at = day + dt.timedelta(minutes=5)
        events.append(failed_login(at, who, "192.168.1.50"))
        events.append(ev("auth.login", at + dt.timedelta(seconds=30),
                         code=EventCode.USER_AUTHENTICATION, actor_user=who,
                         actor_address="192.168.1.50"))
    return events


def test_a_normal_day_stays_silent() -> None:
    det, clock = detector()
    events = normal_day()
    alerts = run(det, clock, events)
    clock.now = MONDAY_10 + dt.timedelta(days=1)
    alerts += det.tick() + det.flush()
    assert alerts == [], [a.title for a in alerts]
    reads = {u for e in events if e.action == "dicom.move" for u in e.study_uids}
    assert len(reads) == 30


def test_bulk_threshold_is_per_hour_not_per_day() -> None:
    det, clock = detector()
    slow = [e for i in range(120)
            for e in move(MONDAY_10 + dt.timedelta(minutes=3 * i), "VIEWER", [study_uid(i)])]
    assert run(det, clock, slow) == []  # 120 studies in 6 hours: 20 an hour
    det, clock = detector()
    exactly = [e for i in range(50)
               for e in move(MONDAY_10 + dt.timedelta(minutes=i), "VIEWER", [study_uid(i)])]
    assert run(det, clock, exactly) == []  # alert only above the threshold


def test_unusual_hours() -> None:
    det, clock = detector()
    sunday_3am = dt.datetime(2024, 5, 5, 1, 0, tzinfo=dt.UTC)  # 03:00 in Paris
    alerts = run(det, clock, move(sunday_3am, "VIEWER", [study_uid(1)]))
    assert len(alerts) == 1
    alert = alerts[0]
    assert alert.rule == "unusual-hours" and alert.subject == "node:VIEWER"
    assert "Node 'VIEWER' (192.168.1.20) retrieved images on Sunday 05 May 2024 at 03:00" \
        in alert.text
    assert "07:00-20:00" in alert.text
    assert "--node VIEWER --since 2024-05-05T00:55" in alert.look
    # Sunday is not a business day even at 10:00; an evening sign-in is out of hours too.
    det, clock = detector()
    assert len(run(det, clock, move(dt.datetime(2024, 5, 5, 8, 0, tzinfo=dt.UTC), "VIEWER",
                                    [study_uid(1)]))) == 1
    late_login = ev("auth.login", dt.datetime(2024, 5, 6, 19, 30, tzinfo=dt.UTC),
                    code=EventCode.USER_AUTHENTICATION, actor_user="dr.martin")
    login_alerts = det.observe(late_login)
    assert len(login_alerts) == 1 and "signed in" in login_alerts[0].text
    # Images arriving at night (a modality's queue) and study-list queries are not reads.
    det, clock = detector()
    night = dt.datetime(2024, 5, 7, 0, 30, tzinfo=dt.UTC)
    assert run(det, clock, [store(night, "MODALITY", [study_uid(2)]),
                            find(night, "VIEWER", 3)]) == []
    # Monday 10:00 is a working hour.
    assert run(det, clock, move(MONDAY_10, "VIEWER", [study_uid(3)])) == []


def test_overnight_business_hours_and_days() -> None:
    det, clock = detector(business_hours="20:00-08:00", business_days=["sun"])
    sunday_3am = dt.datetime(2024, 5, 5, 1, 0, tzinfo=dt.UTC)
    assert run(det, clock, move(sunday_3am, "VIEWER", [study_uid(1)])) == []
    assert len(run(det, clock, move(MONDAY_10, "VIEWER", [study_uid(2)]))) == 1


def test_audit_verify_failure() -> None:
    det, _ = detector()
    assert det.observe(ev("audit.verify", MONDAY_10, code=EventCode.APPLICATION_ACTIVITY,
                          actor_user="local-admin")) == []
    alerts = det.observe(ev(
        "audit.verify", MONDAY_10, outcome=Outcome.MAJOR_FAILURE, actor_user="local-admin",
        message="record 17 (line 17) was altered or forged: its signature does not match",
    ))
    assert len(alerts) == 1
    alert = alerts[0]
    assert alert.rule == "audit-broken" and alert.severity is Severity.CRITICAL
    assert "record 17 (line 17) was altered" in alert.text
    assert alert.look == "pacsvault audit verify"


def test_disk_full() -> None:
    det, clock = detector()
    refused = ev("dicom.store.failed", MONDAY_10, code=EventCode.INSTANCES_TRANSFERRED,
                 outcome=Outcome.SERIOUS_FAILURE, actor_ae="MODALITY",
                 actor_address="192.168.1.10",
                 message="status A700: free disk space below the configured reserve")
    alerts = det.observe(refused)
    assert len(alerts) == 1
    assert alerts[0].rule == "disk-full" and alerts[0].severity is Severity.CRITICAL
    assert "node 'MODALITY'" in alerts[0].text and "A700" in alerts[0].text
    # Every refused image of the modality's queue: grouped.
    assert run(det, clock, [refused] * 30) == []
    other = ev("dicom.store.failed", MONDAY_10, code=EventCode.INSTANCES_TRANSFERRED,
               actor_ae="MODALITY", message="status C000: unreadable: truncated")
    assert det.observe(other) == []
    # The free-space check warns before images are refused.
    gib = 1024 ** 3
    assert det.observe_disk(50 * gib, 500 * gib) == []
    low = det.observe_disk(1 * gib, 500 * gib)
    assert len(low) == 1 and low[0].severity is Severity.WARNING
    assert "Only 1024 MB are free" in low[0].text
    assert detector(disk_warn_free_mb=0)[0].observe_disk(0, 500 * gib) == []


def test_own_events_disabled_rules_and_switch() -> None:
    det, _ = detector(disabled_rules=["exposure"])
    assert det.observe(ev("exposure", MONDAY_10, actor_address="203.0.113.7")) == []
    assert det.observe(ev("alert.sent", MONDAY_10, actor_user="x")) == []
    det, _ = detector(enabled=False)
    assert det.observe(ev("auth.account.locked", MONDAY_10, actor_user="x")) == []


def test_no_alert_text_carries_patient_data() -> None:
    det, clock = detector(bulk_patients_per_hour=5)
    night = dt.datetime(2024, 5, 5, 1, 0, tzinfo=dt.UTC)
    events = [e for i in range(60)
              for e in move(night + dt.timedelta(seconds=30 * i), "VIEWER2", [study_uid(i)],
                            patients=(patient_id(i),),
                            message=f"moved {PATIENT_NAME} for {patient_id(i)}")]
    events.append(ev("exposure", night, actor_address="203.0.113.7",
                     patient_ids=(PATIENT_ID,)))
    alerts = run(det, clock, events) + det.flush()
    assert {a.rule for a in alerts} == {"bulk-access", "unusual-hours", "exposure"}
    for alert in alerts:
        assert_no_patient_data(alert_text(alert))


def test_settings() -> None:
    defaults = AlertSettings()
    assert defaults.enabled and not defaults.mail_enabled
    assert defaults.smtp_security == "starttls" and defaults.smtp_port == 587
    assert defaults.bulk_studies_per_hour == 50 and defaults.group_minutes == 15
    assert defaults.business_days == ["mon", "tue", "wed", "thu", "fri", "sat"]
    section = tomllib.loads(render_section())["alerts"]
    assert AlertSettings.model_validate(section) == defaults
    for bad in (
        {"webhook_url": "http://example.org/hook"},
        {"webhook_url": "http://127.0.0.1/hook"},  # loopback http needs the explicit flag
        {"smtp_host": "mail.example.org", "smtp_security": "none"},
        {"smtp_username": "alerts"},  # a user without a password file
        {"disabled_rules": ["nope"]},
        {"mail_to": ["a@b.fr\r\nBcc: x@y.z"]},
        {"business_hours": "7h-20h"},
        {"timezone": "Mars/Olympus"},
        {"smtp_password": "in-the-toml"},
    ):
        with pytest.raises(ValidationError):
            AlertSettings.model_validate(bad)
    AlertSettings(webhook_url="http://127.0.0.1:9/hook", webhook_allow_http_loopback=True)
    AlertSettings(smtp_host="localhost", smtp_security="none", smtp_port=25)


# --- delivery: real servers on loopback -------------------------------------------------


@dataclass
class Pki:
    ca: Path
    cert: Path
    key: Path

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.cert, self.key)
        return ctx


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A test CA and a server certificate for 127.0.0.1, made with ``cryptography``."""
    root = tmp_path_factory.mktemp("pki")
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "alerts test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                       False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = Pki(root / "ca.pem", root / "server.pem", root / "server.key")
    paths.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths.key.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                            serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))
    return paths


class CaptureSink:
    def __init__(self) -> None:
        self.events: list[AuditEvent] = []

    def write(self, event: AuditEvent) -> None:
        self.events.append(event)

    def actions(self, prefix: str) -> list[AuditEvent]:
        return [e for e in self.events if e.action.startswith(prefix)]


@dataclass
class Mailbox:
    port: int
    messages: list[bytes] = field(default_factory=list)
    tls_used: list[bool] = field(default_factory=list)
    logins: list[bytes] = field(default_factory=list)

    def wait(self, count: int, timeout: float = 20) -> list[bytes]:
        deadline = time.monotonic() + timeout
        while len(self.messages) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.messages


@pytest.fixture
def smtp_server(pki: Pki) -> Iterator[Mailbox]:
    """aiosmtpd on 127.0.0.1: STARTTLS required, then AUTH, like a provider's port 587."""
    box = Mailbox(free_port())

    class Handler:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            box.messages.append(bytes(envelope.original_content or envelope.content))
            box.tls_used.append(session.ssl is not None)
            return "250 OK"

    def authenticator(server: Any, session: Any, envelope: Any, mechanism: str,
                      data: Any) -> AuthResult:
        ok = isinstance(data, LoginPassword) and data.login == b"alerts" \
            and data.password == b"correct horse"
        if ok:
            box.logins.append(data.login)
        return AuthResult(success=ok)

    controller = Controller(
        Handler(), hostname="127.0.0.1", port=box.port, tls_context=pki.server_context(),
        require_starttls=True, auth_required=True, auth_require_tls=True,
        authenticator=authenticator,
    )
    controller.start()
    try:
        yield box
    finally:
        controller.stop()


def secret_file(path: Path, value: str, mode: int = 0o600) -> Path:
    path.write_text(value + "\n")
    os.chmod(path, mode)
    return path


def mail_settings(box: Mailbox, pki: Pki, tmp_path: Path, **kw: Any) -> AlertSettings:
    values: dict[str, Any] = {
        "server_name": "cabinet-radiologie", "smtp_host": "127.0.0.1", "smtp_port": box.port,
        "smtp_username": "alerts",
        "smtp_password_file": str(secret_file(tmp_path / "smtp.pw", "correct horse")),
        "smtp_ca_file": str(pki.ca), "mail_from": "pacsvault@cabinet.example",
        "mail_to": ["dr.martin@cabinet.example", "dpo@cabinet.example"],
        "business_hours": "00:00-24:00", "business_days": list(
            ("mon", "tue", "wed", "thu", "fri", "sat", "sun")),
        "smtp_timeout": 10,
    }
    values.update(kw)
    return AlertSettings(**values)


def test_alerts_reach_a_real_smtp_server_without_patient_data(
    smtp_server: Mailbox, pki: Pki, tmp_path: Path,
) -> None:
    capture = CaptureSink()
    recorder = Recorder([capture])
    sink = AlertSink(mail_settings(smtp_server, pki, tmp_path), recorder, retry_delays=(),
                     tick_seconds=0.1)
    recorder.add_sink(sink)
    try:
        now = dt.datetime.now(dt.UTC)
        recorder.emit(ev("exposure", now, outcome=Outcome.MAJOR_FAILURE,
                         actor_address="203.0.113.50", detail={"port": "plain"}))
        for i in range(60):
            for event in move(now, "VIEWER2", [study_uid(i)], patients=(patient_id(i),),
                              message=f"{PATIENT_NAME} {patient_id(i)}"):
                recorder.emit(event)
        assert sink.flush(30)
    finally:
        sink.close()
    # The exposure, the bulk access, and at close the follow-up of its grouped repeats.
    raw_messages = smtp_server.wait(3)
    assert len(raw_messages) == 3 and all(smtp_server.tls_used)
    assert smtp_server.logins == [b"alerts"] * 3
    subjects = []
    for raw in raw_messages:
        assert_no_patient_data(raw)
        msg = email.message_from_bytes(raw, policy=email.policy.default)
        body = msg.get_body(("plain",))
        assert body is not None
        text = body.get_content()
        assert_no_patient_data(text)
        assert "never contains patient data" in text and "Where to look:" in text
        assert msg["To"] == "dr.martin@cabinet.example, dpo@cabinet.example"
        assert msg["Auto-Submitted"] == "auto-generated"
        subjects.append(str(msg["Subject"]))
    assert "[pacsvault cabinet-radiologie] CRITICAL: Server reachable from the internet" \
        in subjects
    assert "[pacsvault cabinet-radiologie] CRITICAL: Unusually large access to patient " \
        "images" in subjects
    assert any("repeats, grouped" in s for s in subjects)
    # Each alert is itself an audit event; the later over-threshold reads were grouped
    # into the follow-up sent at close, not mailed one by one.
    sent = capture.actions("alert.")
    assert [e.action for e in sent] == ["alert.sent"] * 3
    assert all(e.code is EventCode.SECURITY_ALERT and e.detail["mail"] == "sent"
               for e in sent)
    assert sent[-1].detail["follow_up"] is True and sent[-1].detail["rule"] == "bulk-access"
    assert sent[-1].detail["count"] == 39  # over 40 patients from the 41st study on
    assert sent[1].actor_ae == "VIEWER2"


def test_mail_refused_to_an_unverified_server(smtp_server: Mailbox, pki: Pki,
                                              tmp_path: Path) -> None:
    """Without the test CA, the system CAs do not vouch for the server: nothing is sent."""
    capture = CaptureSink()
    recorder = Recorder([capture])
    sink = AlertSink(mail_settings(smtp_server, pki, tmp_path, smtp_ca_file=""), recorder,
                     retry_delays=())
    recorder.add_sink(sink)
    recorder.emit(ev("auth.account.locked", dt.datetime.now(dt.UTC), actor_user="dr.martin"))
    assert sink.flush(30)
    sink.close()
    assert smtp_server.messages == []
    failed = capture.actions("alert.")
    assert [e.action for e in failed] == ["alert.failed"]
    assert failed[0].outcome is Outcome.SERIOUS_FAILURE
    assert "CERTIFICATE_VERIFY_FAILED" in failed[0].message
    assert failed[0].actor_user == "dr.martin"


def test_secret_files_must_be_private(smtp_server: Mailbox, pki: Pki, tmp_path: Path) -> None:
    values = mail_settings(smtp_server, pki, tmp_path).model_dump()
    values["smtp_password_file"] = str(secret_file(tmp_path / "open.pw", "x", 0o644))
    with pytest.raises(AlertConfigError, match="chmod 600"):
        AlertSink(AlertSettings(**values), Recorder(), start=False)
    values["smtp_password_file"] = str(tmp_path / "missing.pw")
    with pytest.raises(AlertConfigError, match="cannot be read"):
        AlertSink(AlertSettings(**values), Recorder(), start=False)


def test_write_never_blocks_on_a_stuck_mail_server(tmp_path: Path) -> None:
    """A mail server that accepts TCP and never answers must not slow the DICOM thread."""
    with socket.socket() as stuck:
        stuck.bind(("127.0.0.1", 0))
        stuck.listen(8)
        port = stuck.getsockname()[1]
        capture = CaptureSink()
        recorder = Recorder([capture])
        sink = AlertSink(AlertSettings(smtp_host="127.0.0.1", smtp_port=port,
                                       mail_to=["dpo@cabinet.example"], smtp_timeout=2),
                         recorder, retry_delays=())
        recorder.add_sink(sink)
        started = time.monotonic()
        for i in range(200):
            recorder.emit(ev("exposure", dt.datetime.now(dt.UTC),
                             actor_address=f"203.0.113.{i % 250}"))
        assert time.monotonic() - started < 0.5
        sink.close(timeout=20)
    failed = capture.actions("alert.failed")
    assert failed and "timed out" in failed[0].message.lower()


def test_webhook_receives_json_over_https(pki: Pki, tmp_path: Path) -> None:
    hook = Webhook(200, pki.server_context(), "/hooks/pacs")
    try:
        capture = CaptureSink()
        recorder = Recorder([capture])
        sink = AlertSink(AlertSettings(
            server_name="cabinet", webhook_url=hook.url, webhook_ca_file=str(pki.ca),
            webhook_token_file=str(secret_file(tmp_path / "hook.token", "t0ken")),
        ), recorder, retry_delays=())
        recorder.add_sink(sink)
        recorder.emit(ev("audit.verify", dt.datetime.now(dt.UTC),
                         outcome=Outcome.MAJOR_FAILURE, actor_user="local-admin",
                         message="record 3 (line 3) does not follow record 1",
                         patient_ids=(PATIENT_ID,)))
        assert sink.flush(30)
        sink.send_test()  # what an "alert test" command would call
        sink.close()
    finally:
        hook.close()
    assert len(hook.bodies) == 2 and hook.auth == ["Bearer t0ken"] * 2
    assert hook.bodies[1]["rule"] == "test"
    body = hook.bodies[0]
    assert body["source"] == "pacsvault" and body["server"] == "cabinet"
    assert body["rule"] == "audit-broken" and body["severity"] == "critical"
    assert body["where_to_look"] == "pacsvault audit verify"
    assert "record 3 (line 3)" in body["text"]
    assert_no_patient_data(json.dumps(body))
    sent = capture.actions("alert.")
    assert [e.action for e in sent] == ["alert.sent"] * 2
    assert sent[0].detail["webhook"] == "sent" and sent[0].detail["mail"] == "off"


@pytest.mark.parametrize("status", [500, 302])
def test_webhook_errors_and_redirects_are_failures(status: int) -> None:
    hook = Webhook(status, None, "/hooks/pacs")
    try:
        capture = CaptureSink()
        recorder = Recorder([capture])
        sink = AlertSink(AlertSettings(webhook_url=hook.url, webhook_allow_http_loopback=True),
                         recorder, retry_delays=(0.01,))
        recorder.add_sink(sink)
        recorder.emit(ev("auth.account.locked", dt.datetime.now(dt.UTC), actor_user="x"))
        assert sink.flush(30)
        sink.close()
    finally:
        hook.close()
    assert len(hook.bodies) == 2  # first attempt and one retry, no redirect followed
    failed = capture.actions("alert.")
    assert [e.action for e in failed] == ["alert.failed"]
    assert f"HTTP {status}" in failed[0].message


def test_alert_with_no_channel_is_recorded_in_the_trail_only() -> None:
    """Issue 12, defect 8: with no mail nor webhook configured (the default), an alert is
    not a delivery failure: it is recorded as kept in the audit trail only, not as
    ``alert.failed serious_failure`` at every alert."""
    capture = CaptureSink()
    recorder = Recorder([capture])
    sink = AlertSink(AlertSettings(), recorder)
    recorder.add_sink(sink)
    recorder.emit(ev("exposure", dt.datetime.now(dt.UTC), actor_address="203.0.113.7"))
    assert sink.flush(10)
    sink.close()
    recorded = capture.actions("alert.")
    assert [e.action for e in recorded] == ["alert.recorded"]
    assert recorded[0].outcome == Outcome.SUCCESS
    assert recorded[0].detail["delivered"] == "trail"
    assert "audit trail only" in recorded[0].message
    assert "no e-mail or webhook is configured" in recorded[0].message
    # Its own events went through the recorder to the sink too, and were ignored.
    assert len(capture.actions("alert.")) == 1


def test_forwarding_that_keeps_failing_is_alerted_and_can_be_disabled() -> None:
    failing = ev("forward.failing", MONDAY_10, outcome=Outcome.SERIOUS_FAILURE,
                 detail={"destination": "RADIOWS", "instances": 3, "attempts": 5})
    det, _clock = detector()
    alerts = det.observe(failing)
    assert [(a.rule, a.subject) for a in alerts] == [("forwarding", "RADIOWS")]
    assert "RADIOWS" in alerts[0].title and "3 image(s)" in alerts[0].text
    quiet, _ = detector(disabled_rules=["forwarding"])
    assert quiet.observe(failing) == []


def test_the_serving_resolver_counts_a_patient_once(tmp_path: Path) -> None:
    """``serve``'s study -> patient resolver speaks the events' own key space (Patient
    ID): a patient named by an event's ``patient_ids`` and by its study is one patient."""
    from pydicom import dcmread

    from pacsvault.cli.serving import patients_of
    from tests.corpus import build
    from tests.helpers import make_vault

    made = make_vault(tmp_path / "v")
    files = build(tmp_path / "corpus")[:1]
    vault = made.open()
    try:
        vault.archive.store(files[0].path.read_bytes(), source_ae="TEST")
        [item] = list(vault.archive.locate())
        resolve = patients_of(vault)
        ds = dcmread(files[0].path, stop_before_pixels=True)
        assert resolve([item.study_uid]) == {str(ds.PatientID)}
        det = Detector(settings(bulk_patients_per_hour=10), clock=Clock(MONDAY_10),
                       patients_of=resolve)
        det.observe(ev("dicomweb.retrieve", MONDAY_10, code=EventCode.INSTANCES_ACCESSED,
                       actor_user="doc", actor_address="192.168.1.40",
                       study_uids=(item.study_uid,), patient_ids=(str(ds.PatientID),)))
        assert [w.distinct for w in det._patients.values()] == [1]
    finally:
        vault.close()
