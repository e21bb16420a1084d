"""Selecting audit records by patient, study, user, node, action and time.

One function for ``pacsvault audit show`` and the auditor's web page, so both answer the
same question the same way. A patient filter matches records naming the Patient ID and
records naming one of that patient's studies (as the index knows them).

A patient's access request must show only their own data: with a patient filter, each
record's references are cut down to that patient's; with a study filter, to those of the
patient(s) owning the study. Records grouped per patient when
written (``patients``) are cut exactly; older records are cut with the index (the
patient's studies and instances as it knows them today). Whatever is left out is counted
in ``withheld`` so the reader knows the event also concerned other data.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from pacsvault.audit.trail import Record
from pacsvault.index.models import Instance, Patient, Series, Study


class _RecordSource(Protocol):
    def records(self) -> Iterator[Record]: ...

    def all_records(self) -> list[Record]: ...


class AuditSource(Protocol):
    """The two things of a vault this module reads: the index and the trail.

    Why a protocol: audit sits below ``pacsvault.vault`` (which composes it), so it takes
    only what it needs; a ``pacsvault.vault.Vault`` passes as it is.
    """

    @property
    def sessions(self) -> sessionmaker[Session]: ...

    @property
    def audit(self) -> _RecordSource: ...


@dataclass(frozen=True)
class AuditFilter:
    """Filters combine (AND); empty values do not filter."""

    patient: str | None = None
    study: str | None = None
    user: str | None = None
    node: str | None = None
    action: str | None = None  # action name or prefix
    since: dt.datetime | None = None
    until: dt.datetime | None = None

    @property
    def names_patient_data(self) -> bool:
        """Reading by patient or study is itself an access worth recording."""
        return bool(self.patient or self.study)


def study_uids_of(vault: AuditSource, patient_id: str) -> set[str]:
    with vault.sessions() as session:
        return set(session.scalars(
            select(Study.study_uid).join(Patient, Study.patient_pk == Patient.pk)
            .where(Patient.patient_id == patient_id)))


def sop_uids_of(vault: AuditSource, patient_id: str) -> set[str]:
    with vault.sessions() as session:
        return set(session.scalars(
            select(Instance.sop_uid).join(Series, Instance.series_pk == Series.pk)
            .join(Study, Series.study_pk == Study.pk)
            .join(Patient, Study.patient_pk == Patient.pk)
            .where(Patient.patient_id == patient_id)))


def own_refs(refs: dict[str, Any], patient: str, studies: set[str],
             sops: set[str]) -> dict[str, Any]:
    """``refs`` cut down to ``patient``'s own references (see the module docstring)."""
    grouped = refs.get("patients")
    if isinstance(grouped, dict):
        mine = grouped.get(patient) or {}
        study_uids = list(mine.get("study_uids", []))
        sop_uids = list(mine.get("sop_uids", []))
        named = patient in grouped
    else:
        study_uids = [u for u in refs.get("study_uids", []) if u in studies]
        sop_uids = [u for u in refs.get("sop_uids", []) if u in sops]
        named = patient in refs.get("patient_ids", []) or bool(study_uids)
    out: dict[str, Any] = {"patient_ids": [patient] if named else [],
                           "study_uids": study_uids, "sop_uids": sop_uids}
    withheld = (len(refs.get("study_uids", [])) - len(study_uids)
                + len(refs.get("sop_uids", [])) - len(sop_uids)
                + len([p for p in refs.get("patient_ids", []) if p != patient]))
    if withheld:
        out["withheld"] = withheld  # other patients' references (or unattributable ones)
    return out


def study_owners(vault: AuditSource, study_uid: str) -> set[str]:
    """The Patient ID(s) the index files ``study_uid`` under (normally one)."""
    with vault.sessions() as session:
        return set(session.scalars(
            select(Patient.patient_id).join(Study, Study.patient_pk == Patient.pk)
            .where(Study.study_uid == study_uid)))


def refs_for_study(refs: dict[str, Any], study: str,
                   owners: dict[str, tuple[set[str], set[str]]]) -> dict[str, Any]:
    """``refs`` cut down to the references of the patient(s) owning ``study``.

    A study filter selects a record by one study, but the record may name other
    patients' data too (a multi-patient query); those must not leak to whoever reads
    one study's trail. The owner comes from the record's per-patient grouping when it has
    one, else from ``owners`` (the index: patient -> (studies, instances)). With no known
    owner only ``study`` itself is shown. The rest is counted in ``withheld``.
    """
    grouped = refs.get("patients")
    named: dict[str, tuple[set[str], set[str]]]
    if isinstance(grouped, dict):
        named = {p: (set(), set()) for p, g in grouped.items()
                 if study in (g or {}).get("study_uids", [])}
    else:
        named = dict(owners)
    patient_ids: list[str] = []
    study_uids: list[str] = []
    sop_uids: list[str] = []
    for patient, (studies, sops) in sorted(named.items()):
        mine = own_refs(refs, patient, studies, sops)
        patient_ids += [p for p in mine["patient_ids"] if p not in patient_ids]
        study_uids += [u for u in mine["study_uids"] if u not in study_uids]
        sop_uids += [u for u in mine["sop_uids"] if u not in sop_uids]
    if not named and study in refs.get("study_uids", []):
        study_uids = [study]
    out: dict[str, Any] = {"patient_ids": patient_ids, "study_uids": study_uids,
                           "sop_uids": sop_uids}
    withheld = (len(refs.get("study_uids", [])) - len(study_uids)
                + len(refs.get("sop_uids", [])) - len(sop_uids)
                + len([p for p in refs.get("patient_ids", []) if p not in patient_ids]))
    if withheld:
        out["withheld"] = withheld  # other patients' references (or unattributable ones)
    return out


def select_records(vault: AuditSource, flt: AuditFilter) -> list[Record]:
    """The records of the trail that pass every filter, oldest first."""
    studies = study_uids_of(vault, flt.patient) if flt.patient else set()
    sops: set[str] | None = None
    owners: dict[str, tuple[set[str], set[str]]] | None = None  # study filter, index
    since = flt.since.astimezone(dt.UTC).isoformat() if flt.since else ""
    until = flt.until.astimezone(dt.UTC).isoformat() if flt.until else ""
    out = []
    for rec in vault.audit.all_records():  # every instance's, by time (issue 16)
        refs = rec.refs
        if flt.patient and not (
            flt.patient in refs.get("patient_ids", [])
            or flt.patient in (refs.get("patients") or {})
            or studies & set(refs.get("study_uids", []))
        ):
            continue
        if flt.study and flt.study not in refs.get("study_uids", []):
            continue
        if flt.user and rec.actor_user != flt.user:
            continue
        if flt.node and rec.actor_ae != flt.node:
            continue
        if flt.action and not rec.action.startswith(flt.action):
            continue
        if since and rec.time < since:
            continue
        if until and rec.time > until:
            continue
        if flt.patient:
            if sops is None and "patients" not in refs and refs.get("sop_uids"):
                sops = sop_uids_of(vault, flt.patient)
            rec = dataclasses.replace(rec, refs=own_refs(refs, flt.patient, studies,
                                                         sops or set()))
        elif flt.study:
            if owners is None and "patients" not in refs:
                owners = {p: (study_uids_of(vault, p), sop_uids_of(vault, p))
                          for p in study_owners(vault, flt.study)}
            rec = dataclasses.replace(rec, refs=refs_for_study(refs, flt.study,
                                                               owners or {}))
        out.append(rec)
    return out
