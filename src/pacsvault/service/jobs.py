"""Background jobs run by ``serve``: backups, restore drills, retention listings...

Each job is a ``tick(vault)`` called every ``every`` seconds in one background thread; the
job decides itself, from its own persisted state, whether anything is due (a schedule such
as "daily at 01:30" survives restarts that way). Jobs are named here as
``"module:function"`` and imported only when ``serve`` starts them, so this module stays
free of the packages the jobs need. A failing tick is logged (one line, no patient data)
and retried at the next tick: a job never stops the server.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pacsvault.vault import Vault

log = logging.getLogger("pacsvault.jobs")

FIRST_AFTER_ENV = "PACSVAULT_JOBS_FIRST_AFTER"


@dataclass(frozen=True)
class JobSpec:
    name: str
    target: str  # "package.module:function", the function takes the open Vault
    every: float  # seconds between ticks
    first_after: float = 60.0  # seconds after start (let the listeners settle first)


# Append one line per job (surgical edits: several features register here).
JOBS: list[JobSpec] = [
    # once a day: count the patients past their retention period (storage/retention.py)
    JobSpec("retention", "pacsvault.storage.retention:tick", every=3600),
    # backups when due, pruning, stale-backup check, restore drills (backup/schedule.py)
    JobSpec("backup", "pacsvault.backup.schedule:tick", every=60, first_after=60),
    # objects in a bucket: orphan sweep when due, and a slice of the scrub (storage/scrub.py)
    JobSpec("storage-orphans", "pacsvault.storage.scrub:sweep_tick", every=5, first_after=60),
    JobSpec("storage-scrub", "pacsvault.storage.scrub:tick", every=60, first_after=120),
    # the breach register's 72-hour clock: alerts at 48 h and 66 h (breach/clock.py)
    JobSpec("breach-clock", "pacsvault.breach.clock:tick", every=300, first_after=60),
    # the security self-check, daily at [check] at, kept for Health (check/record.py)
    JobSpec("check", "pacsvault.check.record:tick", every=60, first_after=120),
    # [forward] rules: queue what was stored, send what is due (dicom/forward.py)
    JobSpec("forward", "pacsvault.dicom.forward:tick", every=2, first_after=5),
]


def _load(target: str) -> Callable[[Vault], None]:
    module, _, function = target.partition(":")
    fn: Callable[[Vault], None] = getattr(importlib.import_module(module), function)
    return fn


class JobRunner:
    """One daemon thread ticking every registered job in turn."""

    def __init__(self, vault: Vault, specs: list[JobSpec] | None = None) -> None:
        self._vault = vault
        self._specs = list(JOBS if specs is None else specs)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pacsvault-jobs", daemon=True)
        start = time.monotonic()
        # Tests start a server and want its jobs now, not in a minute.
        override = os.environ.get(FIRST_AFTER_ENV)
        self._due = {spec.name: start + (float(override) if override else spec.first_after)
                     for spec in self._specs}

    def start(self) -> None:
        if self._specs:
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def stopping(self) -> threading.Event:
        """Set when the server stops: a long job (a backup) may check it and give up."""
        return self._stop

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            now = time.monotonic()
            for spec in self._specs:
                if self._stop.is_set():
                    return
                if now < self._due[spec.name]:
                    continue
                self._due[spec.name] = now + spec.every
                try:
                    _load(spec.target)(self._vault)
                except Exception as exc:  # a job never takes the server down
                    log.error("background job %s failed: %s", spec.name,
                              type(exc).__name__)
