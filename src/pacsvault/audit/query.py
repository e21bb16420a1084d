"""Selecting audit records by patient, study, user, node, action and time.

One function for ``pacsvault audit show`` and the auditor's web page, so both answer the
same question the same way. A patient filter matches records naming the Patient ID and
records naming one of that patient's studies (as the index knows them).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import select

from pacsvault.audit.trail import Record
from pacsvault.index.models import Patient, Study
from pacsvault.vault import Vault


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


def study_uids_of(vault: Vault, patient_id: str) -> set[str]:
    with vault.sessions() as session:
        return set(session.scalars(
            select(Study.study_uid).join(Patient, Study.patient_pk == Patient.pk)
            .where(Patient.patient_id == patient_id)))


def select_records(vault: Vault, flt: AuditFilter) -> list[Record]:
    """The records of the trail that pass every filter, oldest first."""
    studies = study_uids_of(vault, flt.patient) if flt.patient else set()
    since = flt.since.astimezone(dt.UTC).isoformat() if flt.since else ""
    until = flt.until.astimezone(dt.UTC).isoformat() if flt.until else ""
    out = []
    for rec in vault.audit.records():
        refs = rec.refs
        if flt.patient and not (
            flt.patient in refs.get("patient_ids", [])
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
        out.append(rec)
    return out
