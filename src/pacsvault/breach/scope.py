"""Which patients, studies and instances an actor read, queried, sent or received in a
window: the breach's scope, counted from the audit trail.

Why from the trail and not from logs or the index: the trail is the one record of every
access to patient data that the server refuses to serve without (``audit.events``), it is
signed and chained, and its references are grouped per patient when written
(``audit.trail_refs``). The same rule as the alerts' bulk-access detector says what is a
read (``READ_CODES`` and queries, inbound stores excepted).

What left the archive *readable* (a WADO or QIDO answer, a C-GET or C-MOVE to a peer,
plain or TLS: TLS protects the wire, the peer gets the images in clear; an export to a
folder) is kept apart from what left only as *ciphertext* (backups: restic repositories
encrypted with keys that stay here), because art. 34(3)(a) exempts the letter to patients
for data that stayed unintelligible. A token appears in the records as ``detail.token``
(its id, never its secret) on every DICOMweb record made with it.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select

from pacsvault.audit.alerts.rules import INBOUND_PREFIXES, READ_CODES
from pacsvault.audit.events import EventCode
from pacsvault.audit.trail import Record
from pacsvault.breach.model import ACTOR_KINDS, BreachError, PatientScope, Scope, utc
from pacsvault.index.models import Study
from pacsvault.vault import Vault

# Records whose data left only encrypted (restic repositories: the keys stay here).
CIPHERTEXT_PREFIXES = ("backup.",)
ALERT_LOOKBACK = dt.timedelta(hours=24)


@dataclass(frozen=True)
class Actor:
    kind: str  # token | user | node | address
    value: str

    def __post_init__(self) -> None:
        if self.kind not in ACTOR_KINDS or not self.value:
            raise BreachError(f"an actor is one of {', '.join(ACTOR_KINDS)} with a value",
                              "l’acteur est un jeton, un utilisateur, un nœud ou une adresse, "
                              "avec sa valeur")

    def matches(self, rec: Record) -> bool:
        if self.kind == "token":
            return str(rec.detail.get("token", "")) == self.value
        if self.kind == "user":
            return rec.actor_user == self.value
        if self.kind == "address":  # one address, or several (an exposure finding's)
            return rec.actor_address in self.value.split(",")
        # a node: what it did, and what others sent to it (C-MOVE destination)
        return rec.actor_ae == self.value or (
            str(rec.detail.get("destination", "")) == self.value)


def _kind(rec: Record) -> str:
    """readable | ciphertext | received | query | "" (not an access to patient data)."""
    if rec.action.startswith(CIPHERTEXT_PREFIXES):
        return "ciphertext"
    if rec.action.startswith(INBOUND_PREFIXES) or rec.action.startswith("dicomweb.store"):
        return "received"
    try:
        code = EventCode(rec.code)
    except ValueError:
        return ""
    if code is EventCode.QUERY:
        return "query"
    if code in READ_CODES:
        return "readable"
    return ""


def _record_time(rec: Record) -> dt.datetime:
    return utc(dt.datetime.fromisoformat(rec.time))


@dataclass
class _Tally:
    studies: set[str] = field(default_factory=set)
    sops: set[str] = field(default_factory=set)
    accesses: int = 0
    kinds: set[str] = field(default_factory=set)


def _per_patient(refs: dict[str, Any]) -> dict[str, tuple[list[str], list[str]]]:
    grouped = refs.get("patients")
    if isinstance(grouped, dict):
        return {p: (list((g or {}).get("study_uids", [])), list((g or {}).get("sop_uids", [])))
                for p, g in grouped.items()}
    # an older record (not grouped): its patients, with the references undivided
    return {p: ([], []) for p in refs.get("patient_ids", [])}


def alert_actor(vault: Vault, seq: int) -> tuple[Actor, dt.datetime]:
    """The actor an alert's trail record names, and the alert's time."""
    for rec in vault.audit.all_records():
        if rec.seq == seq:
            if not rec.action.startswith("alert."):
                raise BreachError(f"trail record {seq} is not an alert ({rec.action})")
            for kind, value in (("user", rec.actor_user), ("node", rec.actor_ae),
                                ("address", rec.actor_address)):
                if value:
                    return Actor(kind, value), _record_time(rec)
            raise BreachError(f"alert {seq} names no user, node or address")
    raise BreachError(f"no trail record {seq}")


def exposure_actor(vault: Vault, since: dt.datetime, until: dt.datetime) -> Actor:
    """The outside addresses of the trail's ``exposure`` events in the window: what the
    self-check's exposure finding (``network.exposure-events``) reports."""
    addresses = sorted({rec.actor_address for rec in vault.audit.all_records()
                        if rec.action == "exposure" and rec.actor_address
                        and utc(since) <= _record_time(rec) <= utc(until)})
    if not addresses:
        raise BreachError("no exposure event in the window: nothing reached from outside",
                          "aucun événement d’exposition dans la période")
    return Actor("address", ",".join(addresses))


def compute(vault: Vault, actor: Actor, since: dt.datetime, until: dt.datetime,
            now: dt.datetime | None = None) -> Scope:
    """Count, per patient, what ``actor`` touched in [since, until]."""
    since, until = utc(since), utc(until)
    if until < since:
        raise BreachError("the window ends before it starts",
                          "la période finit avant de commencer")
    patients: dict[str, _Tally] = {}
    all_studies: set[str] = set()
    all_sops: set[str] = set()
    actions: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    addresses: set[str] = set()
    users: set[str] = set()
    records = 0
    for rec in vault.audit.all_records():
        if not actor.matches(rec):
            continue
        when = _record_time(rec)
        if when < since or when > until:
            continue
        records += 1
        actions[rec.action] += 1
        if rec.actor_address:
            addresses.add(rec.actor_address)
        if rec.actor_user:
            users.add(rec.actor_user)
        kind = _kind(rec)
        if not kind:
            continue
        kinds[kind] += 1
        refs = rec.refs
        all_studies.update(refs.get("study_uids", []))
        all_sops.update(refs.get("sop_uids", []))
        for patient, (studies, sops) in _per_patient(refs).items():
            tally = patients.setdefault(patient, _Tally())
            tally.studies.update(studies)
            tally.sops.update(sops)
            tally.accesses += 1
            tally.kinds.add(kind)
    sizes = _study_sizes(vault, all_studies)
    scope = Scope(
        actor_kind=actor.kind, actor=actor.value, since=since.isoformat(timespec="seconds"),
        until=until.isoformat(timespec="seconds"),
        computed_at=utc(now or dt.datetime.now(dt.UTC)).isoformat(timespec="seconds"),
        studies=len(all_studies),
        instances=_instances(all_studies, all_sops, sizes, records_sops=all_sops),
        records=records, readable_records=kinds["readable"] + kinds["query"],
        ciphertext_records=kinds["ciphertext"], received_records=kinds["received"],
        queries=kinds["query"], actions=dict(sorted(actions.items())),
        addresses=sorted(addresses), users=sorted(users),
    )
    for patient, tally in sorted(patients.items()):
        out_readable = bool(tally.kinds & {"readable", "query"})
        scope.patients.append(PatientScope(
            patient_id=patient, studies=len(tally.studies),
            instances=_instances(tally.studies, tally.sops, sizes, records_sops=tally.sops),
            accesses=tally.accesses, readable=out_readable,
            ciphertext_only=not out_readable and tally.kinds == {"ciphertext"}))
    return scope


def _instances(studies: set[str], sops: set[str], sizes: dict[str, int], *,
               records_sops: set[str]) -> int:
    """Instances named, plus those of studies named without their instances (a C-MOVE's
    begin record names studies: all their instances went)."""
    if records_sops:
        return len(sops)
    return sum(sizes.get(s, 0) for s in studies)


def _study_sizes(vault: Vault, studies: set[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    wanted = sorted(studies)
    with vault.sessions() as session:
        for start in range(0, len(wanted), 500):
            rows = session.execute(select(Study.study_uid, Study.num_instances)
                                   .where(Study.study_uid.in_(wanted[start:start + 500])))
            for uid, count in rows:
                out[str(uid)] = int(count or 0)
    return out
