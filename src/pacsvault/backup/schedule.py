"""When backups, pruning and restore drills run: the ``backup`` job of ``serve``.

Why a tick rather than a timer: ``serve`` calls :func:`tick` every minute
(``service/jobs.py``) and everything is decided from the persisted state file
(``backup/state.py``), so a schedule survives restarts and a server that was off at 01:30
catches up once when it starts, not once per missed night.

Per configured target, at each tick:

1. **Backup** when due: at once when the target never had a good backup (a practice that
   has just configured a USB disk gets its first copy now, not tonight); otherwise when
   the last attempt precedes the most recent daily slot (``[backup] schedule``, local time
   of the server). A failed run is retried every ``RETRY_AFTER`` until one succeeds, not at
   every tick (an unplugged disk would otherwise fill the trail and the mailbox).
2. **Prune** after each successful run, with the ``keep_*`` policy.
3. **Stale check**: a last good backup older than ``max_age_hours`` (after the due run was
   tried) is recorded as a ``backup.stale`` event, at most once per ``STALE_REPEAT`` per
   target and process; the ``backup-stale`` alert rule turns it into a mail/webhook.
   Before a target's first good backup its repository is created (``runner.init``) when
   missing, so configuring a target is all a practice has to do.
4. **Restore drill** (``backup/drill.py``) every ``drill_every_days``, the first one right
   after the first good backup; a failed drill is retried after ``DRILL_RETRY``.

Stopping: the job thread cannot be interrupted in the middle of a restic run. When the
server stops, ``JobRunner.stop`` waits its join timeout, then ``serve`` exits while the
daemon job thread still runs: an unfinished restic snapshot is never committed (restic
writes the snapshot record last), the attempt is not recorded, so the next start catches
up; a drill copy left behind is deleted by the next tick (:func:`drill.remove_stale`). A
restic child may outlive the server until it finishes or fails on its own (systemd's
control-group kill ends it with the unit).
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pacsvault.audit.events import AuditEvent, EventCode, Outcome

if TYPE_CHECKING:
    from pacsvault.config import BackupSettings, BackupTarget
    from pacsvault.vault import Vault

log = logging.getLogger("pacsvault.backup")

RETRY_AFTER = dt.timedelta(hours=3)
DRILL_RETRY = dt.timedelta(days=1)
STALE_REPEAT = dt.timedelta(hours=12)

# (data dir, target) -> when the last backup.stale event was recorded by this process
_stale_noticed: dict[tuple[str, str], dt.datetime] = {}
_tick_lock = threading.Lock()


def parse_time(value: Any) -> dt.datetime | None:
    """An ISO 8601 time of the state file, as aware UTC (None when absent or damaged)."""
    if not isinstance(value, str) or not value:
        return None
    try:
        when = dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.astimezone(dt.UTC)


def _slot_on(day: dt.date, schedule: str, zone: dt.tzinfo | None) -> dt.datetime:
    hour, minute = (int(x) for x in schedule.split(":"))
    local = dt.datetime.combine(day, dt.time(hour, minute))
    aware = local.replace(tzinfo=zone) if zone is not None else local.astimezone()
    return aware.astimezone(dt.UTC)


def last_slot(schedule: str, now: dt.datetime, zone: dt.tzinfo | None = None) -> dt.datetime:
    """The most recent daily run time at or before ``now`` (``zone`` None: local time)."""
    local_now = now.astimezone(zone) if zone is not None else now.astimezone()
    slot = _slot_on(local_now.date(), schedule, zone)
    if slot > now:
        slot = _slot_on(local_now.date() - dt.timedelta(days=1), schedule, zone)
    return slot


def next_slot(schedule: str, now: dt.datetime, zone: dt.tzinfo | None = None) -> dt.datetime:
    """The first daily run time after ``now``."""
    local_now = now.astimezone(zone) if zone is not None else now.astimezone()
    slot = _slot_on(local_now.date(), schedule, zone)
    if slot <= now:
        slot = _slot_on(local_now.date() + dt.timedelta(days=1), schedule, zone)
    return slot


@dataclass(frozen=True)
class TargetTimes:
    """What the state file says about one target, as times."""

    last_success: dt.datetime | None
    last_failure: dt.datetime | None
    last_error: str
    last_drill: dt.datetime | None
    last_drill_ok: bool | None
    last_drill_detail: str

    @classmethod
    def of(cls, entry: dict[str, Any]) -> TargetTimes:
        ok = entry.get("last_drill_ok")
        return cls(parse_time(entry.get("last_success")), parse_time(entry.get("last_failure")),
                   str(entry.get("last_error") or ""), parse_time(entry.get("last_drill")),
                   ok if isinstance(ok, bool) else None,
                   str(entry.get("last_drill_detail") or ""))

    @property
    def failing(self) -> bool:
        """The last attempt failed."""
        return self.last_failure is not None and (
            self.last_success is None or self.last_failure > self.last_success)


def next_backup(times: TargetTimes, schedule: str, now: dt.datetime) -> dt.datetime:
    """When the next backup of this target will start (``now`` or earlier: at next tick)."""
    if times.failing:
        assert times.last_failure is not None
        return times.last_failure + RETRY_AFTER
    if times.last_success is None:
        return now
    if times.last_success < last_slot(schedule, now):
        return now  # a missed slot: caught up once
    return next_slot(schedule, now)


def backup_due(times: TargetTimes, schedule: str, now: dt.datetime) -> bool:
    return next_backup(times, schedule, now) <= now


def next_drill(times: TargetTimes, every_days: int) -> dt.datetime | None:
    """When the next restore drill is due (None: no good backup to drill yet)."""
    if times.last_success is None:
        return None
    if times.last_drill is None:
        return times.last_success
    interval = dt.timedelta(days=every_days) if times.last_drill_ok else DRILL_RETRY
    return times.last_drill + interval


def stale(times: TargetTimes, settings: BackupSettings, now: dt.datetime) -> bool:
    """The last good backup is older than ``max_age_hours`` (never backed up: not stale,
    that is the "never" state, alerted through the failures of its attempts)."""
    return times.last_success is not None and (
        now - times.last_success > dt.timedelta(hours=settings.max_age_hours))


def tick(vault: Vault) -> None:
    """The ``backup`` job: run whatever is due, one target after the other."""
    from pacsvault.backup import drill

    drill.remove_stale(vault.layout)
    settings = vault.settings.backup
    if not settings.targets:
        return
    if not _tick_lock.acquire(blocking=False):
        return  # the previous tick is still running (jobs run in one thread: defensive)
    try:
        try:
            _run_due(vault, settings)
        except Exception as exc:  # the checks and drills below still run
            log.error("backup run failed: %s", type(exc).__name__)
        try:
            _keystores_after_destruction(vault, settings)
        except Exception as exc:
            log.error("backup keystore replacement failed: %s", type(exc).__name__)
        for target in settings.targets:
            try:
                _check_target(vault, settings, target)
            except Exception as exc:  # one target's trouble never starves the others
                log.error("backup job for target %s failed: %s", target.name,
                          type(exc).__name__)
    finally:
        _tick_lock.release()


def _keystores_after_destruction(vault: Vault, settings: BackupSettings) -> None:
    """A data key destroyed by any removal (a study deleted from the admin page or the
    CLI leaves its patient without instances; an erasure calls the hook itself) must
    leave every repository too, not wait for the next daily run: when a key was destroyed
    after a target's last keystore, every target gets a fresh one (older ones pruned)."""
    from sqlalchemy import func, select

    from pacsvault.backup import runner
    from pacsvault.backup.state import target_state
    from pacsvault.index.models import DataKey

    with vault.sessions() as session:
        latest = session.execute(select(func.max(DataKey.destroyed))).scalar()
    if latest is None:
        return
    if latest.tzinfo is None:
        latest = latest.replace(tzinfo=dt.UTC)
    behind = False
    for target in settings.targets:
        pushed = parse_time(target_state(vault.layout, target.name).get("keystore_time"))
        if pushed is not None and pushed < latest:
            behind = True  # never backed up yet: its first run has no such key anyway
    if behind:
        log.info("a data key was destroyed: replacing the backup keystores")
        runner.keys_destroyed(vault)


def _times(vault: Vault, target: str) -> TargetTimes:
    from pacsvault.backup.state import target_state

    return TargetTimes.of(target_state(vault.layout, target))


def _run_due(vault: Vault, settings: BackupSettings) -> None:
    """One run for every target that is due (one point-in-time copy serves them all),
    then pruning of each target that got its snapshot."""
    from pacsvault.backup import runner
    from pacsvault.backup.targets import recovery_key_behind

    now = dt.datetime.now(dt.UTC)
    due: list[str] = []
    for target in settings.targets:
        times = _times(vault, target.name)
        # after a key rotation, at once (unless failing: retried as usual): until then
        # the practice's new recovery sheet opens none of this target's snapshots
        if backup_due(times, settings.schedule, now) or (
                not times.failing and recovery_key_behind(vault, target)):
            if times.last_success is None:
                _init(vault, target)
            due.append(target.name)
    if not due:
        return
    log.info("backup of %s starting", ", ".join(due))
    for outcome in runner.run_backup(vault, due):
        if outcome.ok:
            pruned = runner.prune(vault, outcome.target)
            if not pruned.ok:
                log.error("pruning target %s failed: %s", outcome.target, pruned.error)


def _check_target(vault: Vault, settings: BackupSettings, target: BackupTarget) -> None:
    """After the runs: the stale check, then the restore drill when due."""
    from pacsvault.backup import drill

    now = dt.datetime.now(dt.UTC)
    times = _times(vault, target.name)
    if stale(times, settings, now):
        _notice_stale(vault, settings, target.name, times, now)
    due = next_drill(times, settings.drill_every_days)
    if due is not None and due <= now:
        drill.run_drill(vault, target.name)


def _init(vault: Vault, target: BackupTarget) -> None:
    """Before a target's first good backup: create its repository (with the recovery-code
    key) so that configuring a target is all a practice has to do. A local path is created
    only inside an existing directory: an unmounted USB disk's mount point must not
    silently receive the backups on the server's own disk."""
    from pacsvault.backup import runner

    location = target.repository
    if ":" not in location.split("/", 1)[0] and not Path(location).parent.is_dir():
        return  # the run fails and says the repository is missing
    try:
        runner.init(vault, target.name)
    except Exception as exc:  # the run right after records and alerts the failure
        log.warning("backup target %s could not be initialised: %s", target.name,
                    str(exc)[:200])


def _notice_stale(vault: Vault, settings: BackupSettings, target: str, times: TargetTimes,
                  now: dt.datetime) -> None:
    key = (str(vault.layout.root), target)
    last = _stale_noticed.get(key)
    if last is not None and now - last < STALE_REPEAT:
        return
    _stale_noticed[key] = now
    assert times.last_success is not None
    hours = int((now - times.last_success).total_seconds() // 3600)
    vault.recorder.emit(AuditEvent(
        action="backup.stale", outcome=Outcome.SERIOUS_FAILURE,
        code=EventCode.SECURITY_ALERT,
        message=(f"last good backup of target {target} is {hours} h old "
                 f"(limit {settings.max_age_hours} h)"),
        detail={"target": target, "age_hours": hours,
                "max_age_hours": settings.max_age_hours,
                "last_success": times.last_success.isoformat(timespec="seconds"),
                "last_error": times.last_error[:200]},
    ))
