"""Alerts where an administrator looks anyway (issue 19): a banner on every page for a
signed-in administrator, the account page's notifications, and the exposure banner of
the Health page.

Why: an e-mail can be filtered as spam and a webhook can be down; the people who sign in
every day must see that something happened too. The alerts are read back from the end of
the trail (``alert.sent`` / ``alert.failed`` / ``alert.recorded``: rule, severity, title;
never patient data, the alert texts carry none), cached for ``CACHE_SECONDS`` so a page
view does not re-read the trail's tail each time. The exposure banner is the exposure
guard's state file (``config.exposure``): shown as long as an exposure is active, a change
was refused, or an edit waits for a restart.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pacsvault.audit.tail import tail_records
from pacsvault.config.exposure import read_state
from pacsvault.web.i18n import N_, Gettext

ALERT_ACTIONS = frozenset({"alert.sent", "alert.failed", "alert.recorded"})
BANNER_HOURS = 24
NOTIFICATION_DAYS = 7
CACHE_SECONDS = 15.0
WINDOW = 512 * 1024


@dataclass(frozen=True)
class Notice:
    time: str  # "YYYY-MM-DD HH:MM:SS" UTC
    when: dt.datetime
    rule: str
    severity: str
    title: str
    delivered: str  # "mail", "webhook", "mail, webhook", "trail" (no channel) or "failed"


_cache: dict[Path, tuple[float, list[Notice]]] = {}
_lock = threading.Lock()


def recent_alerts(trail: Path, now: dt.datetime, days: int = NOTIFICATION_DAYS,
                  limit: int = 20) -> list[Notice]:
    """Alerts of the last ``days`` days, newest first (test alerts left out)."""
    with _lock:
        cached = _cache.get(trail)
    if cached is not None and time.monotonic() - cached[0] < CACHE_SECONDS:
        notices = cached[1]
    else:
        notices = _read(trail)
        with _lock:
            _cache[trail] = (time.monotonic(), notices)
    since = now - dt.timedelta(days=days)
    return [n for n in notices if n.when >= since][:limit]


def _read(trail: Path) -> list[Notice]:
    found: list[Notice] = []
    for body in tail_records(trail, WINDOW):
        if body.get("kind") != "event" or body.get("action") not in ALERT_ACTIONS:
            continue
        detail: dict[str, Any] = body.get("detail") or {}
        rule = str(detail.get("rule", ""))
        if rule == "test" or not rule:
            continue
        try:
            when = dt.datetime.fromisoformat(str(body.get("time", "")))
        except ValueError:
            continue
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.UTC)
        channels = [c for c in ("mail", "webhook") if detail.get(c) == "sent"]
        delivered = ", ".join(channels) or (
            "trail" if body.get("action") == "alert.recorded" else "failed")
        found.append(Notice(
            time=str(body.get("time", ""))[:19].replace("T", " "), when=when, rule=rule,
            severity=str(detail.get("severity", "")),
            title=str(body.get("message", "")).split(" -- ")[0][:200],
            delivered=delivered))
    return found


def admin_banner(trail: Path, now: dt.datetime) -> dict[str, Any] | None:
    """The banner every signed-in administrator sees: alerts of the last day."""
    recent = recent_alerts(trail, now, days=1)
    recent = [n for n in recent if n.when >= now - dt.timedelta(hours=BANNER_HOURS)]
    if not recent:
        return None
    critical = any(n.severity == "critical" for n in recent)
    return {"count": len(recent), "latest": recent[0], "critical": critical}


def exposure_banner(data_dir: Path) -> dict[str, Any] | None:
    """What the Health page shows in red for as long as it holds (None: nothing)."""
    state = read_state(data_dir)
    active = state.applied.active() if state.applied else []
    refused = state.refused is not None
    pending = state.pending is not None
    if not (active or refused or pending):
        return None
    return {
        "active": active, "since": state.applied_at[:19].replace("T", " "),
        "refused": state.refused.active() if state.refused else [],
        "reasons": list(state.reasons) if refused else [],
        "refused_at": state.refused_at[:19].replace("T", " "),
        "pending": pending, "pending_at": state.pending_at[:19].replace("T", " "),
    }


# The guard (cli/exposure.py) keeps its reasons in English in exposure.json (the log's and
# the trail's language); the page says them in the reader's language. Matched by their
# fixed beginnings; the variable part (finding ids, an error) is kept as it is.
_REASONS: tuple[tuple[str, str], ...] = (
    ("no alert channel has delivered a test",
     N_("no alert channel has delivered a test as configured now: set mail_to/smtp_host or "
        "webhook_url in [alerts], then run 'pacsvault alerts test'")),
    ("the security check's network section reports ",
     N_("the security check's network section reports %(rest)s")),
    ("the security check's network section could not run: ",
     N_("the security check's network section could not run: %(rest)s")),
    ("the archive is sealed",
     N_("the archive is sealed: the guard runs after the unseal and a restart")),
)


def reason_text(reason: str, _: Gettext) -> str:
    """One refusal reason in the reader's language (unknown ones as they are)."""
    for start, message in _REASONS:
        if reason.startswith(start):
            rest = reason[len(start):]
            return _(message) % {"rest": rest} if "%(rest)s" in message else _(message)
    return reason

