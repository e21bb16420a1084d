"""Detection of suspicious activity on the event path, and alerts by e-mail and webhook.

Why here: the sanctioned practices learnt of their exposure from the regulator, years late.
Every event already flows through the ``Recorder``, so one more sink can watch that stream
and tell the practice the same day, without any producer knowing about alerts.

Three parts, separated so each can be tested alone:

* ``AlertSettings``: the ``[alerts]`` section of the toml. Addresses and thresholds live
  there; secrets never do (the SMTP password and webhook token are read from 0600 files).
* ``Detector``: pure logic. It consumes ``AuditEvent``s, applies the rules below with
  sliding windows on the events' own times, and returns ``Alert``s. The clock (used only to
  close grouping windows) is injectable, so tests replay a whole day in milliseconds.
* ``AlertSink``: a ``Sink`` for the ``Recorder``. ``write`` only enqueues (the DICOM thread
  must never wait on a mail server); one background thread runs the detector, sends mail
  over SMTP with STARTTLS and POSTs JSON to the optional webhook, then records each alert as
  an ``alert.sent`` / ``alert.failed`` Security Alert event through the same recorder.

Rules (ids are what ``disabled_rules`` takes):

``failed-logins``  ``auth.login.failed``: N failures within 10 minutes from one address (a
                   guessing run), or for one user from several addresses (distributed).
``account-locked`` ``auth.account.locked``: every lock.
``exposure``       ``exposure``: a connection from outside the trusted networks (port
                   forward / DMZ on the internet box). Critical, grouped for all addresses,
                   since an exposed server is scanned from many of them.
``unknown-node``   ``dicom.association.rejected`` (unregistered AE, wrong host, TLS or
                   certificate requirement not met) and ``dicom.move.unknown_destination``
                   (a node asked to send images somewhere unregistered).
``bulk-access``    one user or node reading more than N distinct studies (or patients, when
                   known) within one hour. Reads are retrievals, exports and image views,
                   never incoming stores; queries are not counted (viewers refresh study
                   lists all day, which is not a copy of the images).
``unusual-hours``  a read or a sign-in outside business hours (local time, days).
``audit-broken``   ``audit.verify`` that did not succeed, or ``audit.tamper`` (the running
                   server's watcher): the trail was edited or damaged.
``audit-unwritable`` ``audit.unavailable``: a record could not be written (disk full, I/O
                   error), so accesses are being refused; sent without touching the disk.
``disk-full``      ``dicom.store.failed`` with status A700 (images are being refused), and
                   the sink's periodic free-space check falling below ``disk_warn_free_mb``.
``connection-abuse`` a ``*.connection.refused`` summary (audit/refusals.py): one source
                   refused again and again by the DICOM/HTTPS connection budget.
``backup-failed``  ``backup.run``/``backup.verify``/``backup.prune``/``backup.drill`` that did
                   not succeed (per target and action): a copy is missing or would not
                   restore.
``backup-stale``   ``backup.stale`` (backup/schedule.py): the last good backup of a target
                   is older than ``[backup] max_age_hours``.
``archive-sealed`` ``application.start`` with ``sealed`` (the master key was unavailable:
                   receiving goes on, nothing can be read until someone unlocks it),
                   ``sealed.snapshot`` (the node snapshot does not verify: every device is
                   refused) and ``sealed.journal.damaged`` (sealed/).

Grouping: the first occurrence of a rule for one subject (a node, a user, an address, or
the whole server) is sent at once, because the practice must know within a minute. Further
occurrences within the group window are only counted; when the window ends, one follow-up
says how many more there were, between which times and from how many sources. If the
activity went on, the next window is twice as long (15 min, 30 min, 1 h ... capped at 6 h),
so a scan lasting a day yields about ten messages, not hundreds. A window that ends with no
repeat closes the group; the next occurrence is news again. ``close`` sends the pending
follow-ups so no count is lost at shutdown.

No patient data ever leaves in an alert: the text is built only from counts, AE titles,
user names, addresses and times. Event ``message`` texts are not copied, except the fixed
reasons of association refusals and the record numbers of a failed chain verification.
Study UIDs and patient IDs are kept in memory only to count distinct ones.
"""

from __future__ import annotations

import datetime as dt
import email.policy
import email.utils
import enum
import json
import logging
import queue
import shlex
import shutil
import smtplib
import socket
import ssl
import stat
import textwrap
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zoneinfo
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from pacsvault.audit.events import AuditEvent, EventCode, Outcome, Recorder
from pacsvault.config.alerts import (
    DAYS,
    RULES,
    AlertConfigError,
    AlertSettings,
    is_loopback_host,
    render_section,
)

log = logging.getLogger("pacsvault.alerts")

LOGIN_WINDOW = dt.timedelta(minutes=10)
BULK_WINDOW = dt.timedelta(hours=1)
MAX_GROUP_WINDOW = dt.timedelta(hours=6)

# What counts as reading patient data: retrievals, exports, image views (web).
READ_CODES = frozenset({
    EventCode.INSTANCES_ACCESSED, EventCode.INSTANCES_TRANSFERRED,
    EventCode.BEGIN_TRANSFERRING, EventCode.EXPORT,
})
# ... except what comes *in*: a modality storing images is not someone reading them.
INBOUND_PREFIXES = ("dicom.store", "import")

# Backup actions whose failure is an alert: (what failed, why it matters).
BACKUP_ACTIONS: dict[str, tuple[str, str]] = {
    "backup.run": ("backup run", "Images received since the last good backup exist only on "
                   "this server's disk until a run succeeds."),
    "backup.verify": ("backup verification", "The repository may be damaged: a restore "
                      "from it could fail. Make a new backup to another target soon."),
    "backup.prune": ("pruning of old snapshots", "The repository keeps growing; backups "
                     "themselves still run."),
    "backup.drill": ("restore drill", "Restoring this backup after a disaster would not "
                     "give back the archive as it was. Check the repository "
                     "('pacsvault backup verify') and make a new backup."),
}




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


@dataclass
class _Group:
    """Repeats of one rule for one subject, counted while a notice is recent."""

    window: dt.timedelta
    ends: dt.datetime
    notified: dt.datetime  # time of the last notification (first or follow-up)
    opening: Finding  # its "where to look" covers the whole episode
    latest: Finding
    suppressed: int = 0
    first_suppressed: dt.datetime | None = None
    sources: set[str] = field(default_factory=set)


class _Sliding:
    """Distinct values seen within a time window (for one subject)."""

    def __init__(self, span: dt.timedelta) -> None:
        self.span = span
        self._items: deque[tuple[dt.datetime, str]] = deque()
        self._counts: Counter[str] = Counter()

    def add(self, when: dt.datetime, values: Iterable[str]) -> None:
        for value in values:
            self._items.append((when, value))
            self._counts[value] += 1
        self.prune(when)

    def prune(self, now: dt.datetime) -> None:
        limit = now - self.span
        while self._items and self._items[0][0] <= limit:
            _, value = self._items.popleft()
            self._counts[value] -= 1
            if not self._counts[value]:
                del self._counts[value]

    @property
    def distinct(self) -> int:
        return len(self._counts)

    @property
    def total(self) -> int:
        return len(self._items)


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _clean(text: str, limit: int = 64) -> str:
    """One printable line: names come from the network and go into mail headers."""
    out = "".join(c if c.isprintable() else "?" for c in text).strip()
    return out[:limit] + ("..." if len(out) > limit else "")


def _minute(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M")


def _utc_text(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


@dataclass(frozen=True)
class _Who:
    key: str  # grouping subject
    label: str  # for people: "node 'VIEWER' (192.168.1.20)"
    filter: str  # audit show filter


def _who(event: AuditEvent) -> _Who:
    ae, user, addr = _clean(event.actor_ae), _clean(event.actor_user), _clean(event.actor_address)
    at = f" from {addr}" if addr else ""
    if user:
        return _Who(f"user:{user}", f"user '{user}'{at}", f"--user {shlex.quote(user)}")
    if ae:
        return _Who(f"node:{ae}", f"node '{ae}'" + (f" ({addr})" if addr else ""),
                    f"--node {shlex.quote(ae)}")
    if addr:
        return _Who(f"address:{addr}", f"a client at {addr}", "--action dicom")
    return _Who("unknown", "an unidentified client", "")


def _show(filter_: str, since: dt.datetime) -> str:
    return " ".join(p for p in ("pacsvault audit show", filter_, f"--since {_minute(since)}")
                    if p)


PatientResolver = Callable[[Sequence[str]], Iterable[str]]


class Detector:
    """The rules, as pure logic over events (no I/O, no threads).

    Sliding windows use each event's own time, so replaying recorded events gives the same
    alerts. ``clock`` only decides when a grouping window is over (``tick``). An optional
    ``patients_of`` maps study UIDs to patient keys (e.g. from the index) so that bulk
    access can also be counted in patients; its results stay in memory.
    """

    def __init__(
        self,
        settings: AlertSettings,
        *,
        clock: Callable[[], dt.datetime] = _utc_now,
        patients_of: PatientResolver | None = None,
    ) -> None:
        self.settings = settings
        self._clock = clock
        self._patients_of = patients_of
        self._disabled = frozenset(settings.disabled_rules)
        self._zone = zoneinfo.ZoneInfo(settings.timezone) if settings.timezone else None
        self._hours = settings.hours()
        self._days = {DAYS.index(d) for d in settings.business_days}
        self._group_window = dt.timedelta(minutes=settings.group_minutes)
        self._groups: dict[tuple[str, str], _Group] = {}
        self._login_by_address: dict[str, deque[dt.datetime]] = {}
        self._login_by_user: dict[str, deque[dt.datetime]] = {}
        self._studies: dict[str, _Sliding] = {}
        self._patients: dict[str, _Sliding] = {}
        self._rules: tuple[Callable[[AuditEvent], list[Finding]], ...] = (
            self._failed_logins, self._account_locked, self._exposure, self._unknown_node,
            self._bulk_access, self._unusual_hours, self._audit_broken, self._disk_full,
            self._connection_abuse,
            self._audit_unwritable,
            self._backup_failed, self._backup_stale, self._sealed,
        )

    # --- public -----------------------------------------------------------------------

    def observe(self, event: AuditEvent) -> list[Alert]:
        """Apply every rule to one event; returns the notifications due now."""
        if not self.settings.enabled or event.action.startswith("alert."):
            return []
        findings: list[Finding] = []
        for rule in self._rules:
            findings.extend(rule(event))
        return self._group(findings)

    def observe_disk(self, free_bytes: int, total_bytes: int,
                     now: dt.datetime | None = None) -> list[Alert]:
        """Free-space reading of the archive disk (the sink checks it periodically)."""
        warn = self.settings.disk_warn_free_mb
        if not self.settings.enabled or not warn or free_bytes >= warn * 1024 * 1024:
            return []
        when = now or self._clock()
        free_mb = free_bytes // (1024 * 1024)
        return self._group([Finding(
            rule="disk-full", subject="low-space", severity=Severity.WARNING,
            title="Archive disk nearly full",
            what=(f"Only {free_mb} MB are free on the archive disk "
                  f"({total_bytes / 1024 ** 3:.1f} GB in all; warning below {warn} MB). When "
                  "free space falls below the storage reserve, new images are refused and "
                  "modalities keep them in their queues or lose them. Free space or add "
                  "storage soon."),
            look="df -h on the data directory; 'pacsvault audit show --action "
                 "dicom.store.failed' lists refused images",
            time=when, facts={"free_mb": free_mb},
        )])

    def tick(self, now: dt.datetime | None = None) -> list[Alert]:
        """Close grouping windows that are over; returns the follow-ups due."""
        now = now or self._clock()
        out: list[Alert] = []
        for key in [k for k, g in self._groups.items() if g.ends <= now]:
            out.extend(self._close(key, now))
        self._prune(now)
        return out

    def flush(self) -> list[Alert]:
        """Follow-ups of every open group with repeats (at shutdown: lose no count)."""
        out: list[Alert] = []
        for key, group in list(self._groups.items()):
            if group.suppressed:
                out.append(self._summary(group))
            del self._groups[key]
        return out

    # --- grouping ---------------------------------------------------------------------

    def _group(self, findings: list[Finding]) -> list[Alert]:
        out: list[Alert] = []
        for finding in findings:
            if finding.rule in self._disabled:
                continue
            key = (finding.rule, finding.subject)
            group = self._groups.get(key)
            if group is not None and group.ends <= finding.time:
                out.extend(self._close(key, finding.time))
                group = self._groups.get(key)
            if group is None:
                self._groups[key] = _Group(
                    window=self._group_window, ends=finding.time + self._group_window,
                    notified=finding.time, opening=finding, latest=finding,
                )
                out.append(self._first(finding))
                continue
            group.suppressed += 1
            group.first_suppressed = group.first_suppressed or finding.time
            group.latest = finding
            if finding.source:
                group.sources.add(finding.source)
        return out

    def _close(self, key: tuple[str, str], now: dt.datetime) -> list[Alert]:
        group = self._groups[key]
        if not group.suppressed:
            del self._groups[key]
            return []
        alert = self._summary(group)
        # Still going: keep one group, with a longer window each time, so a day-long
        # scan gives a handful of messages.
        group.window = min(group.window * 2, MAX_GROUP_WINDOW)
        group.ends = now + group.window
        group.notified = now
        group.suppressed, group.first_suppressed = 0, None
        group.sources = set()
        return [alert]

    def _first(self, f: Finding) -> Alert:
        text = (
            f"{f.what}\n\nWhere to look:\n    {f.look}\n\n"
            f"Repeats within {self.settings.group_minutes} minutes are grouped into one "
            "follow-up message."
        )
        return Alert(rule=f.rule, severity=f.severity, title=f.title, text=text,
                     subject=f.subject, first_seen=f.time, last_seen=f.time, count=1,
                     summary=False, look=f.look, ae=f.ae, address=f.address, user=f.user,
                     facts=dict(f.facts))

    def _summary(self, group: _Group) -> Alert:
        f = group.latest
        first = group.first_suppressed or f.time
        sources = sorted(group.sources)
        where = ""
        if len(sources) > 1:
            shown = ", ".join(sources[:5]) + (", ..." if len(sources) > 5 else "")
            where = f", from {len(sources)} different sources ({shown})"
        text = (
            f"This went on after the notice of {_utc_text(group.notified)}: "
            f"{group.suppressed} more occurrence(s) between {_utc_text(first)} and "
            f"{_utc_text(f.time)}{where}.\n\nThe latest: {f.what}\n\n"
            f"Where to look:\n    {group.opening.look}\n\n"
            "If it continues, the next follow-up comes after a longer interval."
        )
        return Alert(rule=f.rule, severity=f.severity, title=f.title, text=text,
                     subject=f.subject, first_seen=first, last_seen=f.time,
                     count=group.suppressed, summary=True, look=group.opening.look, ae=f.ae,
                     address=f.address, user=f.user,
                     facts={**f.facts, "sources": len(sources)})

    def _prune(self, now: dt.datetime) -> None:
        """Forget windows with nothing left in them (bounded memory under a scan)."""
        for logins in (self._login_by_address, self._login_by_user):
            for key in list(logins):
                times = logins[key]
                while times and times[0] <= now - LOGIN_WINDOW:
                    times.popleft()
                if not times:
                    del logins[key]
        for windows in (self._studies, self._patients):
            for key in list(windows):
                windows[key].prune(now)
                if not windows[key].total:
                    del windows[key]

    # --- rules ------------------------------------------------------------------------

    def _failed_logins(self, e: AuditEvent) -> list[Finding]:
        if e.action != "auth.login.failed":
            return []
        limit = self.settings.failed_logins_per_10min
        user, addr = _clean(e.actor_user), _clean(e.actor_address)
        counts: dict[str, int] = {}
        for table, key in ((self._login_by_address, addr), (self._login_by_user, user)):
            if not key:
                continue
            times = table.setdefault(key, deque())
            times.append(e.time)
            while times and times[0] <= e.time - LOGIN_WINDOW:
                times.popleft()
            counts[key] = len(times)
        since = e.time - LOGIN_WINDOW
        look = _show(f"--action auth.login{f' --user {shlex.quote(user)}' if user else ''}",
                     since)
        # One finding per event: by address first (a guessing run comes from one place);
        # per user only catches guessing spread over several addresses.
        if addr and counts.get(addr, 0) >= limit:
            return [Finding(
                rule="failed-logins", subject=f"address:{addr}", severity=Severity.WARNING,
                title="Repeated failed sign-ins",
                what=(f"{counts[addr]} failed sign-ins within 10 minutes from {addr}"
                      + (f" (last for user '{user}')" if user else "") + ". Someone may be "
                      "guessing passwords. If this address is not a practice computer, "
                      "block it; if it is, check who was at it."),
                look=look, time=e.time, source=addr, address=addr, user=user,
                facts={"failures": counts[addr]},
            )]
        if user and counts.get(user, 0) >= limit:
            return [Finding(
                rule="failed-logins", subject=f"user:{user}", severity=Severity.WARNING,
                title="Repeated failed sign-ins",
                what=(f"{counts[user]} failed sign-ins within 10 minutes for user '{user}'"
                      + (f", the last from {addr}" if addr else "") + ". Someone may be "
                      "guessing this account's password from several places."),
                look=look, time=e.time, source=addr, address=addr, user=user,
                facts={"failures": counts[user]},
            )]
        return []

    def _account_locked(self, e: AuditEvent) -> list[Finding]:
        if e.action != "auth.account.locked":
            return []
        user, addr = _clean(e.actor_user), _clean(e.actor_address)
        return [Finding(
            rule="account-locked", subject=f"user:{user}", severity=Severity.WARNING,
            title="Account locked",
            what=(f"The account '{user or '?'}' was locked after repeated failed sign-ins"
                  + (f" (last attempt from {addr})" if addr else "") + ". If the user did "
                  "not simply mistype their password, someone is trying to get in."),
            look=_show(f"--user {shlex.quote(user)}" if user else "--action auth",
                       e.time - LOGIN_WINDOW),
            time=e.time, source=addr, address=addr, user=user,
        )]

    def _exposure(self, e: AuditEvent) -> list[Finding]:
        if e.action != "exposure":
            return []
        addr = _clean(e.actor_address)
        port = "TLS" if e.detail.get("port") == "tls" else "plain"
        return [Finding(
            rule="exposure", subject="", severity=Severity.CRITICAL,
            title="Server reachable from the internet",
            what=(f"A connection to the {port} DICOM port came from "
                  f"{addr or 'an unknown address'}, outside the practice's trusted networks. "
                  "The connection was refused, but it means this server can be reached "
                  "from outside: most often a port forwarding or DMZ rule on the internet "
                  "box. Have it removed today."),
            look=_show("--action exposure", e.time - dt.timedelta(minutes=1)),
            time=e.time, source=addr, address=addr, facts={"port": port.lower()},
        )]

    def _unknown_node(self, e: AuditEvent) -> list[Finding]:
        ae, addr = _clean(e.actor_ae), _clean(e.actor_address)
        since = e.time - dt.timedelta(minutes=1)
        if e.action == "dicom.association.rejected":
            reason = _clean(e.message, 160) or "see the audit trail"
            called = _clean(str(e.detail.get("called_ae", "")))
            if e.detail.get("registered"):  # a known device, wrong transport (issue 12)
                return [Finding(
                    rule="unknown-node", subject=f"node:{ae}@{addr}",
                    severity=Severity.WARNING, title="Registered DICOM node refused",
                    what=(f"The registered DICOM node '{ae}' connected from "
                          f"{addr or 'an unknown address'} and was refused: {reason}. "
                          "If the device is the practice's, compare its settings with its "
                          "registration ('pacsvault node list'); otherwise find out which "
                          "machine uses this address."),
                    look=_show(f"--node {shlex.quote(ae)}" if ae else
                               "--action dicom.association", since),
                    time=e.time, source=addr, ae=ae, address=addr,
                )]
            return [Finding(
                rule="unknown-node", subject=f"node:{ae}@{addr}", severity=Severity.WARNING,
                title="Unknown DICOM node tried to connect",
                what=(f"A DICOM connection from {addr or 'an unknown address'}, calling "
                      f"itself '{ae}'" + (f" and asking for '{called}'" if called else "")
                      + f", was refused: {reason}. If this is a new device of the practice, "
                      "register it with 'pacsvault node add'; otherwise find out which "
                      "machine uses this address."),
                look=_show(f"--node {shlex.quote(ae)}" if ae else
                           "--action dicom.association", since),
                time=e.time, source=addr, ae=ae, address=addr,
            )]
        if e.action == "dicom.move.unknown_destination":
            dest = _clean(str(e.detail.get("destination", "")))
            return [Finding(
                rule="unknown-node", subject=f"destination:{ae}", severity=Severity.WARNING,
                title="Images requested for an unregistered destination",
                what=(f"Node '{ae}'" + (f" ({addr})" if addr else "") + " asked the archive "
                      f"to send images to '{dest}', which is not a registered node allowed "
                      "to receive them. Nothing was sent. Check the node's configuration, "
                      "or who is using it."),
                look=_show(f"--node {shlex.quote(ae)}" if ae else "--action dicom.move",
                           since),
                time=e.time, source=addr, ae=ae, address=addr,
            )]
        return []

    @staticmethod
    def _is_read(e: AuditEvent) -> bool:
        return (e.code in READ_CODES and not e.action.startswith(INBOUND_PREFIXES)
                and bool(e.study_uids or e.patient_ids or e.sop_uids))

    def _bulk_access(self, e: AuditEvent) -> list[Finding]:
        if not self._is_read(e):
            return []
        who = _who(e)
        studies = self._studies.setdefault(who.key, _Sliding(BULK_WINDOW))
        studies.add(e.time, e.study_uids)
        patient_keys = set(e.patient_ids)
        if self._patients_of is not None and e.study_uids:
            try:
                patient_keys.update(self._patients_of(e.study_uids))
            except Exception as exc:  # counting patients is a bonus, never a failure
                log.warning("patient lookup for alerts failed: %s", type(exc).__name__)
        patients = self._patients.setdefault(who.key, _Sliding(BULK_WINDOW))
        patients.add(e.time, patient_keys)
        over_studies = studies.distinct > self.settings.bulk_studies_per_hour
        over_patients = patients.distinct > self.settings.bulk_patients_per_hour
        if not (over_studies or over_patients):
            return []
        counted = []
        if studies.distinct:
            counted.append(f"{studies.distinct} different studies")
        if patients.distinct:
            counted.append(f"{patients.distinct} different patients")
        return [Finding(
            rule="bulk-access", subject=who.key, severity=Severity.CRITICAL,
            title="Unusually large access to patient images",
            what=(f"{who.label[0].upper()}{who.label[1:]} has read {' of '.join(counted)} "
                  "within one hour (alert above "
                  f"{self.settings.bulk_studies_per_hour} studies or "
                  f"{self.settings.bulk_patients_per_hour} patients). This is more than "
                  "normal reading and may be a bulk copy of patient data. Check with the "
                  "person responsible that it was intended."),
            look=_show(who.filter, e.time - BULK_WINDOW), time=e.time,
            source=_clean(e.actor_address), ae=_clean(e.actor_ae),
            address=_clean(e.actor_address), user=_clean(e.actor_user),
            facts={"studies": studies.distinct, "patients": patients.distinct},
        )]

    def _local(self, t: dt.datetime) -> dt.datetime:
        return t.astimezone(self._zone) if self._zone else t.astimezone()

    def _in_business_hours(self, t: dt.datetime) -> bool:
        local = self._local(t)
        start, end = self._hours
        now = local.time()
        within = start <= now < end if start <= end else (now >= start or now < end)
        return within and local.weekday() in self._days

    def _unusual_hours(self, e: AuditEvent) -> list[Finding]:
        sign_in = e.action == "auth.login" and e.outcome is Outcome.SUCCESS
        if not (sign_in or self._is_read(e)) or self._in_business_hours(e.time):
            return []
        who = _who(e)
        if sign_in:
            did = "signed in"
        elif e.code is EventCode.EXPORT:
            did = "exported images"
        elif e.code is EventCode.INSTANCES_ACCESSED:
            did = "viewed images"
        else:
            did = "retrieved images"
        local = self._local(e.time)
        return [Finding(
            rule="unusual-hours", subject=who.key, severity=Severity.WARNING,
            title="Access outside business hours",
            what=(f"{who.label[0].upper()}{who.label[1:]} {did} on "
                  f"{local.strftime('%A %d %B %Y at %H:%M')} (server local time), outside "
                  f"business hours ({self.settings.business_hours}, "
                  f"{', '.join(self.settings.business_days)}). If nobody was working then, "
                  "find out who used this account or device."),
            look=_show(who.filter, e.time - dt.timedelta(minutes=5)), time=e.time,
            source=_clean(e.actor_address), ae=_clean(e.actor_ae),
            address=_clean(e.actor_address), user=_clean(e.actor_user),
        )]

    def _audit_broken(self, e: AuditEvent) -> list[Finding]:
        if e.action not in ("audit.verify", "audit.tamper") or e.outcome is Outcome.SUCCESS:
            return []
        problem = _clean(e.message, 300) or "no detail"
        return [Finding(
            rule="audit-broken", subject="", severity=Severity.CRITICAL,
            title="Audit trail integrity check failed",
            what=(f"The audit trail does not verify: {problem}. Records may have been "
                  "edited, deleted or forged, or the file was damaged. Do not change the "
                  "data directory; keep a copy of it as evidence and call your IT provider."),
            look="pacsvault audit verify", time=e.time,
        )]

    def _audit_unwritable(self, e: AuditEvent) -> list[Finding]:
        if e.action != "audit.unavailable":
            return []
        return [Finding(
            rule="audit-unwritable", subject="", severity=Severity.CRITICAL,
            title="Audit trail cannot be written: access is being refused",
            what=("A record of the audit trail could not be written (disk full or I/O "
                  "error). Queries, retrievals, images received and viewer requests are "
                  "refused until it can, so that no access goes unrecorded. Free space on "
                  "the data directory now."),
            look="df -h on the data directory; then 'pacsvault audit verify'", time=e.time,
        )]

    def _connection_abuse(self, e: AuditEvent) -> list[Finding]:
        """``*.connection.refused`` summaries (audit/refusals.py): refusals that repeat."""
        if not e.action.endswith(".connection.refused") or not e.detail.get("summary"):
            return []
        addr, reason = _clean(e.actor_address), _clean(str(e.detail.get("reason", "")))
        service = "DICOM" if e.action.startswith("dicom") else "HTTPS"
        return [Finding(
            rule="connection-abuse", subject=f"address:{addr}", severity=Severity.WARNING,
            title="A device keeps being refused by the connection limits",
            what=(f"{addr or 'A source'} was refused {e.detail.get('count', '?')} more "
                  f"time(s) on the {service} port ({reason}): too many connections at once, "
                  "connections that send too slowly, or oversized or malformed messages. "
                  "Service goes on for everyone else, but this is what a denial-of-service "
                  "attempt or an infected computer looks like. Find which machine uses "
                  "this address."),
            look=_show(f"--action {e.action}", e.time - dt.timedelta(minutes=5)),
            time=e.time, source=addr, address=addr,
        )]

    def _backup_failed(self, e: AuditEvent) -> list[Finding]:
        """A backup run, verification, pruning or restore drill that did not succeed."""
        if e.action not in BACKUP_ACTIONS or e.outcome is Outcome.SUCCESS:
            return []
        target = _clean(str(e.detail.get("target", ""))) or "?"
        what, consequence = BACKUP_ACTIONS[e.action]
        reason = _clean(str(e.detail.get("error") or e.message), 300) or "see the audit trail"
        return [Finding(
            rule="backup-failed", subject=f"{e.action}:{target}", severity=Severity.CRITICAL,
            title=f"Backup problem: {what} failed",
            what=f"The {what} of backup target '{target}' failed: {reason}. {consequence}",
            look=(f"pacsvault status; pacsvault audit show --action {e.action} "
                  f"--since {_minute(e.time - dt.timedelta(minutes=5))}"),
            time=e.time, facts={"target": target, "action": e.action},
        )]

    def _sealed(self, e: AuditEvent) -> list[Finding]:
        """The practice must know at once that nobody can view images (sealed/)."""
        if e.action == "application.start" and e.detail.get("sealed"):
            return [Finding(
                rule="archive-sealed", subject="sealed", severity=Severity.CRITICAL,
                title="Archive sealed: an administrator must unlock it",
                what=("The server started without its master key (key medium removed, or "
                      "its passphrase not given). Devices can still send images, which are "
                      "kept encrypted, but nobody can view or query anything until an "
                      "administrator unlocks it: put the key medium back or have the "
                      "passphrase ready, then open https://<this server>/unseal or run "
                      "'pacsvault unseal'."),
                look="pacsvault unseal", time=e.time)]
        if e.action in ("sealed.snapshot", "sealed.journal.damaged") \
                and e.outcome is not Outcome.SUCCESS:
            return [Finding(
                rule="archive-sealed", subject=e.action, severity=Severity.CRITICAL,
                title="Sealed mode: a file does not verify",
                what=_clean(e.message, 400) or "a sealed-mode file does not verify",
                look=f"pacsvault audit show --action {e.action}", time=e.time)]
        return []

    def _backup_stale(self, e: AuditEvent) -> list[Finding]:
        if e.action != "backup.stale":
            return []
        target = _clean(str(e.detail.get("target", ""))) or "?"
        age = e.detail.get("age_hours", "?")
        limit = e.detail.get("max_age_hours", "?")
        return [Finding(
            rule="backup-stale", subject=f"target:{target}", severity=Severity.CRITICAL,
            title="Backup too old",
            what=(f"The last good backup of target '{target}' is {age} hours old (limit "
                  f"{limit} h). Images received since then exist only on this server's "
                  "disk. Check that the backup disk is plugged in or the off-site "
                  "repository reachable, then run 'pacsvault backup run'."),
            look="pacsvault status; pacsvault audit show --action backup",
            time=e.time, facts={"target": target, "age_hours": str(age)},
        )]

    def _disk_full(self, e: AuditEvent) -> list[Finding]:
        if e.action != "dicom.store.failed" or "A700" not in e.message.upper():
            return []
        who = _who(e)
        return [Finding(
            rule="disk-full", subject="refusing", severity=Severity.CRITICAL,
            title="Archive disk full: images are being refused",
            what=(f"The archive refused an image from {who.label} because free disk space "
                  "is below the configured reserve (DICOM status A700). Modalities keep "
                  "refused images in their queues, or lose them. Free space or add storage "
                  "now."),
            look=_show("--action dicom.store.failed", e.time - dt.timedelta(minutes=5)),
            time=e.time, source=_clean(e.actor_ae), ae=_clean(e.actor_ae),
            address=_clean(e.actor_address),
        )]


# --- delivery ----------------------------------------------------------------------------


def _read_secret(path_text: str, what: str) -> str:
    """Read a secret file, refusing one that others can read (it would leak the secret)."""
    path = Path(path_text).expanduser()
    try:
        info = path.stat()
    except OSError:
        raise AlertConfigError(f"{what} {path} cannot be read") from None
    if not stat.S_ISREG(info.st_mode):
        raise AlertConfigError(f"{what} {path} is not a regular file")
    if info.st_mode & 0o077:
        raise AlertConfigError(f"{what} {path} is readable by other users: run "
                               f"'chmod 600 {path}'")
    try:
        value = path.read_text("utf-8").strip()
    except (OSError, UnicodeDecodeError):
        raise AlertConfigError(f"{what} {path} cannot be read") from None
    if not value:
        raise AlertConfigError(f"{what} {path} is empty")
    return value


def _wrap(text: str) -> str:
    """Mail-friendly lines; indented lines (commands) are kept whole so they can be copied."""
    lines: list[str] = []
    for line in text.splitlines():
        if line.startswith(" ") or len(line) <= 76:
            lines.append(line)
        else:
            lines.extend(textwrap.wrap(line, 76, break_long_words=False,
                                       break_on_hyphens=False))
    return "\n".join(lines)


def _tls_context(ca_file: str) -> ssl.SSLContext:
    """Verified TLS 1.2+: system CAs, or only the given CA when one is configured."""
    ctx = ssl.create_default_context(cafile=str(Path(ca_file).expanduser()) if ca_file
                                     else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect could downgrade the webhook to http or send it elsewhere: refuse it."""

    def redirect_request(self, req: urllib.request.Request, fp: Any, code: int, msg: str,
                         headers: Any, newurl: str) -> urllib.request.Request | None:
        return None


class DeliveryError(Exception):
    """A channel refused the alert (message names the cause, never the alert's content)."""


_STOP = object()


class AlertSink:
    """Recorder sink: detection and delivery off the caller's thread.

    ``write`` never blocks (a bounded queue; on overflow the event is dropped for detection
    only, it is still in the trail through the other sinks). One worker thread runs the
    ``Detector``, checks the disk every ``disk_check_seconds`` when ``disk_path`` is given,
    delivers each alert to every configured channel (with ``retry_delays`` between
    attempts), and records it through ``recorder`` as ``alert.sent`` (at least one channel
    took it), ``alert.failed`` (none did) or ``alert.recorded`` (no channel is configured:
    the trail is its only destination, which is not a failure). Its own ``alert.*`` events
    are ignored.
    """

    def __init__(
        self,
        settings: AlertSettings,
        recorder: Recorder,
        *,
        disk_path: Path | None = None,
        patients_of: PatientResolver | None = None,
        clock: Callable[[], dt.datetime] = _utc_now,
        retry_delays: Sequence[float] = (5.0, 30.0),
        tick_seconds: float = 5.0,
        disk_check_seconds: float = 300.0,
        queue_size: int = 10_000,
        start: bool = True,
    ) -> None:
        """``start=False`` builds and checks the sink without a worker (settings checks,
        ``send_test``, tests); such a sink ignores ``write``."""
        self.settings = settings
        self.detector = Detector(settings, clock=clock, patients_of=patients_of)
        self._recorder = recorder
        self._disk_path = disk_path
        self._retry_delays = tuple(retry_delays)
        self._tick_seconds = tick_seconds
        self._disk_check_seconds = disk_check_seconds
        self._server = _clean(settings.server_name or socket.gethostname() or "pacsvault")
        self._queue: queue.Queue[object] = queue.Queue(maxsize=queue_size)
        self._closing = False
        self._dropped = 0
        # Fail at start, not at the first alert: a wrong path or mode is a setup mistake.
        if settings.smtp_password_file:
            _read_secret(settings.smtp_password_file, "SMTP password file")
        if settings.webhook_token_file:
            _read_secret(settings.webhook_token_file, "webhook token file")
        for ca in (settings.smtp_ca_file, settings.webhook_ca_file):
            if ca and not Path(ca).expanduser().is_file():
                raise AlertConfigError(f"CA file {ca} not found")
        self._thread = threading.Thread(target=self._run, name="pacsvault-alerts",
                                        daemon=True)
        if start and settings.enabled:
            self._thread.start()

    # --- Sink -------------------------------------------------------------------------

    def write(self, event: AuditEvent) -> None:
        if (not self.settings.enabled or self._closing or not self._thread.is_alive()
                or event.action.startswith("alert.")):
            return
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            self._dropped += 1
            if self._dropped == 1 or self._dropped % 1000 == 0:
                log.error("alert queue full: %d event(s) not checked by the alert rules",
                          self._dropped)

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every event written so far is checked and its alerts delivered."""
        if not self._thread.is_alive():
            return True
        done = threading.Event()
        try:
            self._queue.put(done, timeout=timeout)
        except queue.Full:
            return False
        return done.wait(timeout)

    def close(self, timeout: float = 30.0) -> None:
        """Send pending follow-ups, record them, stop the worker.

        Call before the trail is closed, so the last ``alert.*`` events can be recorded.
        Retries are skipped from here on: shutdown must not hang on a dead mail server.
        """
        if not self._thread.is_alive():
            return
        self._closing = True
        try:
            self._queue.put(_STOP, timeout=timeout)
        except queue.Full:
            log.error("alert worker did not drain its queue; pending alerts are lost")
            return
        self._thread.join(timeout)

    def send_test(self) -> Alert:
        """Deliver a harmless test alert now (for a ``pacsvault alert test`` command)."""
        now = _utc_now()
        alert = Alert(
            rule="test", severity=Severity.WARNING, title="Test alert",
            text=("This is a test of the alerts of the pacsvault archive. Nothing happened. "
                  "If you can read this, alerts reach you.\n\nWhere to look:\n    "
                  "pacsvault audit show --action alert"),
            subject="", first_seen=now, last_seen=now, count=1, summary=False,
            look="pacsvault audit show --action alert",
        )
        self._deliver(alert)
        return alert

    # --- worker -----------------------------------------------------------------------

    def _run(self) -> None:
        next_disk = time.monotonic()
        while True:
            try:
                item = self._queue.get(timeout=self._tick_seconds)
            except queue.Empty:
                item = None
            alerts: list[Alert] = []
            try:
                if isinstance(item, AuditEvent):
                    alerts += self.detector.observe(item)
                alerts += self.detector.tick()
                if self._disk_path is not None and time.monotonic() >= next_disk:
                    next_disk = time.monotonic() + self._disk_check_seconds
                    usage = shutil.disk_usage(self._disk_path)
                    alerts += self.detector.observe_disk(usage.free, usage.total)
                if item is _STOP:
                    alerts += self.detector.flush()
            except Exception as exc:  # a rule bug must not stop detection for good
                log.error("alert detection failed: %s", type(exc).__name__)
            for alert in alerts:
                try:
                    self._deliver(alert)
                except Exception as exc:
                    log.error("alert delivery failed: %s", type(exc).__name__)
            if isinstance(item, threading.Event):
                item.set()
            if item is _STOP:
                return

    def _deliver(self, alert: Alert) -> None:
        results: dict[str, str] = {}
        errors: list[str] = []
        channels: list[tuple[str, Callable[[Alert], None]]] = []
        if self.settings.mail_enabled:
            channels.append(("mail", self._send_mail))
        if self.settings.webhook_url:
            channels.append(("webhook", self._post_webhook))
        for name, send in channels:
            error = self._attempt(send, alert)
            results[name] = "failed" if error else "sent"
            if error:
                errors.append(f"{name}: {error}")
                log.error("alert %s could not be sent by %s: %s", alert.rule, name, error)
        delivered = any(v == "sent" for v in results.values())
        detail: dict[str, str | int | bool] = {
            "rule": alert.rule, "severity": alert.severity.value, "count": alert.count,
            "follow_up": alert.summary, "mail": results.get("mail", "off"),
            "webhook": results.get("webhook", "off"),
        }
        if not channels:
            # Nothing to fail: the trail (and the Health page) is the only destination the
            # administrator chose. Not a failure at every alert (issue 12, defect 8).
            action, outcome = "alert.recorded", Outcome.SUCCESS
            detail["delivered"] = "trail"
            errors.append("recorded in the audit trail only: no e-mail or webhook is "
                          "configured")
        elif delivered:
            action = "alert.sent"
            outcome = Outcome.MINOR_FAILURE if errors else Outcome.SUCCESS
        else:
            action, outcome = "alert.failed", Outcome.SERIOUS_FAILURE
        message = alert.title + (f" -- {'; '.join(errors)}" if errors else "")
        self._recorder.emit(AuditEvent(
            action=action, outcome=outcome,
            code=EventCode.SECURITY_ALERT, message=message, actor_ae=alert.ae,
            actor_address=alert.address, actor_user=alert.user, detail=detail,
        ))

    def _attempt(self, send: Callable[[Alert], None], alert: Alert) -> str:
        """Try, then retry after each delay; returns the last error ('' when sent)."""
        error = ""
        for delay in (0.0, *self._retry_delays):
            if delay:
                if self._closing:
                    break
                time.sleep(delay)
            try:
                send(alert)
                return ""
            except (OSError, smtplib.SMTPException, DeliveryError, AlertConfigError,
                    ValueError) as exc:
                error = _clean(f"{type(exc).__name__}: {exc}", 200)
        return error

    # --- channels ---------------------------------------------------------------------

    def build_message(self, alert: Alert) -> EmailMessage:
        """The e-mail: plain text, no attachment, nothing but the alert's own text."""
        s = self.settings
        # Long enough that the subject is never folded (some clients show a fold badly).
        msg = EmailMessage(policy=email.policy.default.clone(max_line_length=200))
        tag = f" (+{alert.count} repeats, grouped)" if alert.summary else ""
        msg["Subject"] = (f"[pacsvault {self._server}] {alert.severity.value.upper()}: "
                          f"{alert.title}{tag}")
        msg["From"] = s.mail_from or f"pacsvault@{_clean(socket.gethostname(), 200)}"
        msg["To"] = ", ".join(s.mail_to)
        msg["Date"] = email.utils.formatdate(localtime=True)
        msg["Message-ID"] = email.utils.make_msgid(domain="pacsvault.invalid")
        msg["Auto-Submitted"] = "auto-generated"
        msg["X-Pacsvault-Rule"] = alert.rule
        body = (
            f"pacsvault alert from the archive server '{self._server}'\n"
            f"Severity: {alert.severity.value}\n\n"
            f"{alert.title}\n{'=' * len(alert.title)}\n\n"
            f"{_wrap(alert.text)}\n\n"
            f"First seen: {_utc_text(alert.first_seen)}\n"
            f"Last seen:  {_utc_text(alert.last_seen)}\n"
            f"Rule: {alert.rule} ({RULES.get(alert.rule, 'test')})\n\n"
            "-- \nThis message never contains patient data. The details are in the "
            "server's audit trail.\n"
        )
        ascii_only = body.isascii()
        msg.set_content(body, cte="7bit" if ascii_only else "quoted-printable")
        return msg

    def _send_mail(self, alert: Alert) -> None:
        s = self.settings
        msg = self.build_message(alert)
        ctx = _tls_context(s.smtp_ca_file)
        smtp: smtplib.SMTP
        if s.smtp_security == "tls":
            smtp = smtplib.SMTP_SSL(s.smtp_host, s.smtp_port, timeout=s.smtp_timeout,
                                    context=ctx)
        else:
            smtp = smtplib.SMTP(s.smtp_host, s.smtp_port, timeout=s.smtp_timeout)
        with smtp:
            smtp.ehlo()
            if s.smtp_security == "starttls":
                if not smtp.has_extn("starttls"):
                    raise DeliveryError("the mail server does not offer STARTTLS")
                smtp.starttls(context=ctx)
                smtp.ehlo()
            if s.smtp_username:
                smtp.login(s.smtp_username,
                           _read_secret(s.smtp_password_file, "SMTP password file"))
            smtp.send_message(msg)

    def webhook_payload(self, alert: Alert) -> dict[str, Any]:
        """The JSON body: the same facts as the mail, no patient data."""
        return {
            "source": "pacsvault", "server": self._server, "rule": alert.rule,
            "severity": alert.severity.value, "title": alert.title, "text": alert.text,
            "count": alert.count, "follow_up": alert.summary,
            "first_seen": alert.first_seen.astimezone(dt.UTC).isoformat(),
            "last_seen": alert.last_seen.astimezone(dt.UTC).isoformat(),
            "where_to_look": alert.look, "node": alert.ae, "address": alert.address,
            "user": alert.user, "facts": dict(alert.facts),
        }

    def _post_webhook(self, alert: Alert) -> None:
        s = self.settings
        parts = urllib.parse.urlsplit(s.webhook_url)
        loopback = is_loopback_host(parts.hostname or "")
        if parts.scheme != "https" and not (
            parts.scheme == "http" and s.webhook_allow_http_loopback and loopback
        ):
            raise DeliveryError("webhook_url must be https")
        headers = {"Content-Type": "application/json", "User-Agent": "pacsvault-alerts"}
        if s.webhook_token_file:
            headers["Authorization"] = (
                "Bearer " + _read_secret(s.webhook_token_file, "webhook token file"))
        request = urllib.request.Request(  # noqa: S310 (scheme checked above)
            s.webhook_url, data=json.dumps(self.webhook_payload(alert)).encode(),
            headers=headers, method="POST",
        )
        handlers: list[urllib.request.BaseHandler] = [
            _NoRedirect(), urllib.request.HTTPSHandler(context=_tls_context(s.webhook_ca_file)),
        ]
        if loopback:  # never hand a loopback URL to an environment proxy
            handlers.append(urllib.request.ProxyHandler({}))
        opener = urllib.request.build_opener(*handlers)
        try:
            with opener.open(request, timeout=s.webhook_timeout) as response:
                status = int(response.status)
        except urllib.error.HTTPError as exc:
            raise DeliveryError(f"the webhook answered HTTP {exc.code}") from None
        if not 200 <= status < 300:
            raise DeliveryError(f"the webhook answered HTTP {status}")


__all__ = [
    "RULES", "Alert", "AlertConfigError", "AlertSettings", "AlertSink", "DeliveryError",
    "Detector", "Finding", "Severity", "render_section",
]
