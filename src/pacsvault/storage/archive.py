"""The archive: where a received object becomes durable, encrypted and indexed.

Order matters for "nothing lost": parse and validate in memory, encrypt, stage the object
file durably, commit its index row, publish the file. Only when ``store`` returns may the
caller acknowledge success. ``ObjectStore.recover`` settles a crash at any point.
"""

from __future__ import annotations

import enum
import secrets
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from pacsvault.crypto import objects as objfmt
from pacsvault.crypto.keyring import Keyring
from pacsvault.dicom.parse import InvalidObject, ParsedInstance, parse
from pacsvault.index.matching import normalise_date, normalise_name, normalise_time
from pacsvault.index.models import Instance, Patient, Series, Study
from pacsvault.storage.objects import ObjectStore, Recovery

_HEADER_OVERHEAD = 4096


class StoreStatus(enum.Enum):
    STORED = "stored"
    DUPLICATE = "duplicate"  # byte-identical re-send: success, nothing new written
    CONFLICT = "conflict"  # different object under an existing SOP Instance UID


@dataclass(frozen=True)
class StoreResult:
    status: StoreStatus
    sop_uid: str
    study_uid: str


@dataclass(frozen=True)
class StoredInstance:
    """Where an instance lives; enough to read it back without another query."""

    sop_uid: str
    study_uid: str
    series_uid: str
    object_id: str
    key_id: uuid.UUID
    size: int


class Archive:
    def __init__(
        self, sessions: sessionmaker[Session], objects: ObjectStore, keyring: Keyring
    ) -> None:
        self._sessions = sessions
        self.objects = objects
        self._keyring = keyring
        # SQLite has one writer at a time anyway; taking the lock here keeps the
        # get-or-create of patients and studies free of races between associations.
        self._write_lock = threading.Lock()

    # --- writing --------------------------------------------------------------------

    def store(
        self,
        raw: bytes,
        *,
        source_ae: str = "",
        expected_sop_uid: str | None = None,
        expected_sop_class: str | None = None,
    ) -> StoreResult:
        """Store a Part 10 byte stream exactly as received.

        Raises ``UnreadableObject``/``InvalidObject`` for bad data and ``DiskFullError``
        when the disk reserve is reached; nothing is written in those cases.
        """
        parsed = parse(raw)
        if expected_sop_uid and parsed.sop_uid != expected_sop_uid.strip():
            raise InvalidObject("SOP Instance UID differs from the C-STORE request")
        if expected_sop_class and parsed.sop_class_uid != expected_sop_class.strip():
            raise InvalidObject("SOP Class UID differs from the C-STORE request")
        self.objects.check_space(len(raw) + _HEADER_OVERHEAD)

        prepared = self._prepare(parsed)
        if isinstance(prepared, StoreResult):
            return prepared
        key_id = prepared
        with self._sessions() as session:
            data_key = self._keyring.get(session, key_id)
        object_id = ObjectStore.new_id()
        self.objects.stage(object_id, objfmt.encrypt(raw, data_key, key_id, parsed.sop_uid))
        try:
            self._index(parsed, object_id, key_id, source_ae)
        except IntegrityError:
            # Another association stored the same SOP Instance UID meanwhile.
            self.objects.discard(object_id)
            known = self._existing(parsed)
            if known is None:
                raise
            return known
        except BaseException:
            self.objects.discard(object_id)
            raise
        self.objects.publish(object_id)
        return StoreResult(StoreStatus.STORED, parsed.sop_uid, parsed.study_uid)

    def _existing(self, parsed: ParsedInstance) -> StoreResult | None:
        with self._sessions() as session:
            return self._known(session, parsed)

    @staticmethod
    def _known(session: Session, parsed: ParsedInstance) -> StoreResult | None:
        digest = session.scalar(select(Instance.sha256).where(Instance.sop_uid == parsed.sop_uid))
        if digest is None:
            return None
        same = secrets.compare_digest(digest, parsed.sha256)
        status = StoreStatus.DUPLICATE if same else StoreStatus.CONFLICT
        return StoreResult(status, parsed.sop_uid, parsed.study_uid)

    def _prepare(self, parsed: ParsedInstance) -> StoreResult | uuid.UUID:
        """Either the answer for an already stored instance, or the data key to encrypt
        it under: its patient's (created with the patient on first sight)."""
        with self._write_lock, self._sessions.begin() as session:
            known = self._known(session, parsed)
            if known is not None:
                return known
            study = session.scalar(select(Study).where(Study.study_uid == parsed.study_uid))
            if study is not None:
                return uuid.UUID(study.patient.key_id)
            patient = self._find_patient(session, parsed)
            if patient is None:
                key_id = self._keyring.create(session)
                session.flush()
                patient = Patient(
                    patient_id=parsed.patient_id,
                    issuer=parsed.issuer,
                    name=parsed.patient_name,
                    name_norm=normalise_name(parsed.patient_name),
                    birth_date=normalise_date(parsed.birth_date),
                    sex=parsed.sex,
                    key_id=str(key_id),
                    meta_json=parsed.meta_json,
                )
                session.add(patient)
            return uuid.UUID(patient.key_id)

    @staticmethod
    def _find_patient(session: Session, parsed: ParsedInstance) -> Patient | None:
        return session.scalar(
            select(Patient).where(
                Patient.patient_id == parsed.patient_id, Patient.issuer == parsed.issuer
            )
        )

    def _index(
        self, parsed: ParsedInstance, object_id: str, key_id: uuid.UUID, source_ae: str
    ) -> None:
        with self._write_lock, self._sessions.begin() as session:
            study = session.scalar(select(Study).where(Study.study_uid == parsed.study_uid))
            if study is None:
                patient = self._find_patient(session, parsed)
                if patient is None:
                    raise RuntimeError("patient row vanished between key and index steps")
                study = Study(
                    patient_pk=patient.pk,
                    study_uid=parsed.study_uid,
                    study_date=normalise_date(parsed.study_date),
                    study_time=normalise_time(parsed.study_time),
                    accession_number=parsed.accession_number,
                    study_id=parsed.study_id,
                    description=parsed.study_description,
                    referring_physician=parsed.referring_physician,
                    referring_physician_norm=normalise_name(parsed.referring_physician),
                    num_series=0,
                    num_instances=0,
                    meta_json=parsed.meta_json,
                )
                session.add(study)
                session.flush()
            series = session.scalar(
                select(Series).where(Series.series_uid == parsed.series_uid)
            )
            if series is None:
                series = Series(
                    study_pk=study.pk,
                    series_uid=parsed.series_uid,
                    modality=parsed.modality,
                    series_number=parsed.series_number,
                    description=parsed.series_description,
                    body_part=parsed.body_part,
                    series_date=normalise_date(parsed.series_date),
                    series_time=normalise_time(parsed.series_time),
                    performed_start_date=normalise_date(parsed.performed_start_date),
                    performed_start_time=normalise_time(parsed.performed_start_time),
                    num_instances=0,
                    meta_json=parsed.meta_json,
                )
                session.add(series)
                session.flush()
                study.num_series += 1
                modalities = set(filter(None, study.modalities.split("\\")))
                if parsed.modality and parsed.modality not in modalities:
                    study.modalities = "\\".join(sorted(modalities | {parsed.modality}))
            session.add(
                Instance(
                    series_pk=series.pk,
                    sop_uid=parsed.sop_uid,
                    sop_class_uid=parsed.sop_class_uid,
                    instance_number=parsed.instance_number,
                    transfer_syntax=parsed.transfer_syntax,
                    rows=parsed.rows,
                    columns=parsed.columns,
                    number_of_frames=parsed.number_of_frames,
                    content_date=normalise_date(parsed.content_date),
                    content_time=normalise_time(parsed.content_time),
                    object_id=object_id,
                    key_id=str(key_id),
                    size=parsed.size,
                    sha256=parsed.sha256,
                    source_ae=source_ae,
                    meta_json=parsed.meta_json,
                )
            )
            series.num_instances += 1
            study.num_instances += 1

    # --- reading --------------------------------------------------------------------

    def locate(
        self,
        *,
        study_uid: str | None = None,
        patient_id: str | None = None,
        sop_uid: str | None = None,
    ) -> Iterator[StoredInstance]:
        """Instances matching one selector (all of them when none is given)."""
        stmt = (
            select(Instance, Series.series_uid, Study.study_uid)
            .join(Series, Instance.series_pk == Series.pk)
            .join(Study, Series.study_pk == Study.pk)
            .join(Patient, Study.patient_pk == Patient.pk)
            .order_by(Study.pk, Series.pk, Instance.pk)
        )
        if study_uid is not None:
            stmt = stmt.where(Study.study_uid == study_uid)
        if patient_id is not None:
            stmt = stmt.where(Patient.patient_id == patient_id)
        if sop_uid is not None:
            stmt = stmt.where(Instance.sop_uid == sop_uid)
        with self._sessions() as session:
            rows = session.execute(stmt).all()
        for inst, series_uid, study in rows:
            yield StoredInstance(
                inst.sop_uid, study, series_uid, inst.object_id, uuid.UUID(inst.key_id), inst.size
            )

    def read(self, item: StoredInstance) -> bytes:
        """Decrypt an instance; raises ``ObjectFormatError`` if its file was tampered with."""
        with self._sessions() as session:
            data_key = self._keyring.get(session, item.key_id)
        return objfmt.decrypt(self.objects.read(item.object_id), data_key, item.sop_uid)

    def is_indexed(self, object_id: str) -> bool:
        with self._sessions() as session:
            found = session.scalar(select(Instance.pk).where(Instance.object_id == object_id))
        return found is not None

    def recover(self) -> Recovery:
        """Settle object writes interrupted by a crash; run before accepting associations."""
        return self.objects.recover(self.is_indexed)

    def counts(self) -> dict[str, int]:
        with self._sessions() as session:
            return {
                "patients": session.scalar(select(func.count()).select_from(Patient)) or 0,
                "studies": session.scalar(select(func.count()).select_from(Study)) or 0,
                "series": session.scalar(select(func.count()).select_from(Series)) or 0,
                "instances": session.scalar(select(func.count()).select_from(Instance)) or 0,
                "bytes": session.scalar(select(func.coalesce(func.sum(Instance.size), 0))) or 0,
            }
