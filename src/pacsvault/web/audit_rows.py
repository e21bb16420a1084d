"""The audit page's rows: groups of records (``audit.grouping``) as a DPO reads them.

Each row names the patient (ID and name) and the study (date, description) the records
refer to, resolved through the index for the rows shown only (one query per batch): the
trail seals references and never holds names. This happens in the authenticated auditor
pages and their exports only; nothing resolved here is logged.

Times are shown in the practice's time zone (``[web] time_zone``, the one every page
uses; default Europe/Paris) and the period filter is read in it too: a DPO asked about
"the 3rd" means the 3rd at the practice.
"""

from __future__ import annotations

import datetime as dt
import zoneinfo
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from pydicom.dataset import Dataset
from sqlalchemy import select

from pacsvault.audit.grouping import VIEW, Group, parse_time
from pacsvault.audit.query import AuditSource
from pacsvault.audit.trail_format import Record
from pacsvault.index.matching import normalise_name
from pacsvault.index.models import Patient, Study
from pacsvault.index.query import QueryEngine
from pacsvault.web.audit_names import action_name, code_name, outcome_name
from pacsvault.web.i18n import Gettext

_CHUNK = 500  # values per IN (...) query


def practice_zone(name: str) -> dt.tzinfo:
    """The zone named by the setting, else this machine's local zone."""
    if name:
        try:
            return zoneinfo.ZoneInfo(name)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            pass  # the setting is validated at load; a stale zone database: local time
    local = dt.datetime.now().astimezone().tzinfo
    return local or dt.UTC


def local_text(when: dt.datetime, zone: dt.tzinfo, lang: str, seconds: bool = True) -> str:
    """A time as the reader writes it (French: 05/12/2026 09:14:03), in ``zone``."""
    value = when.astimezone(zone)
    clock = "%H:%M:%S" if seconds else "%H:%M"
    return value.strftime(("%d/%m/%Y " if lang == "fr" else "%Y-%m-%d ") + clock)


def zone_label(zone: dt.tzinfo) -> str:
    key = getattr(zone, "key", None)
    return str(key) if key else (dt.datetime.now(zone).tzname() or "UTC")


@dataclass(frozen=True)
class StudyInfo:
    patient_id: str
    date: str  # YYYYMMDD as stored
    description: str
    modalities: str


@dataclass
class Directory:
    """Study and patient facts for a set of rows (what the index knows today; an erased
    patient's are gone, the row then shows the references alone)."""

    studies: dict[str, StudyInfo] = field(default_factory=dict)
    names: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, vault: AuditSource, study_uids: Iterable[str],
             patient_ids: Iterable[str]) -> Directory:
        out = cls()
        wanted = sorted(set(study_uids))
        with vault.sessions() as session:
            for start in range(0, len(wanted), _CHUNK):
                rows = session.execute(
                    select(Study.study_uid, Patient.patient_id, Patient.name,
                           Study.study_date, Study.description, Study.modalities)
                    .join(Patient, Study.patient_pk == Patient.pk)
                    .where(Study.study_uid.in_(wanted[start:start + _CHUNK])))
                for uid, pid, name, date, description, modalities in rows:
                    out.studies[uid] = StudyInfo(pid, date or "", description or "",
                                                 modalities or "")
                    out.names.setdefault(pid, name or "")
            missing = sorted(set(patient_ids) - set(out.names))
            for start in range(0, len(missing), _CHUNK):
                for pid, name in session.execute(
                        select(Patient.patient_id, Patient.name)
                        .where(Patient.patient_id.in_(missing[start:start + _CHUNK]))):
                    out.names.setdefault(pid, name or "")
        return out


def person_name(value: str) -> str:
    """A DICOM PN for reading: ``Durand^Alice`` -> ``Durand Alice`` (the components in
    their order, nothing else changed: the index's spelling is the truth)."""
    alphabetic = value.split("=", 1)[0]
    parts = [p for p in alphabetic.split("^") if p]
    return " ".join(parts)


def study_text(info: StudyInfo | None, lang: str) -> str:
    if info is None:
        return ""
    date = info.date
    if len(date) == 8 and date.isdigit():
        date = (f"{date[6:]}/{date[4:6]}/{date[:4]}" if lang == "fr"
                else f"{date[:4]}-{date[4:6]}-{date[6:]}")
    return " ".join(p for p in (date, info.modalities.replace("\\", "/"),
                                info.description) if p)


@dataclass(frozen=True)
class PatientCell:
    patient_id: str
    name: str


@dataclass(frozen=True)
class RawRow:
    """One record behind a row, as the page's details list shows it."""

    seq: int
    time: str
    action: str
    name: str
    code: str
    outcome: str
    resource: str
    images: int
    details: str


@dataclass(frozen=True)
class Row:
    key: str
    start: str
    end: str
    action: str
    name: str
    outcome: str
    who: str
    node: str
    address: str
    patients: tuple[PatientCell, ...]
    study_uid: str
    study: str
    images: int
    records: tuple[RawRow, ...]


def _details(rec: Record) -> str:
    details = " ".join(f"{k}={v}" for k, v in rec.detail.items())
    if rec.message:
        details = f"{details} -- {rec.message}" if details else rec.message
    return details


def _raw(rec: Record, zone: dt.tzinfo, lang: str, _: Gettext) -> RawRow:
    return RawRow(rec.seq, local_text(parse_time(rec.time), zone, lang), rec.action,
                  action_name(rec.action, _), code_name(rec.code, _),
                  outcome_name(rec.outcome, _), str(rec.detail.get("resource", "")),
                  len(rec.refs.get("sop_uids", [])), _details(rec))


def _outcome(group: Group, _: Gettext) -> str:
    worst = next((r.outcome for r in group.records if r.outcome != "success"), "success")
    return outcome_name(worst, _)


def references(groups: Iterable[Group]) -> tuple[set[str], set[str]]:
    studies: set[str] = set()
    patients: set[str] = set()
    for group in groups:
        studies.update(group.study_uids)
        patients.update(group.patient_ids)
    return studies, patients


def build_rows(vault: AuditSource, groups: Sequence[Group], zone: dt.tzinfo, lang: str,
               _: Gettext, *, raw: bool = True) -> list[Row]:
    """``groups`` as rows (same order), with patients and studies from the index."""
    studies, patients = references(groups)
    directory = Directory.load(vault, studies, patients)
    rows = []
    for group in groups:
        ids = list(group.patient_ids)
        for uid in group.study_uids:
            info = directory.studies.get(uid)
            if info and info.patient_id not in ids and len(group.study_uids) == 1 \
                    and not group.first.refs.get("withheld"):
                ids.append(info.patient_id)
        cells = tuple(PatientCell(pid, person_name(directory.names.get(pid, "")))
                      for pid in ids)
        uids = group.study_uids
        study = (study_text(directory.studies.get(uids[0]), lang) if len(uids) == 1
                 else (str(len(uids)) if uids else ""))
        start, end = parse_time(group.first.time), parse_time(group.last.time)
        first = group.first
        rows.append(Row(
            key=f"{first.instance or 'main'}-{first.seq}",
            start=local_text(start, zone, lang),
            end=local_text(end, zone, lang) if len(group.records) > 1 else "",
            action=group.action, name=action_name(group.action, _),
            outcome=_outcome(group, _), who=first.actor_user or first.actor_ae or "-",
            node=first.actor_ae, address=first.actor_address, patients=cells,
            study_uid=uids[0] if len(uids) == 1 else "", study=study,
            images=group.images if group.kind == VIEW else len(group.sops),
            records=tuple(_raw(r, zone, lang, _) for r in group.records) if raw else (),
        ))
    return rows


LOOKUP_LIMIT = 20  # candidates shown for a name; more: type more of it


def patients_named(vault: AuditSource, text: str, ae_title: str = "",
                   budget: float | None = None) -> list[tuple[str, str]]:
    """(Patient ID, readable name) of the patients whose name holds every word of
    ``text`` (any case, any order), at most ``LOOKUP_LIMIT`` + 1 (so the caller knows there
    are more). The index's own matching (as C-FIND and QIDO-RS) finds the candidates by
    the first word, the other words are checked here: a DPO is asked by a person, who
    gives a name, not the practice's patient ID."""
    words = [w for w in normalise_name(text.replace("^", " ")).split() if w]
    if not words:
        return []
    identifier = Dataset()
    identifier.PatientName = "*" + max(words, key=len).replace("*", "").replace("?", "") + "*"
    identifier.PatientID = ""
    engine = QueryEngine(vault.sessions, ae_title, time_budget=budget)
    out: list[tuple[str, str]] = []
    for answer in engine.find_json("PATIENT", identifier, root="PATIENT"):
        pid = str((answer.get("00100020", {}).get("Value") or [""])[0])
        value = (answer.get("00100010", {}).get("Value") or [{}])[0]
        name = str(value.get("Alphabetic", "")) if isinstance(value, dict) else str(value)
        key = normalise_name(name.replace("^", " "))
        if pid and all(w in key for w in words):
            out.append((pid, person_name(name)))
            if len(out) > LOOKUP_LIMIT:
                break
    return out
