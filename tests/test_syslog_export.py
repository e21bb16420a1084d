"""Audit export to an ATNA collector: DICOM audit messages over syslog/TLS, queued when down.

The collector is Debian's real ``rsyslogd`` with its GnuTLS stream driver, started by the
test as a child process on 127.0.0.1 (``imtcp`` + ``StreamDriver.Mode=1``, RFC 5425
octet-counted frames) and writing what it receives as JSON lines. It is installed by
``scripts/install.sh --test`` (packages ``rsyslog`` and ``rsyslog-gnutls``); its service
is never started, only our own instance with our own configuration.

What a reader of the trail would rely on is checked on what the collector actually stored:
the syslog header (PRI, MSGID, APP-NAME, BOM) and the AuditMessage XML against the
DICOM PS3.15 A.5.1 schema's rules; then the collector is stopped, events are produced
(they wait encrypted on disk, no patient identifier readable there), the collector is
started again on the same port, and every event arrives, in order.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import json
import logging
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pacsvault.audit import AuditEvent, EventCode, Outcome, Recorder
from pacsvault.audit.atna import AuditMessageBuilder
from pacsvault.audit.syslog import (
    BOM,
    SyslogQueue,
    SyslogSettings,
    SyslogSink,
    format_record,
    frame,
)
from pacsvault.crypto.objects import ObjectFormatError
from tests.helpers import free_port

RSYSLOGD = "/usr/sbin/rsyslogd"
PATIENT = "PAT-SECRET-4711"
STUDY = "1.2.826.0.1.3680043.8.498.4711000001"
STUDY_2 = "1.2.826.0.1.3680043.8.498.4711000002"
SOP = "1.2.826.0.1.3680043.8.498.4711000001.1"


# --- certificates ----------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A throw-away CA and a collector certificate for 127.0.0.1."""
    root = tmp_path_factory.mktemp("pki")
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder().subject_name(_name("collector test CA"))
        .issuer_name(_name("collector test CA")).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder().subject_name(_name("collector"))
        .issuer_name(ca.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = Pki(root / "ca.pem", root / "collector.pem", root / "collector.key")
    paths.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths.server_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths.server_key.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    paths.server_key.chmod(0o600)
    return paths


# --- the collector: Debian's rsyslogd --------------------------------------------------


class Rsyslog:
    """Our own rsyslogd instance (foreground child), TLS syslog on 127.0.0.1:port."""

    def __init__(self, root: Path, pki: Pki, port: int) -> None:
        if not Path(RSYSLOGD).exists():
            raise RuntimeError(f"{RSYSLOGD} missing: install Debian's rsyslog and "
                               "rsyslog-gnutls (scripts/install.sh --test does)")
        self.root, self.pki, self.port = root, pki, port
        self.output = root / "received.jsonl"
        self.conf = root / "rsyslog.conf"
        self.pidfile = root / "rsyslogd.pid"
        (root / "work").mkdir(parents=True, exist_ok=True)
        self.conf.write_text(f"""\
global(workDirectory="{root / 'work'}" maxMessageSize="64k"
       parser.escapeControlCharactersOnReceive="off"
       defaultNetstreamDriver="gtls"
       defaultNetstreamDriverCAFile="{pki.ca}"
       defaultNetstreamDriverCertFile="{pki.server_cert}"
       defaultNetstreamDriverKeyFile="{pki.server_key}")
module(load="imtcp" streamDriver.name="gtls" streamDriver.mode="1"
       streamDriver.authMode="anon")
input(type="imtcp" address="127.0.0.1" port="{port}")
template(name="fields" type="list" option.jsonf="on") {{
  property(outname="pri" name="pri" format="jsonf")
  property(outname="version" name="protocol-version" format="jsonf")
  property(outname="hostname" name="hostname" format="jsonf")
  property(outname="appname" name="app-name" format="jsonf")
  property(outname="procid" name="procid" format="jsonf")
  property(outname="msgid" name="msgid" format="jsonf")
  property(outname="sd" name="structured-data" format="jsonf")
  property(outname="msg" name="msg" format="jsonf")
}}
if $app-name == "pacsvault" then {{
  action(type="omfile" file="{self.output}" template="fields")
}}
""")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.pidfile.unlink(missing_ok=True)
        with open(self.root / "rsyslogd.log", "ab") as log:
            self.proc = subprocess.Popen(
                [RSYSLOGD, "-n", "-f", str(self.conf), "-i", str(self.pidfile)],
                stdout=log, stderr=subprocess.STDOUT,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop(signal.SIGKILL)  # never leave a collector running behind a failure
            raise

    def _wait_ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + 20
        context = ssl.create_default_context(cafile=str(self.pki.ca))
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError("rsyslogd exited: "
                                   + (self.root / "rsyslogd.log").read_text(errors="replace"))
            try:  # ready once a TLS handshake completes
                with socket.create_connection(("127.0.0.1", self.port), timeout=2) as raw, \
                        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls, \
                        contextlib.suppress(OSError, ssl.SSLError):
                    tls.unwrap()
                return
            except (OSError, ssl.SSLError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def stop(self, how: signal.Signals = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(how)
            self.proc.wait(timeout=20)
        self.proc = None

    def records(self) -> list[dict[str, str]]:
        if not self.output.exists():
            return []
        return [json.loads(line) for line in self.output.read_text("utf-8").splitlines()
                if line.strip()]

    def wait_for(self, count: int, timeout: float = 30) -> list[dict[str, str]]:
        deadline = time.monotonic() + timeout
        while True:
            records = self.records()
            if len(records) >= count or time.monotonic() > deadline:
                return records
            time.sleep(0.05)


@pytest.fixture
def collector(tmp_path: Path, pki: Pki) -> Iterator[Rsyslog]:
    receiver = Rsyslog(tmp_path / "collector", pki, free_port())
    receiver.start()
    yield receiver
    receiver.stop()


# --- the DICOM audit message schema (PS3.15 A.5.1.1), as checks ---------------------------

_CODED = {"csd-code", "codeSystemName", "displayName", "originalText"}


def _coded(element: ET.Element) -> None:
    """CodedValueType: csd-code, codeSystemName and originalText are mandatory."""
    assert set(element.attrib) <= _CODED, element.attrib
    for name in ("csd-code", "codeSystemName", "originalText"):
        assert element.get(name), f"{element.tag} lacks {name}"


def _order(element: ET.Element, pattern: str) -> None:
    tags = "".join(f"{child.tag} " for child in element)
    assert re.fullmatch(pattern, tags), f"{element.tag} children out of schema: {tags!r}"


def check_audit_message(root: ET.Element) -> None:
    """Everything A.5.1.1 makes mandatory, each enumeration, and the element order."""
    assert root.tag == "AuditMessage"
    _order(root, r"EventIdentification (ActiveParticipant )+AuditSourceIdentification "
                 r"(ParticipantObjectIdentification )*")

    event = root.find("EventIdentification")
    assert event is not None
    assert set(event.attrib) <= {"EventActionCode", "EventDateTime", "EventOutcomeIndicator"}
    assert event.get("EventActionCode", "E") in {"C", "R", "U", "D", "E"}
    assert event.get("EventOutcomeIndicator") in {"0", "4", "8", "12"}
    when = dt.datetime.fromisoformat(str(event.get("EventDateTime")))
    assert when.tzinfo is not None, "EventDateTime must carry its time zone (A.5.2.5)"
    _order(event, r"EventID (EventTypeCode )*(EventOutcomeDescription )?")
    for coded in [*event.findall("EventID"), *event.findall("EventTypeCode")]:
        _coded(coded)
    assert event.find("EventID").get("codeSystemName") == "DCM"  # type: ignore[union-attr]

    for participant in root.findall("ActiveParticipant"):
        assert set(participant.attrib) <= {
            "UserID", "AlternativeUserID", "UserName", "UserIsRequestor",
            "NetworkAccessPointID", "NetworkAccessPointTypeCode"}
        assert participant.get("UserID"), "ActiveParticipant needs a UserID"
        assert participant.get("UserIsRequestor") in {"true", "false", "1", "0"}
        assert participant.get("NetworkAccessPointTypeCode", "1") in {"1", "2", "3", "4", "5"}
        _order(participant, r"(RoleIDCode )*(MediaIdentifier )?")
        for role in participant.findall("RoleIDCode"):
            _coded(role)

    source = root.find("AuditSourceIdentification")
    assert source is not None
    assert set(source.attrib) <= {"AuditSourceID", "AuditEnterpriseSiteID"}
    assert source.get("AuditSourceID"), "AuditSourceIdentification needs an AuditSourceID"
    _order(source, r"(AuditSourceTypeCode )*")
    for type_code in source.findall("AuditSourceTypeCode"):
        assert type_code.get("csd-code")

    for obj in root.findall("ParticipantObjectIdentification"):
        assert set(obj.attrib) <= {
            "ParticipantObjectID", "ParticipantObjectTypeCode",
            "ParticipantObjectTypeCodeRole", "ParticipantObjectDataLifeCycle",
            "ParticipantObjectSensitivity"}
        assert obj.get("ParticipantObjectID")
        assert obj.get("ParticipantObjectTypeCode", "1") in {"1", "2", "3", "4"}
        assert 1 <= int(obj.get("ParticipantObjectTypeCodeRole", "1")) <= 26
        _order(obj, r"ParticipantObjectIDTypeCode "
                    r"((ParticipantObjectName|ParticipantObjectQuery) )?"
                    r"(ParticipantObjectDetail )*(ParticipantObjectDescription )*")
        _coded(obj[0])


def parse_xml(text: str) -> ET.Element:
    """Parse XML that our own code produced; refuse DTDs so no entity can expand."""
    assert "<!DOCTYPE" not in text and "<!ENTITY" not in text
    return ET.fromstring(text)  # noqa: S314 - our own output, DTDs refused above


def objects_of(root: ET.Element) -> dict[str, tuple[str, str, str]]:
    """ParticipantObjectID -> (type, role, ID type code)."""
    return {
        str(o.get("ParticipantObjectID")): (
            str(o.get("ParticipantObjectTypeCode")), str(o.get("ParticipantObjectTypeCodeRole")),
            str(o[0].get("csd-code")))
        for o in root.findall("ParticipantObjectIdentification")
    }


def counter(root: ET.Element) -> int:
    description = root.findtext("EventIdentification/EventOutcomeDescription") or ""
    match = re.search(r"\bn=(\d+)\b", description)
    assert match, description
    return int(match.group(1))


def access_event(n: int, outcome: Outcome = Outcome.SUCCESS) -> AuditEvent:
    return AuditEvent(
        action="dicom.move", outcome=outcome, code=EventCode.INSTANCES_TRANSFERRED,
        actor_ae="VIEWER", actor_address="192.0.2.7",
        study_uids=(STUDY, STUDY_2), patient_ids=(PATIENT,),
        message="retrieval", detail={"n": n, "destination": "VIEWER"},
    )


def settings_for(pki: Pki, port: int, **extra: object) -> SyslogSettings:
    return SyslogSettings.model_validate({
        "enabled": True, "host": "127.0.0.1", "port": port, "ca_file": str(pki.ca), **extra})


def make_sink(tmp_path: Path, pki: Pki, port: int) -> SyslogSink:
    return SyslogSink(
        settings_for(pki, port), tmp_path / "audit" / "syslog-queue", b"k" * 32,
        archive_ae="PACSVAULT", hostname="archive.test", min_backoff=0.1, max_backoff=0.5,
        idle_poll=0.2, ack_timeout=5.0,
    )


# --- tests -----------------------------------------------------------------------------


def test_audit_message_follows_the_dicom_schema() -> None:
    builder = AuditMessageBuilder("PACSVAULT", hostname="archive.test", site_id="Cabinet")
    events = [
        access_event(1),
        AuditEvent(action="dicom.store.association", outcome=Outcome.SUCCESS,
                   code=EventCode.INSTANCES_TRANSFERRED, actor_ae="CT1",
                   actor_address="10.0.0.5", study_uids=(STUDY,), sop_uids=(SOP,),
                   patient_ids=(PATIENT,)),
        AuditEvent(action="exposure", outcome=Outcome.MAJOR_FAILURE,
                   code=EventCode.SECURITY_ALERT, actor_address="203.0.113.9",
                   message="connection from outside\nthe trusted networks"),
        AuditEvent(action="application.start", outcome=Outcome.SUCCESS,
                   code=EventCode.APPLICATION_ACTIVITY, detail={"port": 11112}),
        AuditEvent(action="web.login", outcome=Outcome.MINOR_FAILURE,
                   code=EventCode.USER_AUTHENTICATION, actor_user="dr.martin",
                   actor_ae="\x00BAD\x07AE", actor_address="10.0.0.9"),
    ]
    for event in events:
        xml = builder.to_bytes(event)
        assert b"\n" not in xml
        root = parse_xml(xml.decode("utf-8"))
        check_audit_message(root)
        ident = root.find("EventIdentification")
        assert ident is not None
        assert ident.get("EventOutcomeIndicator") == event.outcome.value
        assert ident.find("EventID").get("csd-code") == event.code.value  # type: ignore[union-attr]
        assert root.find("AuditSourceIdentification").get("AuditSourceID") == "PACSVAULT"  # type: ignore[union-attr]
        archive = [p for p in root.findall("ActiveParticipant") if p.get("UserID") == "PACSVAULT"]
        assert len(archive) == 1 and archive[0].get("AlternativeUserID") == "AETITLES=PACSVAULT"

    moved, stored, exposure, start, login = (parse_xml(builder.to_bytes(e).decode())
                                             for e in events)
    assert objects_of(moved) == {STUDY: ("2", "3", "110180"), STUDY_2: ("2", "3", "110180"),
                                 PATIENT: ("1", "1", "2")}
    viewer = moved.find("ActiveParticipant")
    assert viewer is not None and viewer.attrib == {
        "UserID": "VIEWER", "AlternativeUserID": "AETITLES=VIEWER", "UserIsRequestor": "true",
        "NetworkAccessPointID": "192.0.2.7", "NetworkAccessPointTypeCode": "2"}
    assert viewer.find("RoleIDCode").get("csd-code") == "110152"  # type: ignore[union-attr]
    assert stored.find("EventIdentification").get("EventActionCode") == "C"  # type: ignore[union-attr]
    assert stored.find(".//SOPClass/Instance").get("UID") == SOP  # type: ignore[union-attr]
    assert exposure.find("ActiveParticipant").get("UserID") == "203.0.113.9"  # type: ignore[union-attr]
    assert exposure.findtext("EventIdentification/EventOutcomeDescription") == \
        "connection from outside the trusted networks"
    elsewhere = parse_xml(builder.to_bytes(AuditEvent(
        action="dicom.move", outcome=Outcome.SUCCESS, code=EventCode.INSTANCES_TRANSFERRED,
        actor_ae="VIEWER", actor_address="192.0.2.7", study_uids=(STUDY,),
        detail={"destination": "WORKSTATION"})).decode())
    check_audit_message(elsewhere)
    roles = {p.get("UserID"): (p.get("UserIsRequestor"), p.find("RoleIDCode"))
             for p in elsewhere.findall("ActiveParticipant")}
    assert {user: (requestor, None if role is None else role.get("csd-code"))
            for user, (requestor, role) in roles.items()} == {
        "VIEWER": ("true", None),  # asked for the move
        "WORKSTATION": ("false", "110152"),  # received the images
        "PACSVAULT": ("false", "110153"),  # sent them
    }
    requestors = [p.get("UserID") for p in start.findall("ActiveParticipant")
                  if p.get("UserIsRequestor") == "true"]
    assert requestors == ["PACSVAULT"]  # nobody else: the archive itself acted
    users = [p.get("UserID") for p in login.findall("ActiveParticipant")]
    assert users[0] == "dr.martin" and "\ufffdBAD\ufffdAE" in str(users[1])


def test_syslog_record_framing() -> None:
    event = access_event(3, Outcome.SERIOUS_FAILURE)
    xml = AuditMessageBuilder("PACSVAULT").to_bytes(event)
    record = format_record(xml, event, hostname="archive test", procid="42")
    header, _, msg = record.partition(BOM)
    assert msg == xml
    parts = header.decode("ascii").split(" ")
    assert parts[0] == "<84>1"  # facility 10 * 8 + severity 4 (warning: a failure)
    assert dt.datetime.fromisoformat(parts[1]).tzinfo is not None
    assert parts[2:7] == ["archivetest", "pacsvault", "42", "IHE+RFC-3881", "-"]
    assert parts[7] == ""  # header ends with SP before the BOM
    ok = format_record(xml, access_event(1), hostname="h")
    assert ok.startswith(b"<85>1 ")  # notice for a success
    assert frame(record) == f"{len(record)} ".encode() + record


def test_queue_is_encrypted_ordered_and_tamper_evident(tmp_path: Path) -> None:
    queue = SyslogQueue(tmp_path / "q", os.urandom(32))
    seqs = [queue.put(f"record {i} {PATIENT} {STUDY}".encode()) for i in range(5)]
    assert seqs == sorted(seqs) and len(set(seqs)) == 5
    entries = queue.entries()
    assert [seq for seq, _ in entries] == seqs
    assert all(re.fullmatch(r"\d{20}\.msg", path.name) for _, path in entries)
    for seq, path in entries:
        blob = path.read_bytes()
        assert PATIENT.encode() not in blob and STUDY.encode() not in blob
        assert oct(path.stat().st_mode & 0o777) == "0o600"
        assert PATIENT in queue.read(seq, path).decode()
    # A record moved to another place in the queue does not authenticate there.
    (_, path_a), (seq_b, path_b) = entries[0], entries[1]
    os.replace(path_a, path_b)
    with pytest.raises(ObjectFormatError):
        queue.read(seq_b, path_b)
    # Another vault's key reads nothing.
    other = SyslogQueue(tmp_path / "q", os.urandom(32))
    with pytest.raises(ObjectFormatError):
        other.read(*entries[2])
    queue.close()
    other.close()


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["stopped", "killed"])
def test_export_reaches_rsyslog_and_survives_an_outage(
    tmp_path: Path, pki: Pki, collector: Rsyslog, caplog: pytest.LogCaptureFixture,
    how: signal.Signals,
) -> None:
    caplog.set_level(logging.DEBUG, logger="pacsvault")
    sink = make_sink(tmp_path, pki, collector.port)
    recorder = Recorder([sink])
    try:
        # 1. Collector up: events arrive as ATNA syslog records.
        first = 5
        for n in range(first):
            recorder.emit(access_event(n, Outcome.SUCCESS if n % 2 == 0 else
                                       Outcome.MINOR_FAILURE))
        assert sink.flush(30), f"not delivered: {sink.last_error}"
        records = collector.wait_for(first)
        assert len(records) == first
        for n, record in enumerate(records):
            assert record["pri"] == ("85" if n % 2 == 0 else "84")
            assert record["version"] == "1"
            assert record["appname"] == "pacsvault"
            assert record["msgid"] == "IHE+RFC-3881"
            assert record["hostname"] == "archive.test"
            assert record["procid"] == str(os.getpid())
            assert record["sd"] == "-"
            assert record["msg"].startswith("\ufeff<?xml")  # RFC 5424 MSG-UTF8: BOM first
            root = parse_xml(record["msg"].removeprefix("\ufeff"))
            check_audit_message(root)
            assert counter(root) == n
            assert objects_of(root)[PATIENT] == ("1", "1", "2")
            assert objects_of(root)[STUDY] == ("2", "3", "110180")

        # 2. Collector down (shut down, or crashed): events wait on disk, encrypted; the
        #    caller never waits.
        collector.stop(how)
        outage = 20
        started = time.monotonic()
        for n in range(first, first + outage):
            recorder.emit(access_event(n))
        assert time.monotonic() - started < 5  # disk only, no network wait per event
        time.sleep(1.0)  # the sender tries (and fails) meanwhile
        assert sink.pending() == outage
        queued = sorted((tmp_path / "audit" / "syslog-queue").glob("*.msg"))
        assert len(queued) == outage
        for path in queued:
            blob = path.read_bytes()
            assert PATIENT.encode() not in blob
            assert STUDY.encode() not in blob
            assert b"AuditMessage" not in blob and b"IHE+RFC-3881" not in blob
        assert len(collector.records()) == first

        # 3. Collector back on the same port: everything arrives, in order, once.
        collector.start()
        assert sink.flush(60), f"queue not drained: {sink.last_error}"
        records = collector.wait_for(first + outage)
        assert sink.pending() == 0
        received = [counter(parse_xml(r["msg"].removeprefix("\ufeff"))) for r in records]
        assert received == list(range(first + outage))
        for record in records:
            check_audit_message(parse_xml(record["msg"].removeprefix("\ufeff")))
    finally:
        sink.close()
    assert PATIENT not in caplog.text and STUDY not in caplog.text
    assert "unreachable" in caplog.text  # the outage was reported, without patient data


def test_records_queued_by_a_stopped_sink_are_sent_by_the_next(
    tmp_path: Path, pki: Pki, collector: Rsyslog
) -> None:
    """A restart (or a CLI command that only enqueues) loses nothing: the queue is on disk."""
    settings = settings_for(pki, collector.port)
    queue_dir = tmp_path / "audit" / "syslog-queue"
    offline = SyslogSink(settings, queue_dir, b"k" * 32, archive_ae="PACSVAULT",
                         deliver=False)
    for n in range(3):
        offline.write(access_event(n))
    offline.close()
    assert len(list(queue_dir.glob("*.msg"))) == 3
    assert collector.records() == []

    sink = make_sink(tmp_path, pki, collector.port)
    try:
        sink.write(access_event(3))
        assert sink.flush(30), sink.last_error
    finally:
        sink.close()
    received = [counter(parse_xml(r["msg"].removeprefix("\ufeff")))
                for r in collector.wait_for(4)]
    assert received == [0, 1, 2, 3]


def test_collector_certificate_is_verified(tmp_path: Path, pki: Pki, collector: Rsyslog,
                                           tmp_path_factory: pytest.TempPathFactory) -> None:
    """A collector whose certificate our CA did not sign gets nothing."""
    stranger = tmp_path_factory.mktemp("other-ca") / "ca.pem"
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name("other CA")).issuer_name(_name("other CA"))
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    stranger.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    settings = SyslogSettings(enabled=True, host="127.0.0.1", port=collector.port,
                              ca_file=str(stranger))
    sink = SyslogSink(settings, tmp_path / "q", b"k" * 32, archive_ae="PACSVAULT",
                      min_backoff=0.1, max_backoff=0.2)
    try:
        sink.write(access_event(0))
        assert not sink.flush(2)
        assert "CERTIFICATE_VERIFY_FAILED" in sink.last_error
        assert sink.pending() == 1
    finally:
        sink.close()
    assert collector.records() == []


def test_large_events_are_split_to_fit_the_collector(tmp_path: Path, pki: Pki) -> None:
    """An export of a whole archive still reaches a collector that takes 8 KiB records."""
    studies = tuple(f"1.2.826.0.1.3680043.8.498.{n}" for n in range(400))
    sink = SyslogSink(settings_for(pki, free_port()), tmp_path / "q", b"k" * 32,
                      archive_ae="PACSVAULT", deliver=False)
    try:
        sink.write(AuditEvent(action="export", outcome=Outcome.SUCCESS, code=EventCode.EXPORT,
                              actor_user="local-admin", study_uids=studies,
                              patient_ids=(PATIENT,), detail={"instances": 4000}))
        sink.write(AuditEvent(action="dicom.store.association", outcome=Outcome.SUCCESS,
                              code=EventCode.INSTANCES_TRANSFERRED, actor_ae="CT1",
                              study_uids=(STUDY,),
                              sop_uids=tuple(f"{STUDY}.{n}" for n in range(1000))))
        records = [sink.queue.read(seq, path) for seq, path in sink.queue.entries()]
    finally:
        sink.close()
    assert all(len(record) <= 8192 for record in records)
    roots = [parse_xml(record.partition(BOM)[2].decode()) for record in records]
    for root in roots:
        check_audit_message(root)
    *export, store = roots
    assert len(export) > 1
    named: list[str] = []
    for i, root in enumerate(export, start=1):
        assert (root.findtext("EventIdentification/EventOutcomeDescription") or "").endswith(
            f"(part {i} of {len(export)})")
        named += objects_of(root)
    assert named == [*studies, PATIENT]
    sop_class = store.find(".//SOPClass")
    assert sop_class is not None and sop_class.get("NumberOfInstances") == "1000"
    assert sop_class.find("Instance") is None  # optional list dropped to fit


def test_a_full_queue_reports_the_gap(tmp_path: Path, pki: Pki,
                                      caplog: pytest.LogCaptureFixture) -> None:
    """Past queue_limit nothing is queued, and the collector is later told how much."""
    sink = SyslogSink(settings_for(pki, free_port(), queue_limit=3), tmp_path / "q",
                      b"k" * 32, archive_ae="PACSVAULT", deliver=False)
    try:
        for n in range(5):
            sink.write(access_event(n))
        assert sink.pending() == 3
        assert "queue full" in caplog.text and PATIENT not in caplog.text
        sink.queue.remove([path for _, path in sink.queue.entries()])  # as if delivered
        sink.write(access_event(5))
        roots = [parse_xml(sink.queue.read(*entry).partition(BOM)[2].decode())
                 for entry in sink.queue.entries()]
    finally:
        sink.close()
    gap, last = roots
    check_audit_message(gap)
    assert gap.find("EventIdentification/EventID").get("csd-code") == "110113"  # type: ignore[union-attr]
    assert "not_exported=2" in (gap.findtext("EventIdentification/EventOutcomeDescription")
                                or "")
    assert counter(last) == 5


def test_settings_validation() -> None:
    assert SyslogSettings().enabled is False
    with pytest.raises(ValueError, match="no host"):
        SyslogSettings(enabled=True, ca_file="/x")
    with pytest.raises(ValueError, match="ca_file"):
        SyslogSettings(enabled=True, host="collector")
    with pytest.raises(ValueError, match="together"):
        SyslogSettings(client_cert="/c.pem")
    with pytest.raises(ValueError, match="extra"):
        SyslogSettings.model_validate({"hostname": "x"})


def test_rsyslogd_is_installed() -> None:
    """Fail loudly, not skip, when the collector is missing (install.sh --test adds it)."""
    assert shutil.which("rsyslogd") or Path(RSYSLOGD).exists()
