"""Backup operations without a server: when the schedule runs what, the Health summary,
and the alert rules for failed and stale backups (issue 14, item 1).

The same pieces run against real restic and a real server in test_backup_ops_server.py;
here the clock is ours, so days and restarts take microseconds.
"""

from __future__ import annotations

import datetime as dt
import json
import zoneinfo
from pathlib import Path

import pytest

from pacsvault.audit.alerts import AlertSettings, Detector
from pacsvault.audit.events import AuditEvent, EventCode, Outcome
from pacsvault.backup import drill as drill_mod
from pacsvault.backup.health import NO_BACKUP_WARNING, backup_health, status_lines
from pacsvault.backup.schedule import (
    DRILL_RETRY,
    RETRY_AFTER,
    TargetTimes,
    backup_due,
    last_slot,
    next_backup,
    next_drill,
    next_slot,
    stale,
)
from pacsvault.config import BackupSettings, BackupTarget
from pacsvault.vault import Layout

PARIS = zoneinfo.ZoneInfo("Europe/Paris")
NOW = dt.datetime(2026, 12, 4, 14, 0, tzinfo=dt.UTC)  # 15:00 in Paris


def times(**kw: dt.datetime | bool | str | None) -> TargetTimes:
    base: dict[str, object] = {"last_success": None, "last_failure": None, "last_error": "",
                               "last_drill": None, "last_drill_ok": None,
                               "last_drill_detail": ""}
    base.update(kw)
    return TargetTimes(**base)  # type: ignore[arg-type]


def test_daily_slot_in_local_time() -> None:
    assert last_slot("01:30", NOW, PARIS) == dt.datetime(2026, 12, 4, 0, 30, tzinfo=dt.UTC)
    assert next_slot("01:30", NOW, PARIS) == dt.datetime(2026, 12, 5, 0, 30, tzinfo=dt.UTC)
    # before today's slot: the last one was yesterday's
    early = dt.datetime(2026, 12, 4, 0, 10, tzinfo=dt.UTC)
    assert last_slot("01:30", early, PARIS) == dt.datetime(2026, 12, 3, 0, 30, tzinfo=dt.UTC)
    # summer time: 01:30 in Paris is 23:30 UTC the day before
    june = dt.datetime(2026, 6, 10, 12, 0, tzinfo=dt.UTC)
    assert last_slot("01:30", june, PARIS) == dt.datetime(2026, 6, 9, 23, 30, tzinfo=dt.UTC)


def test_a_new_target_runs_at_once_then_daily() -> None:
    schedule = "01:30"
    assert backup_due(times(), schedule, NOW)  # first backup now, not tonight
    slot = last_slot(schedule, NOW)
    done = times(last_success=slot + dt.timedelta(minutes=5))
    assert not backup_due(done, schedule, NOW)
    assert next_backup(done, schedule, NOW) == next_slot(schedule, NOW)
    # the server was off at the slot: caught up once at the first tick...
    missed = times(last_success=slot - dt.timedelta(days=3))
    assert backup_due(missed, schedule, NOW)
    # ...and not again after that run
    assert not backup_due(times(last_success=NOW), schedule, NOW + dt.timedelta(minutes=1))


def test_a_failing_target_is_retried_but_not_every_minute() -> None:
    failed = times(last_success=NOW - dt.timedelta(days=2), last_failure=NOW,
                   last_error="repository unreachable")
    assert failed.failing
    assert not backup_due(failed, "01:30", NOW + dt.timedelta(minutes=1))
    assert backup_due(failed, "01:30", NOW + RETRY_AFTER)
    never = times(last_failure=NOW)
    assert not backup_due(never, "01:30", NOW + dt.timedelta(minutes=5))
    assert backup_due(never, "01:30", NOW + RETRY_AFTER)


def test_drills_follow_the_first_good_backup_then_every_n_days() -> None:
    assert next_drill(times(), 30) is None  # nothing to restore yet
    first = times(last_success=NOW)
    assert next_drill(first, 30) == NOW
    drilled = times(last_success=NOW, last_drill=NOW, last_drill_ok=True)
    assert next_drill(drilled, 30) == NOW + dt.timedelta(days=30)
    bad = times(last_success=NOW, last_drill=NOW, last_drill_ok=False)
    assert next_drill(bad, 30) == NOW + DRILL_RETRY


def test_stale_after_max_age() -> None:
    settings = BackupSettings(max_age_hours=36)
    assert not stale(times(), settings, NOW)  # never: its own state, not "stale"
    assert not stale(times(last_success=NOW - dt.timedelta(hours=35)), settings, NOW)
    assert stale(times(last_success=NOW - dt.timedelta(hours=37)), settings, NOW)


def write_state(root: Path, targets: dict[str, dict[str, object]]) -> None:
    (root / "backup-state.json").write_text(json.dumps({"targets": targets}))


def test_health_summary_states(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    none = backup_health(layout, BackupSettings(), NOW)
    assert not none.configured and not none.ok
    assert status_lines(none) == [f"Backup       WARNING {NO_BACKUP_WARNING}"]
    assert "disk failure loses everything" in NO_BACKUP_WARNING
    settings = BackupSettings(targets=[
        BackupTarget(name=n, repository=f"/media/{n}")
        for n in ("good", "never", "failing", "stale", "drill")])
    def iso(t: dt.datetime) -> str:
        return t.isoformat()

    write_state(tmp_path, {
        "good": {"last_success": iso(NOW - dt.timedelta(hours=2)),
                 "last_drill": iso(NOW), "last_drill_ok": True},
        "failing": {"last_success": iso(NOW - dt.timedelta(hours=30)),
                    "last_failure": iso(NOW), "last_error": "disk not mounted"},
        "stale": {"last_success": iso(NOW - dt.timedelta(days=3))},
        "drill": {"last_success": iso(NOW), "last_drill": iso(NOW), "last_drill_ok": False,
                  "last_drill_detail": "3 of 9 restored object(s) do not authenticate"},
    })
    health = backup_health(layout, settings, NOW)
    states = {t.name: t.state for t in health.targets}
    assert states == {"good": "ok", "never": "never", "failing": "failing",
                      "stale": "stale", "drill": "drill-failed"}
    assert not health.ok
    good = health.targets[0]
    assert good.age_hours == 2 and good.last_drill_ok and good.next_run > NOW
    assert health.targets[1].next_run == NOW  # never backed up: at the next tick
    text = "\n".join(status_lines(health))
    assert "good: ok" in text and "FAILING" in text and "disk not mounted" in text
    assert "DRILL-FAILED" in text and "do not authenticate" in text
    # a damaged state file only makes everything look never done
    (tmp_path / "backup-state.json").write_text("{garbage")
    assert all(t.state == "never" for t in backup_health(layout, settings, NOW).targets)


def event(action: str, outcome: Outcome, **detail: str | int) -> AuditEvent:
    return AuditEvent(action=action, outcome=outcome, code=EventCode.SECURITY_ALERT,
                      message="restore failed: restic: ciphertext verification failed",
                      detail=detail, time=NOW)


def test_backup_alert_rules() -> None:
    det = Detector(AlertSettings(), clock=lambda: NOW)
    assert det.observe(event("backup.run", Outcome.SUCCESS, target="usb")) == []
    assert det.observe(event("backup.drill", Outcome.SUCCESS, target="usb")) == []
    run = det.observe(event("backup.run", Outcome.SERIOUS_FAILURE, target="usb"))
    assert [a.rule for a in run] == ["backup-failed"] and "usb" in run[0].text
    drill = det.observe(event("backup.drill", Outcome.SERIOUS_FAILURE, target="usb"))
    assert [a.rule for a in drill] == ["backup-failed"]  # its own subject: not grouped
    assert "restore drill" in drill[0].title and "ciphertext" in drill[0].text
    verify = det.observe(event("backup.verify", Outcome.MAJOR_FAILURE, target="usb"))
    assert [a.rule for a in verify] == ["backup-failed"]
    old = det.observe(event("backup.stale", Outcome.SERIOUS_FAILURE, target="usb",
                            age_hours=72, max_age_hours=36))
    assert [a.rule for a in old] == ["backup-stale"] and "72 hours" in old[0].text
    quiet = Detector(AlertSettings(disabled_rules=["backup-failed", "backup-stale"]))
    assert quiet.observe(event("backup.run", Outcome.SERIOUS_FAILURE, target="usb")) == []


def test_stale_drill_copies_are_removed_unless_in_use(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    left = tmp_path / f"{drill_mod.PREFIX}dead"
    (left / "data").mkdir(parents=True)
    (left / drill_mod.LOCK_NAME).touch()
    (left / "data" / "index.db").write_bytes(b"ciphertext")
    busy = tmp_path / f"{drill_mod.PREFIX}busy"
    busy.mkdir()
    import fcntl
    import os

    fd = os.open(busy / drill_mod.LOCK_NAME, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        # another process holds it: flock locks are per open file description
        assert drill_mod.remove_stale(Layout(data)) >= 1
    finally:
        os.close(fd)
    assert not left.exists() and busy.exists()


def test_tick_runs_due_targets_together_then_checks_and_drills(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The job's decisions with a stand-in runner (the real one: test_backup_ops_server)."""
    from types import SimpleNamespace

    from pacsvault.audit.events import Recorder
    from pacsvault.backup import runner, schedule, state

    layout = Layout(tmp_path / "data")
    layout.root.mkdir()
    settings = BackupSettings(targets=[
        BackupTarget(name="usb", repository=str(tmp_path / "usb")),
        BackupTarget(name="gone", repository=str(tmp_path / "unplugged" / "repo"))])
    seen: list[AuditEvent] = []
    recorder = Recorder([SimpleNamespace(write=seen.append)])
    vault = SimpleNamespace(settings=SimpleNamespace(backup=settings), layout=layout,
                            recorder=recorder)
    calls: list[tuple[str, object]] = []

    def run_backup(_v: object, targets: list[str]) -> list[runner.BackupOutcome]:
        calls.append(("run", list(targets)))
        found = [runner.BackupOutcome(t, t == "usb", "abcd1234" if t == "usb" else None,
                                      None if t == "usb" else "no repository", 1, 1, 0.1)
                 for t in targets]
        for outcome in found:
            state.record_backup(layout, outcome)
        return found

    def prune(_v: object, target: str) -> runner.BackupOutcome:
        calls.append(("prune", target))
        return runner.BackupOutcome(target, True, None, None, 0, 0, 0.0)

    def init(_v: object, target: str) -> str:
        calls.append(("init", target))
        return ""

    def run_drill(_v: object, target: str) -> None:
        calls.append(("drill", target))
        state.record_drill(layout, target, True, "ok")

    monkeypatch.setattr(runner, "run_backup", run_backup)
    monkeypatch.setattr(runner, "prune", prune)
    monkeypatch.setattr(runner, "init", init)
    monkeypatch.setattr(drill_mod, "run_drill", run_drill)
    schedule.tick(vault)  # type: ignore[arg-type]
    # one run for both new targets; only the usb repository's parent exists to init in
    assert calls == [("init", "usb"), ("run", ["usb", "gone"]), ("prune", "usb"),
                     ("drill", "usb")]
    calls.clear()
    schedule.tick(vault)  # type: ignore[arg-type]
    assert calls == []  # nothing due: the failed target waits RETRY_AFTER
    # three days without a good backup: stale, recorded once per STALE_REPEAT
    old = (dt.datetime.now(dt.UTC) - dt.timedelta(days=3)).isoformat()
    state.update_target(layout, "usb", lambda e: e.update(last_success=old, last_drill=old))
    monkeypatch.setattr(schedule, "backup_due", lambda *a: False)
    schedule.tick(vault)  # type: ignore[arg-type]
    schedule.tick(vault)  # type: ignore[arg-type]
    stale_events = [e for e in seen if e.action == "backup.stale"]
    assert len(stale_events) == 1 and stale_events[0].detail["target"] == "usb"
    assert calls == []  # the drill (30 days) is not due
    # a key rotation gave a new recovery code: the target is backed up at the next tick,
    # whatever the schedule, so the new recovery sheet opens a snapshot (and drills pass)
    from pacsvault.backup import targets as targets_mod
    monkeypatch.setattr(targets_mod, "recovery_key_behind",
                        lambda _v, target: target.name == "usb")
    schedule.tick(vault)  # type: ignore[arg-type]
    assert calls[:2] == [("run", ["usb"]), ("prune", "usb")]
