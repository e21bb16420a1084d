"""Issue 17: the detector applies a rule only to the events it watches, and the alert sink
hands its thread only events some rule watches. Alerts are a security feature: these
tests fail if any event a rule would find something in were skipped by that fast path."""

from __future__ import annotations

import datetime as dt
import itertools
import logging
import re
from pathlib import Path
from typing import Any

import pytest

from pacsvault.audit.alerts import AlertSettings, AlertSink, Detector
from pacsvault.audit.alerts.rules import BACKUP_ACTIONS
from pacsvault.audit.events import AuditEvent, EventCode, LogSink, Outcome, Recorder
from pacsvault.audit.stores import StoredRef, batch_events

SRC = Path(__file__).resolve().parents[1] / "src" / "pacsvault"
SUNDAY_3AM = dt.datetime(2024, 5, 5, 1, 0, tzinfo=dt.UTC)  # outside business hours

# What the rules watch, written out here independently of their declarations.
KNOWN_WATCHED = [
    "auth.login.failed", "auth.account.locked", "auth.login", "exposure",
    "dicom.association.rejected", "dicom.move.unknown_destination", "audit.verify",
    "audit.tamper", "dicom.store.failed", "dicom.connection.refused",
    "https.connection.refused", "audit.unavailable", *BACKUP_ACTIONS, "backup.stale",
    "application.start", "sealed.snapshot", "sealed.journal.damaged", "storage.scrub",
    "storage.orphans", "exposure.switch", "exposure.refused", "exposure.pending",
    "check.run", "breach.clock", "forward.failing",
]


def source_actions() -> set[str]:
    """Every dotted lowercase literal of the sources (the actions among them), and the
    f-string ones (``f"{channel}.store.committed"``) with the producers' prefixes."""
    found: set[str] = set()
    suffixes: set[str] = set()
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        found.update(re.findall(r'"([a-z][a-z0-9_]*(?:\.[a-z0-9_]+)+)"', text))
        suffixes.update(re.findall(r'\}(\.[a-z0-9_]+(?:\.[a-z0-9_]+)*)"', text))
    for prefix, suffix in itertools.product(("dicom", "dicomweb", "https", "web"),
                                            suffixes):
        found.add(prefix + suffix)
    return found


def variants(action: str) -> list[AuditEvent]:
    """Events of ``action`` under every code and outcome, with every detail some rule
    reads, so that whatever a rule could find in this action, one of them shows it."""
    rich: dict[str, Any] = {
        "sealed": True, "summary": True, "count": 3, "reason": "too many", "target": "usb",
        "new_critical": "tls-off", "changes": "bind", "widened": "0.0.0.0",
        "destination": "ELSEWHERE", "instances": 4, "attempts": 3, "breach": "B1",
        "hours": 48, "missing": 1, "corrupt": 1, "age_hours": 50, "port": "tls",
    }
    out = []
    for code, outcome, message, registered in itertools.product(
            EventCode, (Outcome.SUCCESS, Outcome.MAJOR_FAILURE),
            ("status A700", "StorageUnavailable: A700"), (False, True)):
        out.append(AuditEvent(
            action=action, outcome=outcome, code=code, message=message,
            actor_ae="NODE", actor_address="203.0.113.9", actor_user="someone",
            study_uids=("1.2.3.1", "1.2.3.2"), sop_uids=("1.2.3.1.1",),
            patient_ids=("P1", "P2"), detail={**rich, "registered": registered},
            time=SUNDAY_3AM))
    return out


def eager_detector() -> Detector:
    """Lowest thresholds: any event a rule watches can make it find something."""
    return Detector(AlertSettings(timezone="Europe/Paris", failed_logins_per_10min=1,
                                  bulk_studies_per_hour=1, bulk_patients_per_hour=1),
                    clock=lambda: SUNDAY_3AM)


def test_no_rule_finds_anything_in_an_event_it_is_not_dispatched() -> None:
    """Every rule applied to every event: whatever it finds, the dispatch gives it."""
    det = eager_detector()
    actions = source_actions() | set(KNOWN_WATCHED)
    assert {"dicom.store.committed", "dicomweb.store.committed",
            "dicom.move.begin"} <= actions  # the corpus does reach the producers
    fired: set[str] = set()
    for action in sorted(actions):
        for event in variants(action):
            dispatched = det.rules_for(event.action, event.code)
            for rule in det._rules:  # the complete list, as before the dispatch
                findings = rule(event)
                if findings:
                    fired.add(findings[0].rule)
                    assert rule in dispatched, (event.action, event.code, findings[0].rule)
            own = event.action.startswith("alert.")  # the sink's own: never observed
            assert det.watches(event) == (bool(dispatched) and not own)
    # Each rule found something somewhere, so the check above did test it.
    assert fired == {
        "failed-logins", "account-locked", "exposure", "unknown-node", "bulk-access",
        "unusual-hours", "audit-broken", "disk-full", "connection-abuse",
        "audit-unwritable", "backup-failed", "backup-stale", "archive-sealed",
        "object-storage", "exposure-switch", "security-check", "breach-clock", "forwarding",
    }


@pytest.mark.parametrize("action", KNOWN_WATCHED)
def test_observe_on_the_dispatch_equals_every_rule(action: str) -> None:
    """``observe`` gives the same alerts as applying every rule, event after event."""
    fast, full = eager_detector(), eager_detector()
    for event in variants(action):
        expected = full._group([f for rule in full._rules for f in rule(event)])
        got = fast.observe(event)
        assert [(a.rule, a.subject, a.count, a.summary) for a in got] == \
            [(a.rule, a.subject, a.count, a.summary) for a in expected]


def test_stored_images_are_watched_by_no_rule_and_reads_are() -> None:
    det = eager_detector()
    stored = batch_events([StoredRef("1.2.3.4", "1.2.3", "P1", "CT1", "10.0.0.5", "")])[0]
    assert not det.watches(stored)
    read = AuditEvent(action="dicom.move.begin", outcome=Outcome.SUCCESS,
                      code=EventCode.BEGIN_TRANSFERRING, study_uids=("1.2.3",),
                      time=SUNDAY_3AM)
    assert det.watches(read)
    assert not det.watches(AuditEvent(action="alert.sent", outcome=Outcome.SUCCESS,
                                      code=EventCode.SECURITY_ALERT))


class Capture:
    def __init__(self) -> None:
        self.events: list[AuditEvent] = []

    def write(self, event: AuditEvent) -> None:
        self.events.append(event)


def test_the_sink_hands_its_thread_every_watched_event_and_no_stored_image(
        monkeypatch: pytest.MonkeyPatch) -> None:
    capture = Capture()
    recorder = Recorder([capture])
    sink = AlertSink(AlertSettings(disk_warn_free_mb=0), recorder, retry_delays=())
    recorder.add_sink(sink)
    observed: list[str] = []
    observe = sink.detector.observe

    def spy(event: AuditEvent) -> list[Any]:
        observed.append(event.action)
        return observe(event)

    monkeypatch.setattr(sink.detector, "observe", spy)
    now = dt.datetime.now(dt.UTC)
    stores = [batch_events([StoredRef(f"1.2.3.{i}", f"1.2.{i}", f"P{i}", "CT1",
                                      "10.0.0.5", "")])[0] for i in range(50)]
    watched = [
        AuditEvent(action="exposure", outcome=Outcome.MAJOR_FAILURE,
                   code=EventCode.SECURITY_ALERT, actor_address="203.0.113.7", time=now),
        AuditEvent(action="dicom.store.failed", outcome=Outcome.MAJOR_FAILURE,
                   code=EventCode.IMPORT, message="status A700", actor_ae="CT1", time=now),
    ]
    try:
        for i, event in enumerate(stores):
            recorder.publish(event)
            if i in (10, 40):
                recorder.publish(watched[i // 30])
        assert sink.flush(30)
    finally:
        sink.close()
    assert observed == ["exposure", "dicom.store.failed"]
    alerts = [e for e in capture.events if e.action.startswith("alert.")]
    assert sorted(str(e.detail.get("rule")) for e in alerts) == ["disk-full", "exposure"]


def test_log_line_unchanged_and_built_only_when_logged(
        caplog: pytest.LogCaptureFixture) -> None:
    event = batch_events([StoredRef("1.2.3.4", "1.2.3", "PAT-77", "CT1", "10.0.0.5", "")])[0]
    sink = LogSink(logging.getLogger("pacsvault.events.test"))
    with caplog.at_level(logging.INFO, logger="pacsvault.events.test"):
        sink.write(event)
    assert [r.getMessage() for r in caplog.records] == [
        "dicom.store.committed success ae=CT1 from=10.0.0.5 instances=1 new=1 duplicates=0"]
    assert "PAT-77" not in caplog.text and "1.2.3.4" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pacsvault.events.test"):
        sink.write(event)
        failed = AuditEvent(action="dicom.store.failed", outcome=Outcome.MAJOR_FAILURE,
                            code=EventCode.IMPORT, actor_ae="CT1")
        sink.write(failed)
    assert [r.getMessage() for r in caplog.records] == [
        "dicom.store.failed major_failure ae=CT1"]


def test_publish_reaches_sinks_added_later_but_never_the_durable_one() -> None:
    class Durable(Capture):
        durable = True

    first, trail, later = Capture(), Durable(), Capture()
    recorder = Recorder([first, trail])
    event = AuditEvent(action="x.y", outcome=Outcome.SUCCESS, code=EventCode.IMPORT)
    recorder.publish(event)
    recorder.add_sink(later)
    recorder.publish(event)
    recorder.emit(event)
    assert (len(first.events), len(trail.events), len(later.events)) == (3, 1, 2)
