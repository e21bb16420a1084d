"""Running tamper detection: the server keeps checking its own audit trail.

Why: verification at start and on demand leaves the whole running time open; an edit,
a deleted line, a cut tail or a forged line appended while the server runs must reach the
practice within a minute, not at the next restart.

Two triggers, one check (``AuditTrail.check``, incremental: only the lines appended
since the last check are read and verified, the end is compared with the index anchor):

- every ``interval`` seconds (``[audit] check_seconds``);
- at once when an append finds the file's last record different from what was anchored
  or badly signed (``AuditTrail.on_problem``).

Why incremental: re-reading and re-hashing a year of trail every 30 s cost ~0.4 s of CPU
per check at 100,000 records (``bench/trail_check.py``), growing with the trail. What the
short check cannot see it hands to a full one: a file replaced, cut or shifted (a line
edited to another length, deleted) is checked in full at once; a same-length edit of an
older line is found by the full check (the verified prefix re-hashed) run every
``FULL_CHECK_EVERY`` checks and after every hint from an append.

Each new problem becomes one ``audit.tamper`` Security Alert event (the ``audit-broken``
alert rule mails it); a problem is reported once, not at every check.
"""

from __future__ import annotations

import logging
import threading

from pacsvault.audit.events import AuditEvent, EventCode, Outcome, Recorder
from pacsvault.audit.trail import AuditTrail, Checkpoint

log = logging.getLogger("pacsvault.audit")

TAMPER_ACTION = "audit.tamper"
BASELINE_SIGNATURES = 1000  # the start-up check verified the same tail already
FULL_CHECK_EVERY = 10  # checks: 5 minutes at the default [audit] check_seconds = 30


class TrailWatcher:
    def __init__(self, trail: AuditTrail, recorder: Recorder, interval: float) -> None:
        self._trail = trail
        self._recorder = recorder
        self._interval = max(0.5, interval)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._hints: list[str] = []
        self._reported: set[str] = set()
        self._point: Checkpoint | None = None
        self._checks = 0
        self._thread = threading.Thread(target=self._run, name="audit-watch", daemon=True)

    def start(self, *, known: str = "") -> None:
        """Take the baseline now; ``known`` is a problem already reported at start."""
        if known:
            self._reported.add(known)
        self._point, problem = self._trail.check(None, tail=BASELINE_SIGNATURES)
        # The start-up verification reported the damage found so far.
        self._reported.update(p for p in (problem, self._trail.broken()) if p)
        self._trail.on_problem = self._hint
        self._trail.vouched = set()  # the lines appended from now on (``trail_verify._ours``)
        self._thread.start()

    def stop(self) -> None:
        self._trail.on_problem = None
        self._trail.vouched = None
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(10)

    def _hint(self, problem: str) -> None:
        with self._lock:
            self._hints.append(problem)
        self._wake.set()

    def check_now(self) -> list[str]:
        """One check; returns the problems newly reported (also used by tests)."""
        with self._lock:
            hints, self._hints = self._hints, []
        self._checks += 1
        full = bool(hints) or self._checks % FULL_CHECK_EVERY == 0
        try:
            self._point, problem = self._trail.check(self._point, full=full)
        except Exception as exc:  # a check that cannot run is itself worth knowing
            problem = f"the audit trail could not be checked ({type(exc).__name__})"
        new = [p for p in dict.fromkeys([*hints, problem]) if p and p not in self._reported]
        for found in new:
            self._reported.add(found)
            log.critical("audit trail changed while the server runs: %s", found)
            self._recorder.emit(AuditEvent(
                action=TAMPER_ACTION, outcome=Outcome.MAJOR_FAILURE,
                code=EventCode.SECURITY_ALERT,
                message=f"the audit trail changed while the server was running: {found}",
            ), required=False)
        return new

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self._interval)
            self._wake.clear()
            if self._stop.is_set():
                return
            self.check_now()


def repair_at_start(trail: AuditTrail) -> None:
    """Before serving: a torn tail left by a failed write or a crash gets its signed repair
    record now, so the start-up verification passes and says nothing untrue. When the disk
    is still full this fails; the first access will be refused and alerted then."""
    try:
        record = trail.repair()
    except Exception as exc:
        log.critical("the audit trail has an incomplete last line and cannot be repaired "
                     "now (%s)", type(exc).__name__)
        return
    if record is not None:
        log.warning("audit trail: an incomplete write (%s bytes) was described by repair "
                    "record %d; nothing was removed", record.detail.get("cut_bytes"),
                    record.seq)
