"""The alert rules as pure logic: ``Detector`` turns ``AuditEvent``s into ``Alert``s.

No I/O and no threads (the package docstring lists the rules and the grouping), so tests
replay a whole day of events in milliseconds; ``delivery`` runs it on its worker thread.
"""

from __future__ import annotations

import datetime as dt
import logging
import shlex
import zoneinfo
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from pacsvault.audit.alerts import service_rules
from pacsvault.audit.alerts.check_rule import ACTION as CHECK_ACTION
from pacsvault.audit.alerts.check_rule import security_check
from pacsvault.audit.alerts.dispatch import DISPATCH_KEPT, Rule, Watch
from pacsvault.audit.alerts.exposure_rule import ACTIONS as EXPOSURE_ACTIONS
from pacsvault.audit.alerts.exposure_rule import exposure_switch
from pacsvault.audit.alerts.findings import Alert, Finding, Severity
from pacsvault.audit.alerts.findings import clean_text as _clean
from pacsvault.audit.alerts.findings import show_command as _show
from pacsvault.audit.alerts.findings import utc_now as _utc_now
from pacsvault.audit.alerts.findings import utc_text as _utc_text
from pacsvault.audit.alerts.findings import who_of as _who
from pacsvault.audit.alerts.service_rules import BACKUP_ACTIONS
from pacsvault.audit.events import AuditEvent, EventCode, Outcome
from pacsvault.config.alerts import DAYS, AlertSettings

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


PatientResolver = Callable[[Sequence[str]], Iterable[str]]
RESOLVED_KEPT = 1024  # sets of studies whose patients the detector remembers


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
        # ``patients_of``'s last answers (a study's patient does not change): a viewer's
        # frame requests name the same study each time, and each look-up was a query on
        # the index in the serving process (issue 17: a quarter of a frame's CPU).
        self._resolved: OrderedDict[frozenset[str], frozenset[str]] = OrderedDict()
        # Every rule with what it watches: exact actions, event codes (reads, whatever
        # their action), action suffixes. ``observe`` applies to an event only the rules
        # watching its action or code (issue 17: the 18 rules ran on every stored
        # image's event, none of them watching it, on the alert thread woken for it).
        # ``tests/test_alert_dispatch.py`` checks each rule finds nothing outside these.
        self._watching: tuple[Watch, ...] = (
            Watch(self._failed_logins, actions=("auth.login.failed",)),
            Watch(self._account_locked, actions=("auth.account.locked",)),
            Watch(self._exposure, actions=("exposure",)),
            Watch(self._unknown_node, actions=("dicom.association.rejected",
                                               "dicom.move.unknown_destination")),
            Watch(self._bulk_access, codes=READ_CODES),
            Watch(self._unusual_hours, actions=("auth.login",), codes=READ_CODES),
            Watch(self._audit_broken, actions=("audit.verify", "audit.tamper")),
            Watch(service_rules.disk_full, actions=("dicom.store.failed",)),
            Watch(self._connection_abuse, suffixes=(".connection.refused",)),
            Watch(self._audit_unwritable, actions=("audit.unavailable",)),
            Watch(service_rules.backup_failed, actions=tuple(BACKUP_ACTIONS)),
            Watch(service_rules.backup_stale, actions=("backup.stale",)),
            Watch(service_rules.sealed, actions=("application.start", "sealed.snapshot",
                                         "sealed.journal.damaged")),
            Watch(service_rules.object_storage, actions=("storage.scrub", "storage.orphans",
                                                 "dicom.store.failed")),
            Watch(exposure_switch, actions=EXPOSURE_ACTIONS),
            Watch(security_check, actions=(CHECK_ACTION,)),
            Watch(service_rules.breach_clock, actions=("breach.clock",)),
            Watch(service_rules.forwarding, actions=("forward.failing",)),
        )
        self._rules: tuple[Rule, ...] = tuple(w.rule for w in self._watching)
        # (action, code) -> the rules watching it, in the order above; the vocabulary of
        # actions is the program's own, bounded anyway (``DISPATCH_KEPT``).
        self._dispatch: dict[tuple[str, EventCode], tuple[Rule, ...]] = {}

    # --- public -----------------------------------------------------------------------

    def observe(self, event: AuditEvent) -> list[Alert]:
        """Apply every rule to one event; returns the notifications due now."""
        if not self.settings.enabled or event.action.startswith("alert."):
            return []
        rules = self.rules_for(event.action, event.code)
        if not rules:
            return []
        findings: list[Finding] = []
        for rule in rules:
            findings.extend(rule(event))
        return self._group(findings)

    def watches(self, event: AuditEvent) -> bool:
        """Whether any rule could find something in ``event`` (the sink hands the alert
        thread only these: an event no rule watches would change nothing there)."""
        return (self.settings.enabled and not event.action.startswith("alert.")
                and bool(self.rules_for(event.action, event.code)))

    def rules_for(self, action: str, code: EventCode) -> tuple[Rule, ...]:
        """The rules watching ``action`` or ``code``, in their declared order (cached)."""
        key = (action, code)
        found = self._dispatch.get(key)
        if found is None:
            found = tuple(w.rule for w in self._watching if w.matches(action, code))
            if len(self._dispatch) >= DISPATCH_KEPT:
                self._dispatch.clear()
            self._dispatch[key] = found
        return found

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
        if e.action not in ("dicom.association.rejected", "dicom.move.unknown_destination"):
            return []
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

    def _patients_for(self, study_uids: Sequence[str]) -> frozenset[str]:
        """``patients_of``, remembered for the last ``RESOLVED_KEPT`` sets of studies."""
        assert self._patients_of is not None
        key = frozenset(study_uids)
        found = self._resolved.get(key)
        if found is not None:
            self._resolved.move_to_end(key)
            return found
        found = frozenset(self._patients_of(study_uids))
        self._resolved[key] = found
        if len(self._resolved) > RESOLVED_KEPT:
            self._resolved.popitem(last=False)
        return found

    def _bulk_access(self, e: AuditEvent) -> list[Finding]:
        if not self._is_read(e):
            return []
        who = _who(e)
        studies = self._studies.setdefault(who.key, _Sliding(BULK_WINDOW))
        studies.add(e.time, e.study_uids)
        patient_keys = set(e.patient_ids)
        if self._patients_of is not None and e.study_uids:
            try:
                patient_keys.update(self._patients_for(e.study_uids))
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



__all__ = ["BACKUP_ACTIONS", "INBOUND_PREFIXES", "READ_CODES", "Detector", "PatientResolver",
           "Rule", "Watch"]
