"""What the alert rules produce: ``Finding`` (one rule match) and ``Alert`` (one notice).

Why apart: both the pure ``Detector`` (``rules``) and the delivery (``delivery``) speak in
these types, and the small text helpers here are the only place that turns names from the
network into printable text for a message, so neither side re-implements them.
"""

from __future__ import annotations

import datetime as dt
import enum
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field

from pacsvault.audit.events import AuditEvent

# --- what the detector produces ----------------------------------------------------------


class Severity(enum.Enum):
    WARNING = "warning"
    CRITICAL = "critical"


@dataclass(frozen=True)
class Finding:
    """One rule match, before grouping. Every text field is free of patient data."""

    rule: str
    subject: str  # grouping key within the rule: "node:AE", "user:x", "address:a", ""
    severity: Severity
    title: str
    what: str  # plain language: what happened
    look: str  # where to look (a command)
    time: dt.datetime
    source: str = ""  # address or AE, to say "from N different sources" in follow-ups
    ae: str = ""
    address: str = ""
    user: str = ""
    facts: Mapping[str, str | int | bool] = field(default_factory=dict)


@dataclass(frozen=True)
class Alert:
    """One notification: a first occurrence, or the grouped follow-up of its repeats."""

    rule: str
    severity: Severity
    title: str
    text: str  # the full plain-language body (what happened, where to look)
    subject: str
    first_seen: dt.datetime
    last_seen: dt.datetime
    count: int  # occurrences this notification covers
    summary: bool  # False: first occurrence, sent at once; True: follow-up of repeats
    look: str
    ae: str = ""
    address: str = ""
    user: str = ""
    facts: Mapping[str, str | int | bool] = field(default_factory=dict)



def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def clean_text(text: str, limit: int = 64) -> str:
    """One printable line: names come from the network and go into mail headers."""
    out = "".join(c if c.isprintable() else "?" for c in text).strip()
    return out[:limit] + ("..." if len(out) > limit else "")


def minute_text(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M")


def utc_text(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


@dataclass(frozen=True)
class Who:
    key: str  # grouping subject
    label: str  # for people: "node 'VIEWER' (192.168.1.20)"
    filter: str  # audit show filter


def who_of(event: AuditEvent) -> Who:
    ae, user = clean_text(event.actor_ae), clean_text(event.actor_user)
    addr = clean_text(event.actor_address)
    at = f" from {addr}" if addr else ""
    if user:
        return Who(f"user:{user}", f"user '{user}'{at}", f"--user {shlex.quote(user)}")
    if ae:
        return Who(f"node:{ae}", f"node '{ae}'" + (f" ({addr})" if addr else ""),
                   f"--node {shlex.quote(ae)}")
    if addr:
        return Who(f"address:{addr}", f"a client at {addr}", "--action dicom")
    return Who("unknown", "an unidentified client", "")


def show_command(filter_: str, since: dt.datetime) -> str:
    return " ".join(p for p in ("pacsvault audit show", filter_, f"--since {minute_text(since)}")
                    if p)


__all__ = [
    "Alert", "Finding", "Severity", "Who", "clean_text", "minute_text", "show_command",
    "utc_now", "utc_text", "who_of",
]
