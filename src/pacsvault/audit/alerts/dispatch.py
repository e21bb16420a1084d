"""What each alert rule watches, so the detector applies a rule only to its events.

Why: every event of the server goes to the alert sink, and most are stored images that no
rule watches (issue 17: running the eighteen rules on each, on a thread woken for it, was
a visible share of an image's CPU). A rule declares the actions, event codes and action
suffixes it watches; the detector dispatches on them and the sink hands its thread only
events some rule watches. A rule still checks the event's outcome and details itself,
and ``tests/test_alert_dispatch.py`` checks that no rule finds anything in an event
outside what it declares (an event it watches is never skipped).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from pacsvault.audit.alerts.findings import Finding
from pacsvault.audit.events import AuditEvent, EventCode

Rule = Callable[[AuditEvent], list[Finding]]
DISPATCH_KEPT = 4096  # (action, code) pairs whose rules a detector remembers


@dataclass(frozen=True, init=False)
class Watch:
    """A rule and what it watches: an event matches by its exact action, its code, or
    the end of its action."""

    rule: Rule
    actions: frozenset[str] = field(default_factory=frozenset)
    codes: frozenset[EventCode] = field(default_factory=frozenset)
    suffixes: tuple[str, ...] = ()

    def __init__(self, rule: Rule, *, actions: Iterable[str] = (),
                 codes: Iterable[EventCode] = (), suffixes: Iterable[str] = ()) -> None:
        object.__setattr__(self, "rule", rule)
        object.__setattr__(self, "actions", frozenset(actions))
        object.__setattr__(self, "codes", frozenset(codes))
        object.__setattr__(self, "suffixes", tuple(suffixes))

    def matches(self, action: str, code: EventCode) -> bool:
        return (action in self.actions or code in self.codes
                or (bool(self.suffixes) and action.endswith(self.suffixes)))


__all__ = ["DISPATCH_KEPT", "Rule", "Watch"]
