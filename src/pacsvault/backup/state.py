"""The backup state file ``DATA/backup-state.json`` (0600, no secrets, no patient data).

What the Health page, the alerts and the schedule read, and what the runner writes::

    {"targets": {
        "<name>": {
            "last_success": "2026-12-04T01:30:12+00:00",   # ISO 8601 UTC, or absent
            "last_snapshot": "1a2b3c4d",                      # restic short id
            "last_failure": "...", "last_error": "one line",  # absent if never failed
            "last_drill": "...", "last_drill_ok": true, "last_drill_detail": "...",
            "recovery_key": "9f0c..."   # which recovery password this repository was
        }                               # given (HMAC keyed by it); another one in the
    }}                                  # vault (a key rotation) = a key to add

Written atomically (0600 sibling, fsync, rename); one writer at a time per process.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pacsvault.fsutil import write_atomic

if TYPE_CHECKING:
    from pacsvault.backup.runner import BackupOutcome
    from pacsvault.vault import Layout

STATE_NAME = "backup-state.json"
_LOCK = threading.Lock()


def state_path(layout: Layout) -> Path:
    return layout.root / STATE_NAME


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def load_state(layout: Layout) -> dict[str, Any]:
    """The whole state (``{"targets": {}}`` when nothing ran yet or the file is damaged:
    a damaged state only makes the next run look overdue, it never blocks a backup)."""
    try:
        value = json.loads(state_path(layout).read_text("utf-8"))
    except (OSError, ValueError):
        return {"targets": {}}
    if not isinstance(value, dict) or not isinstance(value.get("targets"), dict):
        return {"targets": {}}
    return value


def target_state(layout: Layout, target: str) -> dict[str, Any]:
    entry = load_state(layout)["targets"].get(target)
    return entry if isinstance(entry, dict) else {}


def update_target(layout: Layout, target: str, change: Callable[[dict[str, Any]], None]) -> None:
    with _LOCK:
        state = load_state(layout)
        entry = state["targets"].setdefault(target, {})
        if not isinstance(entry, dict):
            entry = state["targets"][target] = {}
        change(entry)
        write_atomic(state_path(layout),
                     json.dumps(state, indent=2, sort_keys=True).encode("utf-8"))


def record_backup(layout: Layout, outcome: BackupOutcome) -> None:
    """Remember a run's result for the Health page and the age alert."""
    def change(entry: dict[str, Any]) -> None:
        if outcome.ok:
            entry["last_success"] = now_iso()
            entry["last_snapshot"] = outcome.snapshot
        else:
            entry["last_failure"] = now_iso()
            entry["last_error"] = outcome.error or "failed"

    update_target(layout, outcome.target, change)


def record_drill(layout: Layout, target: str, ok: bool, detail: str) -> None:
    """Remember a restore drill's result (written by the drill, read by the Health page)."""
    def change(entry: dict[str, Any]) -> None:
        entry["last_drill"] = now_iso()
        entry["last_drill_ok"] = ok
        entry["last_drill_detail"] = detail

    update_target(layout, target, change)


def set_recovery_key(layout: Layout, target: str, fingerprint: str) -> None:
    """Remember that the target's repository opens with the vault's current recovery
    password (``targets._ensure_recovery_key``)."""
    def change(entry: dict[str, Any]) -> None:
        entry["recovery_key"] = fingerprint
        entry.pop("pending_recovery_key", None)  # the flag of versions before this one

    update_target(layout, target, change)
