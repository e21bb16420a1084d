"""What the scrubber and the orphan sweep last did, for ``pacsvault status`` and the page.

Why a file: their only record was the audit trail (``storage.scrub``,
``storage.orphans``), and the report reads just the trail's last few kilobytes, where a
scrub pass a day old is long gone under the store records. ``DATA/storage-scrub.json``
(0600, per instance: each instance runs its own jobs) keeps the last pass and the last
sweep: times, counts and how the pass was run. No object id, no UID, nothing about a
patient: what is missing or corrupt is listed by ``pacsvault storage scrub`` and in the
trail. Written atomically; a failure to write it is logged and never fails the scrub.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pacsvault.fsutil import write_atomic

if TYPE_CHECKING:
    from pacsvault.storage.s3 import Sweep
    from pacsvault.storage.scrub import ScrubReport

log = logging.getLogger("pacsvault.storage")

FILE = "storage-scrub.json"


def path(root: Path) -> Path:
    return root / FILE


def load(root: Path) -> dict[str, Any]:
    """The recorded state ({} when none or unreadable)."""
    try:
        found = json.loads(path(root).read_text("utf-8"))
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def _save(root: Path, part: str, value: dict[str, Any]) -> None:
    state = load(root)
    state[part] = {"time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), **value}
    try:
        write_atomic(path(root), json.dumps(state, indent=1).encode())
    except OSError as exc:
        log.warning("cannot record the %s state: %s", part, type(exc).__name__)


def note_scrub(root: Path, report: ScrubReport, *, via: str, complete: bool) -> None:
    """A scrub pass ended (``complete``) or found a bad object midway (counts so far)."""
    _save(root, "scrub", {"via": via, "complete": complete, "checked": report.checked,
                          "skipped": report.skipped, "missing": len(report.missing),
                          "corrupt": len(report.corrupt)})


def note_sweep(root: Path, done: Sweep) -> None:
    """An orphan sweep of the bucket ran."""
    _save(root, "sweep", {"listed": done.listed, "removed": len(done.removed),
                          "young": done.young, "foreign": done.foreign,
                          "refused": done.refused})
