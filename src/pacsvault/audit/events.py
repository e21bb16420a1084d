"""Event model (DICOM PS3.15 A.5 vocabulary) and the recorder that fans events out."""

from __future__ import annotations

import datetime as dt
import enum
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol


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


class Sink(Protocol):
    def write(self, event: AuditEvent) -> None: ...


class LogSink:
    """Human-readable line per event, for the operator's console or journal."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self._log = logger or logging.getLogger("pacsvault.events")

    def write(self, event: AuditEvent) -> None:
        level = logging.INFO
        if event.code is EventCode.SECURITY_ALERT or event.outcome is not Outcome.SUCCESS:
            level = logging.WARNING
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


class Recorder:
    """Fan-out to every sink; a failing sink is reported but never stops the others."""

    def __init__(self, sinks: list[Sink] | None = None) -> None:
        self._sinks: list[Sink] = list(sinks or [])
        self._lock = threading.Lock()

    def add_sink(self, sink: Sink) -> None:
        with self._lock:
            self._sinks.append(sink)

    def emit(self, event: AuditEvent) -> None:
        with self._lock:
            sinks = list(self._sinks)
        for sink in sinks:
            try:
                sink.write(event)
            except Exception as exc:  # a sink must not take the server down
                logging.getLogger("pacsvault.events").error(
                    "event sink %s failed: %s", type(sink).__name__, type(exc).__name__
                )
