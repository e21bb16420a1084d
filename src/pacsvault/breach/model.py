"""One breach record: every item GDPR art. 33(3) and 33(5) and the regulator's online
notification form ask for, and the 72-hour clock computed from it.

Why one flat record with closed vocabularies: the notification draft, the register export,
the letter to patients and the web form must all speak of the same items in the same
order (the order of the regulator's form), and a closed vocabulary (``NATURES``,
``ORIGINS``...) is what lets the documents say each item in French and English. Free text
(circumstances, measures...) may mention patients' data, which is why the whole record is
only ever stored encrypted (``breach.store``).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

DEADLINE = dt.timedelta(hours=72)  # art. 33(1): "not later than 72 hours after"
CLOCK_ALERTS = (48, 66)  # hours after awareness, while no decision is recorded

NATURES = ("confidentiality", "integrity", "availability")
ORIGINS = ("internal-malicious", "internal-accidental", "external-malicious",
           "external-accidental", "unknown")
CIRCUMSTANCES = ("lost-stolen-device", "unauthorised-access", "hacking", "malware",
                 "misdirected-sending", "accidental-publication", "exposed-service",
                 "other")
DATA_CATEGORIES = ("identity", "health", "images", "contact", "social-security",
                   "credentials", "other")
PEOPLE_CATEGORIES = ("patients", "minors", "staff", "other")
SEVERITIES = ("negligible", "limited", "significant", "maximum")
DECISIONS = ("", "notify", "not-notify")
# Why not notify (art. 33(1)): no likely risk, or the authority already knows (Conseil
# d'État, 10e-9e ch., n° 449694: a doctor the regulator itself had told of the exposure
# was not bound to notify it), or another reason in ``decision_reasons``.
NO_NOTIFY_GROUNDS = ("", "unlikely-risk", "authority-aware", "other")
NOTIFICATION_KINDS = ("initial", "complementary")
# Art. 34: inform the people, or the exemption of art. 34(3) that applies.
ART34 = ("", "inform", "exempt-unintelligible", "exempt-subsequent-measures",
         "exempt-disproportionate", "not-required")
DETECTIONS = ("alert", "self-check", "user-report", "patient-complaint", "authority",
              "third-party", "other")
ACTOR_KINDS = ("token", "user", "node", "address")

_ID = re.compile(r"^BR-\d{8}-[0-9a-f]{6}$")


class BreachError(Exception):
    """A record that cannot be saved as asked (message is user-facing, no patient data;
    ``fr``: the French text for the pages, when the message can reach them)."""

    def __init__(self, message: str, fr: str = "") -> None:
        super().__init__(message)
        self.fr = fr

    def say(self, lang: str) -> str:
        return self.fr if lang == "fr" and self.fr else str(self)


def utc(value: dt.datetime) -> dt.datetime:
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


def parse_time(text: str) -> dt.datetime:
    """ISO date or date-time (UTC when no offset): what the CLI and the web form accept."""
    try:
        return utc(dt.datetime.fromisoformat(text.strip()))
    except ValueError:
        raise BreachError(f"not an ISO date or time: {text[:40]!r}",
                          f"date ou heure ISO invalide : {text[:40]!r}") from None


def new_id(now: dt.datetime) -> str:
    return f"BR-{now:%Y%m%d}-{secrets.token_hex(3)}"


def check_id(text: str) -> str:
    if not _ID.match(text):
        raise BreachError(f"not a breach id: {text[:40]!r} (BR-YYYYMMDD-xxxxxx)")
    return text


@dataclass
class PatientScope:
    """What one patient's data underwent, counted from the trail (kept encrypted)."""

    patient_id: str
    studies: int = 0
    instances: int = 0
    accesses: int = 0  # trail records naming them
    readable: bool = False  # something left the archive readable
    ciphertext_only: bool = False


@dataclass
class Scope:
    """The trail's answer for one actor and window (``breach.scope``)."""

    actor_kind: str
    actor: str
    since: str
    until: str
    computed_at: str
    patients: list[PatientScope] = field(default_factory=list)
    studies: int = 0
    instances: int = 0
    records: int = 0  # trail records of the actor in the window
    readable_records: int = 0
    ciphertext_records: int = 0
    received_records: int = 0
    queries: int = 0
    actions: dict[str, int] = field(default_factory=dict)
    addresses: list[str] = field(default_factory=list)
    users: list[str] = field(default_factory=list)

    @property
    def readable_patients(self) -> int:
        return sum(1 for p in self.patients if p.readable)


@dataclass
class Notification:
    kind: str  # initial | complementary
    sent_at: str
    reference: str = ""


@dataclass
class Step:
    """One dated step of the record (opened, decided, notified, clock alerts...)."""

    time: str
    what: str
    by: str = ""


@dataclass
class Breach:
    """The register entry. Field order follows the regulator's notification form."""

    id: str
    version: int = 0
    created: str = ""
    updated: str = ""
    updated_by: str = ""
    title: str = ""
    controller: str = ""  # the practice (art. 33(3)(b) contact point below)
    contact: str = ""  # DPO or contact point
    aware_at: str = ""
    started_at: str = ""
    ended_at: str = ""
    ongoing: bool = True
    detection: str = "other"
    detection_ref: str = ""  # an alert's trail seq, a self-check finding id
    nature: list[str] = field(default_factory=list)
    origin: str = "unknown"
    circumstances: str = "other"
    circumstances_text: str = ""
    systems: str = ""
    data_categories: list[str] = field(default_factory=lambda: ["identity", "health",
                                                                 "images"])
    health_data: bool = True
    encrypted: bool = False
    keys_compromised: bool = False
    people_count: int | None = None
    people_exact: bool = False
    records_count: int | None = None
    records_exact: bool = False
    people_categories: list[str] = field(default_factory=lambda: ["patients"])
    consequences: str = ""
    severity: str = "limited"
    measures_before: str = ""
    measures_after: str = ""
    decision: str = ""
    decision_ground: str = ""
    decision_reasons: str = ""
    decided_at: str = ""
    notifications: list[Notification] = field(default_factory=list)
    delay_reasons: str = ""
    art34: str = ""
    art34_reasons: str = ""
    patients_informed_at: str = ""
    scope: Scope | None = None
    steps: list[Step] = field(default_factory=list)

    # --- derived -----------------------------------------------------------------------

    @property
    def unintelligible(self) -> bool:
        """Encrypted with keys that were not compromised (art. 34(3)(a))."""
        return self.encrypted and not self.keys_compromised

    @property
    def deadline(self) -> dt.datetime | None:
        return parse_time(self.aware_at) + DEADLINE if self.aware_at else None

    def initial_notification(self) -> Notification | None:
        return next((n for n in self.notifications if n.kind == "initial"), None)

    def clock(self, now: dt.datetime) -> Clock:
        return Clock.of(self, now)

    # --- (de)serialisation -------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Breach:
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["notifications"] = [Notification(**n) for n in data.get("notifications", [])]
        values["steps"] = [Step(**s) for s in data.get("steps", [])]
        raw_scope = data.get("scope")
        if isinstance(raw_scope, dict):
            scope_values = dict(raw_scope)
            scope_values["patients"] = [PatientScope(**p)
                                        for p in raw_scope.get("patients", [])]
            values["scope"] = Scope(**scope_values)
        return cls(**values)

    def validate(self) -> None:
        """Closed vocabularies and dates; raises ``BreachError`` naming the item."""
        check_id(self.id)
        for name, allowed in (("detection", DETECTIONS), ("origin", ORIGINS),
                              ("circumstances", CIRCUMSTANCES), ("severity", SEVERITIES),
                              ("decision", DECISIONS), ("decision_ground", NO_NOTIFY_GROUNDS),
                              ("art34", ART34)):
            if getattr(self, name) not in allowed:
                choices = ", ".join(a for a in allowed if a)
                raise BreachError(f"{name} must be one of: {choices}",
                                  f"{name} doit être l’un de : {choices}")
        for name, allowed in (("nature", NATURES), ("data_categories", DATA_CATEGORIES),
                              ("people_categories", PEOPLE_CATEGORIES)):
            bad = [v for v in getattr(self, name) if v not in allowed]
            if bad:
                raise BreachError(f"{name}: unknown value(s); allowed: {', '.join(allowed)}",
                                  f"{name} : valeur inconnue ; permises : {', '.join(allowed)}")
        for n in self.notifications:
            if n.kind not in NOTIFICATION_KINDS:
                raise BreachError("notification kind must be initial or complementary")
            parse_time(n.sent_at)
        for name in ("aware_at", "started_at", "ended_at", "decided_at",
                     "patients_informed_at"):
            if getattr(self, name):
                parse_time(getattr(self, name))
        if not self.aware_at:
            raise BreachError("the time of awareness is required (the 72-hour clock starts "
                              "there)", "la date de prise de connaissance est requise (le "
                              "délai de 72 heures part de là)")
        if self.decision == "not-notify" and not (self.decision_ground
                                                  and self.decision_reasons.strip()):
            raise BreachError("a decision not to notify needs its ground and its reasons "
                              "(art. 33(5))", "une décision de ne pas notifier demande son "
                              "motif et sa justification (art. 33(5))")
        if self.people_count is not None and self.people_count < 0:
            raise BreachError("people_count must be positive")
        if self.records_count is not None and self.records_count < 0:
            raise BreachError("records_count must be positive")


@dataclass(frozen=True)
class Clock:
    """Where the 72 hours stand for a record, at ``now``."""

    aware_at: dt.datetime
    deadline: dt.datetime
    elapsed: dt.timedelta
    decided: bool
    notified_at: dt.datetime | None

    @classmethod
    def of(cls, breach: Breach, now: dt.datetime) -> Clock:
        aware = parse_time(breach.aware_at)
        initial = breach.initial_notification()
        return cls(aware, aware + DEADLINE, utc(now) - aware, breach.decision != "",
                   parse_time(initial.sent_at) if initial else None)

    @property
    def hours_elapsed(self) -> float:
        return self.elapsed.total_seconds() / 3600

    @property
    def hours_left(self) -> float:
        return (DEADLINE - self.elapsed).total_seconds() / 3600

    @property
    def late(self) -> bool:
        """Notified after the deadline, or still undecided past it: reasons for the delay
        are then owed (art. 33(1))."""
        if self.notified_at is not None:
            return self.notified_at > self.deadline
        return not self.decided and self.elapsed > DEADLINE

    def due_alerts(self) -> list[int]:
        """The clock alerts (hours) reached while no decision is recorded."""
        if self.decided:
            return []
        return [h for h in CLOCK_ALERTS if self.elapsed >= dt.timedelta(hours=h)]

    def summary(self, lang: str = "en") -> str:
        hours = self.hours_left
        if self.notified_at is not None:
            when = self.notified_at.strftime("%Y-%m-%d %H:%M UTC")
            return (f"notifiée le {when}" if lang == "fr" else f"notified on {when}") + (
                (" (hors délai)" if lang == "fr" else " (late)") if self.late else "")
        if self.decided:
            return "décision enregistrée" if lang == "fr" else "decision recorded"
        deadline = self.deadline.strftime("%Y-%m-%d %H:%M UTC")
        if hours >= 0:
            return (f"{hours:.0f} h restantes (échéance {deadline})" if lang == "fr"
                    else f"{hours:.0f} h left (deadline {deadline})")
        return (f"échéance dépassée de {-hours:.0f} h ({deadline})" if lang == "fr"
                else f"deadline passed {-hours:.0f} h ago ({deadline})")
