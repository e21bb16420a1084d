"""The 72-hour clock's alerts: at 48 h and 66 h after awareness, while no decision on
notifying the authority is recorded.

Why a job of ``serve`` (``service.jobs``) and not a timer per record: the register is read
again at every tick, so a restart, an update from the command line or a record opened by
another instance are all seen; a step written into the record ("clock-48h") makes each
alert once only, whoever ticks: it is written before the alert, and of two instances
writing the same next version one fails (``breach_versions`` is unique per id and version)
and sends nothing. The alert itself is a ``breach.clock`` Security Alert event
(breach id and hours, never patient data), which the alert rules turn into a mail or
webhook like any other (``audit.alerts.rules``). ``now`` is injectable for tests.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable

from pacsvault.audit.events import AuditEvent, EventCode, Outcome
from pacsvault.breach.model import Breach, BreachError, utc
from pacsvault.breach.store import BreachRegister
from pacsvault.vault import Vault

log = logging.getLogger("pacsvault.breach")

CLOCK_ACTION = "breach.clock"


def _step(hours: int) -> str:
    return f"clock-{hours}h"


def due(breach: Breach, now: dt.datetime) -> list[int]:
    """Clock alerts reached and not yet sent for ``breach``."""
    sent = {s.what for s in breach.steps}
    return [h for h in breach.clock(now).due_alerts() if _step(h) not in sent]


def _unless_noted(step: str) -> Callable[[Breach], None]:
    """A change that refuses when the latest version already has ``step`` (another
    instance sent this alert after this tick read the register)."""
    def check(record: Breach) -> None:
        if step in {s.what for s in record.steps}:
            raise BreachError(f"breach {record.id}: {step} already noted")
    return check


def tick(vault: Vault, now: dt.datetime | None = None) -> list[tuple[str, int]]:
    """Send the clock alerts due now; returns (breach id, hours) of those sent."""
    when = utc(now or dt.datetime.now(dt.UTC))
    register = BreachRegister(vault, clock=lambda: when)
    sent: list[tuple[str, int]] = []
    for breach in register.all():
        for hours in due(breach, when):
            try:  # the step first, on the latest version; two instances at once: the
                register.update(breach.id, _unless_noted(_step(hours)), by="pacsvault",
                                action="breach.clock_noted", step=_step(hours), force=True)
            except BreachError:  # version is unique, one sends (or it was sent meanwhile)
                log.info("breach %s: %d h alert taken by another instance", breach.id, hours)
                continue
            clock = breach.clock(when)
            vault.recorder.emit(AuditEvent(
                action=CLOCK_ACTION, outcome=Outcome.SERIOUS_FAILURE,
                code=EventCode.SECURITY_ALERT,
                message=(f"breach {breach.id}: {hours} h since awareness and no decision on "
                         "notifying the authority; the deadline is "
                         f"{clock.deadline:%Y-%m-%d %H:%M} UTC"),
                detail={"breach": breach.id, "hours": hours,
                        "hours_left": max(0, round(clock.hours_left)),
                        "deadline": clock.deadline.isoformat(timespec="minutes")},
            ), required=False)
            log.warning("breach %s: %d h alert sent", breach.id, hours)
            sent.append((breach.id, hours))
    return sent
