"""Would the backups work? One summary for the Health page and ``pacsvault status``.

Read from the settings and the state file only (no restic call, no network): the page must
answer instantly even when the off-site repository is unreachable, and the state file is
what the scheduler and the drills keep current. Per target: last good backup (time, age),
last restore drill (time, result), next scheduled run, and a verdict that is bad ("red")
when the target never had a good backup, its last run failed, its last good backup is older
than ``max_age_hours``, or its last drill failed. No target at all is the worst case and is
said plainly: a disk failure loses everything.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pacsvault.backup.schedule import TargetTimes, next_backup, next_drill, stale

if TYPE_CHECKING:
    from pacsvault.config import BackupSettings
    from pacsvault.vault import Layout

NO_BACKUP_WARNING = ("no backup configured: a disk failure loses everything. Add a "
                     "[[backup.targets]] entry (a USB disk and an off-site repository) to "
                     "pacsvault.toml and restart the server; the first backup runs at once")


@dataclass(frozen=True)
class TargetHealth:
    name: str
    repository: str
    state: str  # "ok", "never", "failing", "stale", "drill-failed"
    last_success: dt.datetime | None
    age_hours: float | None
    last_failure: dt.datetime | None
    last_error: str
    last_drill: dt.datetime | None
    last_drill_ok: bool | None
    last_drill_detail: str
    next_run: dt.datetime
    next_drill: dt.datetime | None

    @property
    def bad(self) -> bool:
        return self.state != "ok"

    def as_dict(self) -> dict[str, Any]:
        def when(value: dt.datetime | None) -> str | None:
            return value.isoformat(timespec="seconds") if value else None

        return {
            "name": self.name, "state": self.state, "last_success": when(self.last_success),
            "age_hours": None if self.age_hours is None else round(self.age_hours, 1),
            "last_failure": when(self.last_failure), "last_error": self.last_error or None,
            "last_drill": when(self.last_drill), "last_drill_ok": self.last_drill_ok,
            "next_run": when(self.next_run), "next_drill": when(self.next_drill),
        }


@dataclass(frozen=True)
class BackupHealth:
    configured: bool
    targets: list[TargetHealth]
    max_age_hours: int

    @property
    def ok(self) -> bool:
        return self.configured and not any(t.bad for t in self.targets)

    def as_dict(self) -> dict[str, Any]:
        return {"configured": self.configured, "ok": self.ok,
                "warning": None if self.configured else NO_BACKUP_WARNING,
                "max_age_hours": self.max_age_hours,
                "targets": [t.as_dict() for t in self.targets]}


def backup_health(layout: Layout, settings: BackupSettings,
                  now: dt.datetime | None = None) -> BackupHealth:
    from pacsvault.backup.state import load_state

    now = now or dt.datetime.now(dt.UTC)
    entries = load_state(layout)["targets"]
    found: list[TargetHealth] = []
    for target in settings.targets:
        entry = entries.get(target.name)
        times = TargetTimes.of(entry if isinstance(entry, dict) else {})
        if times.last_success is None:
            state = "never"
        elif times.failing:
            state = "failing"
        elif stale(times, settings, now):
            state = "stale"
        elif times.last_drill_ok is False:
            state = "drill-failed"
        else:
            state = "ok"
        age = (now - times.last_success).total_seconds() / 3600 if times.last_success else None
        found.append(TargetHealth(
            name=target.name, repository=target.repository, state=state,
            last_success=times.last_success, age_hours=age,
            last_failure=times.last_failure, last_error=times.last_error,
            last_drill=times.last_drill, last_drill_ok=times.last_drill_ok,
            last_drill_detail=times.last_drill_detail,
            next_run=max(next_backup(times, settings.schedule, now), now),
            next_drill=next_drill(times, settings.drill_every_days),
        ))
    return BackupHealth(bool(settings.targets), found, settings.max_age_hours)


def status_lines(health: BackupHealth) -> list[str]:
    """The lines ``pacsvault status`` prints (label column included)."""
    if not health.configured:
        return [f"Backup       WARNING {NO_BACKUP_WARNING}"]
    lines: list[str] = []
    for t in health.targets:
        local = _local_text
        good = (f"last good {local(t.last_success)} ({t.age_hours:.0f} h ago)"
                if t.last_success and t.age_hours is not None else "never backed up")
        if t.last_drill is None:
            drill = "no drill yet"
        else:
            drill = f"drill {local(t.last_drill)} {'ok' if t.last_drill_ok else 'FAILED'}"
        verdict = "ok" if not t.bad else t.state.upper()
        lines.append(f"Backup       {t.name}: {verdict}; {good}; {drill}; "
                     f"next run {local(t.next_run)}")
        if t.state == "failing" and t.last_error:
            lines.append(f"  last error: {t.last_error[:200]}")
        if t.last_drill_ok is False and t.last_drill_detail:
            lines.append(f"  drill: {t.last_drill_detail[:200]}")
    return lines


def _local_text(value: dt.datetime | None) -> str:
    return value.astimezone().strftime("%Y-%m-%d %H:%M") if value else "-"
