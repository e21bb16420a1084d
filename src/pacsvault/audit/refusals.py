"""Refused connections, recorded in the trail without letting an attacker flood it.

Why: every refusal of the network budget (per-source cap, server busy, deadline expired,
oversized or malformed PDU, slow HTTP client) must be in the audit trail, but a hostile
host can cause thousands per minute, and each trail record is a signed, fsync'ed write.
So the first refusal of a kind from a source is recorded at once, and the repeats within
``interval`` seconds become one summary record with their count. Memory is bounded: past
``MAX_KEYS`` distinct (source, reason) pairs, further sources are counted under ``*``.

``burst`` does the same for events that are recorded one by one in normal use (a failed
TLS handshake, an association rejected by the policy, a connection from outside the
trusted networks): the first ``BURST`` per source and interval go to the trail as they
are, further ones only as one summary record of the same action with their count.

Alerting is not done here: the alert rule ``connection-abuse`` (audit/alerts.py) fires
on the summary records, i.e. when refusals repeat.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from pacsvault.audit.events import AuditEvent, EventCode, Outcome, Recorder, Sink

MAX_KEYS = 4096
BURST = 60

# reason -> what the record's message says (no peer-supplied text, ever)
REASONS: dict[str, str] = {
    "per-source-limit": "too many connections at once from this source",
    "busy": "too many connections at once waiting for association",
    "local-limit": "association refused: local limit exceeded (all association slots in use)",
    "deadline": "connection cut: a read deadline expired",
    "oversized-pdu": "connection aborted: the PDU announced is larger than allowed",
    "malformed-pdu": "connection aborted: malformed or unexpected PDU",
    "proxy-header": "connection closed: a load balancer's PROXY header was missing or malformed",
}


@dataclass
class _Pending:
    since: float
    count: int = 0
    detail: dict[str, str | int | bool] = field(default_factory=dict)
    passed: int = 0
    template: AuditEvent | None = None


class RefusalLog:
    """Aggregates refusals per (source, reason) and emits them as audit events."""

    def __init__(self, recorder: Recorder, interval: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._recorder = recorder
        self._interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self._pending: dict[tuple[str, str, str], _Pending] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Flush summaries in the background (idempotent)."""
        with self._lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._run, name="refusals", daemon=True)
            self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self.flush(force=True)

    def refused(self, service: str, address: str, reason: str,
                detail: Mapping[str, str | int | bool] | None = None) -> None:
        """One refusal; recorded now if it is the first of its kind from ``address``."""
        now = self._clock()
        first = False
        with self._lock:
            key = (service, address, reason)
            if key not in self._pending and len(self._pending) >= MAX_KEYS:
                key = (service, "*", reason)
            entry = self._pending.get(key)
            if entry is None:
                self._pending[key] = _Pending(since=now)
                first = True
            else:
                entry.count += 1
                entry.detail = dict(detail or {})
        if first:
            self._emit(service, key[1], reason, 1, detail or {})
        self.flush()

    def burst(self, event: AuditEvent, limit: int = BURST) -> None:
        """Record ``event`` as is, unless its source sent ``limit`` alike this interval."""
        now = self._clock()
        with self._lock:
            key = ("burst:" + event.action, event.actor_address, "")
            if key not in self._pending and len(self._pending) >= MAX_KEYS:
                key = ("burst:" + event.action, "*", "")
            entry = self._pending.setdefault(key, _Pending(since=now, template=event))
            entry.passed += 1
            suppressed = entry.passed > limit
            if suppressed:
                entry.count += 1
                entry.template = event
        if not suppressed:
            self._recorder.emit(event, required=False)
        self.flush()

    def flush(self, force: bool = False) -> None:
        """Emit the summaries whose interval is over (all of them when ``force``)."""
        now = self._clock()
        due: list[tuple[tuple[str, str, str], _Pending]] = []
        with self._lock:
            for key, entry in list(self._pending.items()):
                if force or now - entry.since >= self._interval:
                    del self._pending[key]
                    if entry.count:
                        due.append((key, entry))
                        if not force:  # still going: the next repeats form a new summary
                            self._pending[key] = _Pending(since=now)
        for (service, address, reason), entry in due:
            if entry.template is not None:
                self._emit_burst(entry.template, address, entry.count)
                continue
            self._emit(service, address, reason, entry.count,
                       {**entry.detail, "summary": True})

    def _emit_burst(self, like: AuditEvent, address: str, count: int) -> None:
        self._recorder.emit(AuditEvent(
            action=like.action, outcome=like.outcome, code=like.code,
            actor_address=address,
            message=(f"{count} more like this from {address} within {self._interval:g} s "
                     "(not recorded one by one)"),
            detail={"summary": True, "count": count},
        ), required=False)

    def _emit(self, service: str, address: str, reason: str, count: int,
              detail: Mapping[str, str | int | bool]) -> None:
        message = REASONS.get(reason, "connection refused")
        if count > 1 or detail.get("summary"):
            message += f" ({count} more time(s) within {self._interval:g} s)"
        self._recorder.emit(AuditEvent(
            action=f"{service}.connection.refused", outcome=Outcome.MINOR_FAILURE,
            code=EventCode.SECURITY_ALERT, actor_address=address, message=message,
            detail={**detail, "reason": reason, "count": count},
        ), required=False)

    def _run(self) -> None:
        while not self._stop.wait(min(1.0, self._interval / 4)):
            try:
                self.flush()
            except Exception:  # a failing sink must not stop the summaries
                time.sleep(1.0)


class BurstRecorder(Recorder):
    """The recorder handed to producers whose events a peer can multiply at will.

    Connections from outside the trusted networks and associations rejected by the policy
    are each one event, recorded one by one, as long as they come at a human pace; beyond
    ``BURST`` per source and interval they are counted (``RefusalLog.burst``), so a flood
    can neither fill the disk with signed records nor slow the accept loop down.
    """

    def __init__(self, inner: Recorder, refusals: RefusalLog) -> None:  # no sinks of its own
        self._inner = inner
        self._refusals = refusals

    def add_sink(self, sink: Sink) -> None:
        self._inner.add_sink(sink)

    def emit(self, event: AuditEvent, *, required: bool | None = None) -> None:
        if required:
            self._inner.emit(event, required=required)
        else:
            self._refusals.burst(event)
