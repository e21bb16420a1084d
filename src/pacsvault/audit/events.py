"""Event model (DICOM PS3.15 A.5 vocabulary) and the recorder that fans events out."""

from __future__ import annotations

import datetime as dt
import enum
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol


class EventCode(enum.Enum):
    """DCM event IDs of PS3.15 A.5 (value, meaning)."""

    APPLICATION_ACTIVITY = "110100"
    BEGIN_TRANSFERRING = "110102"
    INSTANCES_ACCESSED = "110103"
    INSTANCES_TRANSFERRED = "110104"
    EXPORT = "110106"
    IMPORT = "110107"
    NETWORK_ENTRY = "110108"
    QUERY = "110112"
    SECURITY_ALERT = "110113"
    USER_AUTHENTICATION = "110114"


# Security Alert event type codes (PS3.15 A.5.3.11, DCM), in an event's ``type_code``
# detail: a change of who can reach the archive (the exposure switches, issue 19), and of
# who is told (the alert channels).
NETWORK_CONFIGURATION = "110128"
SECURITY_CONFIGURATION = "110129"


class Outcome(enum.Enum):
    """EventOutcomeIndicator of PS3.15 A.5.1."""

    SUCCESS = "0"
    MINOR_FAILURE = "4"
    SERIOUS_FAILURE = "8"
    MAJOR_FAILURE = "12"


@dataclass(frozen=True)
class AuditEvent:
    """One thing that happened.

    ``detail`` and ``message`` must never carry patient data (names, IDs, birth dates):
    they go to plain logs and stay readable in the trail. Object references go in
    ``study_uids``/``sop_uids``/``patient_ids``, which the trail seals and logs omit.
    """

    action: str
    outcome: Outcome
    code: EventCode
    message: str = ""
    actor_ae: str = ""
    actor_address: str = ""
    actor_user: str = ""
    study_uids: tuple[str, ...] = ()
    sop_uids: tuple[str, ...] = ()
    patient_ids: tuple[str, ...] = ()
    detail: Mapping[str, str | int | bool] = field(default_factory=dict)
    time: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))
    # Optional, sealed with the references: which patient each study belongs to and which
    # study each instance belongs to, when the producer knows (else the trail asks the
    # index). A patient's access request then shows their own references only.
    study_patients: Mapping[str, str] = field(default_factory=dict)
    sop_studies: Mapping[str, str] = field(default_factory=dict)


class Sink(Protocol):
    def write(self, event: AuditEvent) -> None: ...


class LogSink:
    """Human-readable line per event, for the operator's console or journal."""

    nonblocking = True  # one log line (``Recorder.try_emit``)

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self._log = logger or logging.getLogger("pacsvault.events")

    def write(self, event: AuditEvent) -> None:
        level = logging.INFO
        if event.code is EventCode.SECURITY_ALERT or event.outcome is not Outcome.SUCCESS:
            level = logging.WARNING
        if not self._log.isEnabledFor(level):
            return  # nothing built for a line nobody reads (issue 17: one per stored batch)
        who = " ".join(
            p for p in (
                f"ae={event.actor_ae}" if event.actor_ae else "",
                f"from={event.actor_address}" if event.actor_address else "",
                f"user={event.actor_user}" if event.actor_user else "",
            ) if p
        )
        extra = " ".join(f"{k}={v}" for k, v in event.detail.items())
        text = " ".join(p for p in (event.action, event.outcome.name.lower(), who, extra) if p)
        if event.message:
            text += f" -- {event.message}"
        self._log.log(level, "%s", text)


# Events that record an access to patient data (reading, sending, receiving, exporting).
# The promise is that such an access is never served unrecorded: when the durable sink
# (the trail) cannot take the record, ``emit`` raises ``AuditUnavailable`` and the caller
# refuses the access (DICOM failure status, HTTP 503).
ACCESS_CODES = frozenset({
    EventCode.QUERY, EventCode.INSTANCES_ACCESSED, EventCode.INSTANCES_TRANSFERRED,
    EventCode.BEGIN_TRANSFERRING, EventCode.EXPORT, EventCode.IMPORT,
})

# Events that let no data leave and are followed, within moments, by the records of what
# the association does (its query's, its retrieval's, its stores' batch): written at
# once and made durable by the next record's fsync, instead of by one of their own
# (``Recorder.emit``, ``AuditTrail.defer``; issue 17: a C-FIND association paid two
# commits for one query).
DEFERRABLE = frozenset({"dicom.association.accepted"})

UNAVAILABLE_ACTION = "audit.unavailable"
_CRITICAL_EVERY = 60.0  # seconds between two CRITICAL log lines while the trail is down


def _not_durable(sinks: tuple[Sink, ...]) -> tuple[Sink, ...]:
    """The sinks ``publish`` writes to: all but the durable one(s)."""
    return tuple(s for s in sinks if not getattr(s, "durable", False))


def _tryable(sinks: tuple[Sink, ...]) -> tuple[Any, tuple[Sink, ...]] | None:
    """(the durable sink, the others) when ``try_emit`` can use them: one durable sink
    that tries without waiting (``try_write``), every other one ``nonblocking``."""
    durable = [s for s in sinks if getattr(s, "durable", False)]
    others = _not_durable(sinks)
    if (len(durable) != 1 or getattr(durable[0], "try_write", None) is None
            or not all(getattr(s, "nonblocking", False) for s in others)):
        return None
    return durable[0], others


class AuditUnavailable(Exception):
    """The record of an access could not be made durable: the access must be refused."""


class Recorder:
    """Fan-out to every sink; a failing sink is reported but never stops the others.

    A sink with ``durable = True`` (the trail) is where a record must be durable. When it
    fails, the other sinks still get the event, a CRITICAL line is logged (rate-limited),
    an ``audit.unavailable`` Security Alert goes to the non-durable sinks (the alert sink
    mails it without touching the disk), and for an access event ``emit`` raises
    ``AuditUnavailable``.
    """

    def __init__(self, sinks: list[Sink] | None = None) -> None:
        # Snapshots, replaced (never changed) by ``add_sink``: ``emit`` and ``publish``
        # read them without the lock or a copy (issue 17: ``publish`` runs for every
        # stored batch, under the index's write lock).
        self._all: tuple[Sink, ...] = tuple(sinks or ())
        self._published: tuple[Sink, ...] = _not_durable(self._all)
        self._tryable = _tryable(self._all)
        self._lock = threading.Lock()
        self._down_since: float | None = None
        self._last_critical = 0.0
        self._log = logging.getLogger("pacsvault.events")

    def add_sink(self, sink: Sink) -> None:
        with self._lock:
            self._all = (*self._all, sink)
            self._published = _not_durable(self._all)
            self._tryable = _tryable(self._all)

    @property
    def available(self) -> bool:
        """False while the last write to the durable sink failed."""
        return self._down_since is None

    def emit(self, event: AuditEvent, *, required: bool | None = None) -> None:
        """Send ``event`` to every sink.

        ``required`` (default: the event is an access, ``ACCESS_CODES``) makes a failure
        of the durable sink raise ``AuditUnavailable`` after the other sinks ran.
        An event in ``DEFERRABLE`` (lets no data leave) goes to a durable sink's
        ``defer`` when it has one: written at once, made durable by the next record's
        fsync (``AuditTrail.defer``: at most ``DEFER_SECONDS`` later). Never a required
        event.
        """
        is_required = required if required is not None else event.code in ACCESS_CODES
        deferred = event.action in DEFERRABLE and not is_required
        sinks = self._all
        failure: BaseException | None = None
        durable = False
        for sink in sinks:
            try:
                later = getattr(sink, "defer", None) if deferred else None
                if later is not None:
                    later(event)
                else:
                    sink.write(event)
            except Exception as exc:  # a sink must not take the server down
                self._log.error("event sink %s failed: %s", type(sink).__name__,
                                type(exc).__name__)
                if getattr(sink, "durable", False):
                    failure = exc
            else:
                durable = durable or bool(getattr(sink, "durable", False))
        self._settle(event, failure, durable=durable, required=is_required)

    def _settle(self, event: AuditEvent, failure: BaseException | None, *, durable: bool,
                required: bool) -> None:
        """After the sinks: the trail writable again, or unavailable (raises for a
        ``required`` event)."""
        if failure is None:
            if durable and self._down_since is not None:
                self._down_since = None
                self._log.warning("the audit trail is writable again")
            return
        self._unavailable(event, failure)
        if required:
            raise AuditUnavailable(str(failure)) from failure

    def try_emit(self, event: AuditEvent) -> bool:
        """``emit`` for a caller that must not wait (an event loop), or False with the
        event given to no sink. Only when the one durable sink can try without waiting
        (``try_write``: the trail's ``try_append``) and every other sink says it never
        waits (``nonblocking``: a log line, the alert queue), and only for a required
        event (an access: ``emit``'s semantics, ``AuditUnavailable``, are kept). The
        durable sink is tried first, so that nothing is written twice when the caller
        falls back to ``emit`` in a worker thread."""
        tryable = self._tryable
        if tryable is None or event.code not in ACCESS_CODES or event.action in DEFERRABLE:
            return False
        durable, others = tryable
        failure: BaseException | None = None
        try:
            if not durable.try_write(event):
                return False
        except Exception as exc:
            self._log.error("event sink %s failed: %s", type(durable).__name__,
                            type(exc).__name__)
            failure = exc
        for sink in others:
            try:
                sink.write(event)
            except Exception as exc:  # a sink must not take the server down
                self._log.error("event sink %s failed: %s", type(sink).__name__,
                                type(exc).__name__)
        self._settle(event, failure, durable=True, required=True)
        return True

    def publish(self, event: AuditEvent) -> None:
        """Send an event already made durable elsewhere to the other sinks only."""
        for sink in self._published:
            try:
                sink.write(event)
            except Exception as exc:
                self._log.error("event sink %s failed: %s", type(sink).__name__,
                                type(exc).__name__)

    def durable_failed(self, event: AuditEvent, failure: BaseException) -> None:
        """Report a durable write that failed outside ``emit`` (a store batch record)."""
        self._unavailable(event, failure)

    def _unavailable(self, event: AuditEvent, failure: BaseException) -> None:
        now = time.monotonic()
        if self._down_since is None:
            self._down_since = now
        if now - self._last_critical >= _CRITICAL_EVERY:
            self._last_critical = now
            self._log.critical(
                "AUDIT TRAIL UNWRITABLE (%s): accesses to patient data are refused until "
                "it can be written again; free disk space on the data directory", failure)
        if event.action == UNAVAILABLE_ACTION or event.action.startswith("alert."):
            return  # no feedback loop through the alert sink
        self.publish(AuditEvent(
            action=UNAVAILABLE_ACTION, outcome=Outcome.MAJOR_FAILURE,
            code=EventCode.SECURITY_ALERT,
            message=f"an audit record could not be written ({failure}); the access was "
                    "refused" if event.code in ACCESS_CODES else
                    f"an audit record could not be written ({failure})",
            detail={"failed_action": event.action},
        ))
