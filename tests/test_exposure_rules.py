"""Issue 19, without a server: which changes widen the exposure, the alert rule they
raise, and what the alert-test record vouches for (tests/test_exposure_guard.py runs the
guard in a real ``serve``)."""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

from pacsvault.audit.alerts import AlertSettings, Detector
from pacsvault.audit.events import AuditEvent, EventCode, Outcome
from pacsvault.config import ServerSettings, Settings
from pacsvault.config.exposure import (
    Exposure,
    apply,
    changed,
    last_tests,
    record_test,
    safe_start,
    widened,
    with_alerts,
)

LAN = ("127.0.0.0/8", "192.168.0.0/16")
NOW = dt.datetime(2026, 12, 5, 10, 0, tzinfo=dt.UTC)


def test_what_widens_and_what_does_not() -> None:
    base = Exposure("lan", False, "0.0.0.0", LAN)
    assert widened(base, base) == []
    assert widened(base, Exposure("internet", False, "0.0.0.0", LAN)) == [
        "remote_access = internet"]
    assert widened(base, Exposure("lan", True, "0.0.0.0", LAN)) == ["tls_from_anywhere = true"]
    # another private network, loopback or a narrower bind: not an exposure
    assert widened(base, Exposure("lan", False, "127.0.0.1", (*LAN, "10.1.0.0/16"))) == []
    # a public network trusted, or a public address bound: guarded
    assert widened(base, Exposure("lan", False, "0.0.0.0", (*LAN, "203.0.113.0/24"))) == [
        "trusted network 203.0.113.0/24"]
    assert widened(base, Exposure("lan", False, "8.8.4.4", LAN)) == ["bind = 8.8.4.4"]
    # narrowing is recorded (changed) but never widening
    back = Exposure("internet", True, "0.0.0.0", LAN)
    assert widened(back, base) == []
    assert changed(back, base) == {"remote_access": "internet -> lan",
                                   "tls_from_anywhere": "true -> false"}


def test_a_vault_without_record_starts_from_the_safe_values() -> None:
    exposed = Exposure("internet", True, "0.0.0.0", (*LAN, "0.0.0.0/0"))
    safe = safe_start(exposed)
    assert safe == Exposure("lan", False, "0.0.0.0", LAN)
    assert set(widened(safe, exposed)) == {"remote_access = internet",
                                           "tls_from_anywhere = true",
                                           "trusted network 0.0.0.0/0"}
    assert exposed.active() == ["remote_access = internet", "tls_from_anywhere = true",
                                "trusted network 0.0.0.0/0"]


def test_refused_values_are_replaced_by_the_applied_ones() -> None:
    settings = Settings(server=ServerSettings(ae_title="PV")).model_copy()
    wanted = Exposure("internet", True, "0.0.0.0", ("127.0.0.1/32",))
    applied = apply(settings, Exposure("lan", False, "127.0.0.1", LAN))
    assert applied.web.remote_access == "lan" and not applied.dicom.tls_from_anywhere
    assert applied.server.bind == "127.0.0.1"
    assert applied.dicom.trusted_networks == [ipaddress.ip_network(n) for n in LAN]
    assert Exposure.of(apply(settings, wanted)) == wanted


def test_the_rule_alerts_every_switch() -> None:
    detector = Detector(AlertSettings(), clock=lambda: NOW)

    def event(action: str, **detail: str) -> AuditEvent:
        return AuditEvent(action=action, outcome=Outcome.SUCCESS,
                          code=EventCode.SECURITY_ALERT, time=NOW, detail=detail)

    opened = detector.observe(event("exposure.switch", changes="remote_access: lan -> "
                                    "internet", widened="remote_access = internet",
                                    file_owner="root"))
    assert [(a.rule, a.severity.value) for a in opened] == [("exposure-switch", "critical")]
    assert "file owner root" in opened[0].text
    narrowed = detector.observe(event("exposure.switch",
                                      changes="remote_access: internet -> lan", widened=""))
    assert [a.severity.value for a in narrowed] == ["warning"]
    refused = detector.observe(event("exposure.refused", changes="x", widened="y",
                                     reasons="no channel", kept="lan only"))
    assert refused[0].title == "Exposure change refused" and "no channel" in refused[0].text
    assert detector.observe(event("exposure.pending", changes="z", widened="",
                                  verdict="takes effect at the next start"))


def test_a_test_vouches_for_the_destination_tested(tmp_path: Path) -> None:
    mail = AlertSettings(smtp_host="127.0.0.1", smtp_security="none", mail_to=["a@b.org"])
    assert last_tests(tmp_path, mail) == {}
    record_test(tmp_path, mail, ["mail"], NOW)
    assert last_tests(tmp_path, mail) == {"mail": NOW}
    assert (tmp_path / "alerts-tested.json").stat().st_mode & 0o777 == 0o600
    moved = mail.model_copy(update={"mail_to": ["someone.else@b.org"]})
    assert last_tests(tmp_path, moved) == {}  # a new address must be tested again


def test_init_writes_the_channel_into_the_settings_file() -> None:
    from pacsvault.config.alerts import render_section

    text = with_alerts(render_section(), {"smtp_host": "mail.example.org", "smtp_port": 465,
                                          "mail_to": ["dr@example.org"]})
    assert 'smtp_host = "mail.example.org"' in text and "smtp_port = 465" in text
    assert 'mail_to = ["dr@example.org"]' in text


def test_refusal_reasons_are_shown_in_the_readers_language() -> None:
    from pacsvault.web.alert_notices import reason_text
    from pacsvault.web.i18n import gettext_for

    fr = gettext_for("fr")
    text = reason_text("the security check's network section reports network.upnp-mapping "
                       "(run 'pacsvault check')", fr)
    assert text.startswith("la partie réseau du contrôle de sécurité signale ")
    assert "network.upnp-mapping" in text
    assert reason_text("no alert channel has delivered a test as configured now: x",
                       fr).startswith("aucun canal d’alerte")
    assert reason_text("something new", fr) == "something new"
