"""Patient references in trail records: grouped per patient, sealed with AES-256-GCM.

Why apart from the appender: which patient an event touched is the only patient data in
the trail. Grouping (per patient, so an access request shows a patient their own
references only) and sealing (under a key derived from the master key, bound to the
record's ``seq``) are one concern, with one rule for the keys of rotated master keys.
"""

from __future__ import annotations

import base64
import json
import logging
import secrets
from typing import Any, cast

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import Connection, Engine, Table, select

from pacsvault.audit.events import AuditEvent
from pacsvault.audit.trail_format import FORMAT, TrailKeys
from pacsvault.index.models import Instance, Patient, Series, Study

log = logging.getLogger("pacsvault.audit")

_instances = cast(Table, Instance.__table__)
_series = cast(Table, Series.__table__)
_studies = cast(Table, Study.__table__)
_patients = cast(Table, Patient.__table__)


def grouped_refs(event: AuditEvent, conn: Connection | None,
                 engine: Engine | None) -> dict[str, Any]:
    """The sealed references, grouped per patient.

    The producer may say which patient each study (and which study each instance)
    belongs to; anything it did not say is looked up in the index. What the index does
    not know either stays ``unassigned``: shown to no patient's access request.
    """
    refs: dict[str, Any] = {
        "study_uids": list(event.study_uids),
        "sop_uids": list(event.sop_uids),
        "patient_ids": list(event.patient_ids),
    }
    if not any(refs.values()):
        return {}
    study_patient = dict(event.study_patients)
    sop_study = dict(event.sop_studies)
    missing_sops = [s for s in event.sop_uids if s not in sop_study]
    try:
        if missing_sops or any(s not in study_patient for s in event.study_uids):
            if conn is not None:
                _lookup(conn, study_patient, sop_study, missing_sops, list(event.study_uids))
            elif engine is not None:
                with engine.connect() as own:
                    _lookup(own, study_patient, sop_study, missing_sops,
                            list(event.study_uids))
    except Exception as exc:  # grouping is a convenience; the flat lists are kept
        log.error("audit references could not be grouped (%s)", type(exc).__name__)
    patients: dict[str, dict[str, list[str]]] = {
        p: {"study_uids": [], "sop_uids": []} for p in event.patient_ids}
    unassigned: dict[str, list[str]] = {"study_uids": [], "sop_uids": []}
    for study in event.study_uids:
        owner = study_patient.get(study)
        target = unassigned if owner is None else patients.setdefault(
            owner, {"study_uids": [], "sop_uids": []})
        target["study_uids"].append(study)
    for sop in event.sop_uids:
        owner = study_patient.get(sop_study.get(sop, ""))
        target = unassigned if owner is None else patients.setdefault(
            owner, {"study_uids": [], "sop_uids": []})
        target["sop_uids"].append(sop)
    refs["patients"] = patients
    if any(unassigned.values()):
        refs["unassigned"] = unassigned
    return refs


def _lookup(conn: Connection, study_patient: dict[str, str], sop_study: dict[str, str],
            sops: list[str], studies: list[str]) -> None:
    for start in range(0, len(sops), 500):
        chunk = sops[start:start + 500]
        rows = conn.execute(
            select(_instances.c.sop_uid, _studies.c.study_uid)
            .join(_series, _instances.c.series_pk == _series.c.pk)
            .join(_studies, _series.c.study_pk == _studies.c.pk)
            .where(_instances.c.sop_uid.in_(chunk)))
        for sop, study in rows:
            sop_study[str(sop)] = str(study)
    wanted = sorted({*studies, *sop_study.values()} - set(study_patient))
    for start in range(0, len(wanted), 500):
        chunk = wanted[start:start + 500]
        rows = conn.execute(
            select(_studies.c.study_uid, _patients.c.patient_id)
            .join(_patients, _studies.c.patient_pk == _patients.c.pk)
            .where(_studies.c.study_uid.in_(chunk)))
        for study, patient in rows:
            study_patient[str(study)] = str(patient)


def seal(keys: TrailKeys, seq: int, refs: dict[str, Any]) -> str:
    nonce = secrets.token_bytes(12)
    sealed = AESGCM(keys.sealing_key).encrypt(
        nonce, json.dumps(refs).encode(), f"{FORMAT}:{seq}".encode()
    )
    return base64.b64encode(nonce + sealed).decode()


def unseal(keys: TrailKeys, seq: int, blob: str) -> dict[str, Any]:
    raw = base64.b64decode(blob)
    for key in (keys.sealing_key, *keys.retired_sealing):
        try:  # records sealed before a key rotation: the old events keys
            plain = AESGCM(key).decrypt(raw[:12], raw[12:], f"{FORMAT}:{seq}".encode())
            break
        except InvalidTag:
            continue
    else:
        raise InvalidTag()
    value: dict[str, Any] = json.loads(plain)
    return value
