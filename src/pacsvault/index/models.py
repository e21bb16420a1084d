"""ORM tables of the index.

Columns hold every attribute that C-FIND (PS3.4 C.6) and QIDO-RS (PS3.18 required matching
attributes) match on, in the normalised form of ``index.matching`` (names case-folded, times
padded) so the database compares them directly. ``meta_json`` keeps a whole non-bulk
dataset (DICOM JSON model) at each level, so any requested return key can be answered
without decrypting an image.

On PostgreSQL (issue 16) every column that identifies a patient or may carry health data
is ``Sealed`` (random AEAD: compared in pacsvault after decryption) or ``Fixed``
(deterministic AEAD: ``=``/``IN``/unique in SQL) by ``index.sealing``; on SQLite these are
the plain ``String``/``Text`` they always were (SQLCipher encrypts the whole file). The
per-attribute choice and what each leaks: docs/postgresql-index.md.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    Boolean,
    Column,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator, TypeEngine

from pacsvault.index.sealing import Fixed, Sealed, sealer_of


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Base(DeclarativeBase):
    pass


class SealedTime(TypeDecorator[dt.datetime]):
    """A reception or creation time that dates a patient's visit (a study's arrival is
    its appointment, give or take minutes): ``DateTime`` on SQLite (same DDL), sealed
    like ``index.sealing.Sealed`` (ISO 8601 in UTC) elsewhere. Never compared in SQL."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def __init__(self, label: str) -> None:
        super().__init__()
        self.label = label

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(DateTime(timezone=True))
        return dialect.type_descriptor(LargeBinary())

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        sealer = sealer_of(dialect)
        if sealer is None or value is None:
            return value
        return sealer.seal(self.label, value.astimezone(dt.UTC).isoformat())

    def process_result_value(self, value: Any, dialect: Dialect) -> Any:
        sealer = sealer_of(dialect)
        if sealer is None or value is None:
            return value
        return dt.datetime.fromisoformat(sealer.open(self.label, bytes(value)))


class DataKey(Base):
    """A patient's data key, wrapped. Deleting ``wrapped`` crypto-shreds the patient."""

    __tablename__ = "data_keys"
    key_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    wrapped: Mapped[bytes | None] = mapped_column(LargeBinary)
    created: Mapped[dt.datetime] = mapped_column(SealedTime("data_keys.created"),
                                                 default=utcnow)
    destroyed: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))


class Patient(Base):
    __tablename__ = "patients"
    __table_args__ = (
        UniqueConstraint("patient_id", "issuer"),
        # a B-tree over Sealed (random) ciphertext would cost writes and answer nothing:
        # SQLite only (same name as ``index=True`` gave it, same DDL there)
        Index("ix_patients_name_norm", "name_norm").ddl_if(dialect="sqlite"),
    )
    pk: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_id: Mapped[str] = mapped_column(Fixed("patients.patient_id", 64), index=True)
    issuer: Mapped[str] = mapped_column(Fixed("patients.issuer", 64), default="")
    name: Mapped[str] = mapped_column(Sealed("patients.name", 324), default="")
    name_norm: Mapped[str] = mapped_column(Sealed("patients.name_norm", 324), default="")
    birth_date: Mapped[str] = mapped_column(Sealed("patients.birth_date", 8), default="")
    sex: Mapped[str] = mapped_column(Sealed("patients.sex", 16), default="")
    key_id: Mapped[str] = mapped_column(ForeignKey("data_keys.key_id"))
    created: Mapped[dt.datetime] = mapped_column(SealedTime("patients.created"),
                                                 default=utcnow)
    # DICOM JSON of the first instance received: answers return keys without decryption.
    meta_json: Mapped[str] = mapped_column(Sealed("patients.meta_json"), default="{}")
    studies: Mapped[list[Study]] = relationship(back_populates="patient")


class Study(Base):
    __tablename__ = "studies"
    __table_args__ = (Index("ix_studies_study_date", "study_date").ddl_if(dialect="sqlite"),)
    pk: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_pk: Mapped[int] = mapped_column(ForeignKey("patients.pk"), index=True)
    study_uid: Mapped[str] = mapped_column(Fixed("studies.study_uid", 64), unique=True)
    study_date: Mapped[str] = mapped_column(Sealed("studies.study_date", 8), default="")
    study_time: Mapped[str] = mapped_column(Sealed("studies.study_time", 16), default="")
    accession_number: Mapped[str] = mapped_column(Fixed("studies.accession_number", 16),
                                                  default="", index=True)
    study_id: Mapped[str] = mapped_column(Sealed("studies.study_id", 16), default="")
    description: Mapped[str] = mapped_column(Sealed("studies.description", 64), default="")
    referring_physician: Mapped[str] = mapped_column(
        Sealed("studies.referring_physician", 324), default="")
    referring_physician_norm: Mapped[str] = mapped_column(
        Sealed("studies.referring_physician_norm", 324), default="")
    modalities: Mapped[str] = mapped_column(String(128), default="")
    num_series: Mapped[int] = mapped_column(Integer, default=0)
    num_instances: Mapped[int] = mapped_column(Integer, default=0)
    created: Mapped[dt.datetime] = mapped_column(SealedTime("studies.created"),
                                                 default=utcnow)
    meta_json: Mapped[str] = mapped_column(Sealed("studies.meta_json"), default="{}")
    patient: Mapped[Patient] = relationship(back_populates="studies")
    series: Mapped[list[Series]] = relationship(back_populates="study")


class Series(Base):
    __tablename__ = "series"
    pk: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_pk: Mapped[int] = mapped_column(ForeignKey("studies.pk"), index=True)
    series_uid: Mapped[str] = mapped_column(Fixed("series.series_uid", 64), unique=True)
    modality: Mapped[str] = mapped_column(String(16), default="", index=True)
    series_number: Mapped[int | None] = mapped_column(Integer)
    description: Mapped[str] = mapped_column(Sealed("series.description", 64), default="")
    body_part: Mapped[str] = mapped_column(Sealed("series.body_part", 16), default="")
    series_date: Mapped[str] = mapped_column(Sealed("series.series_date", 8), default="")
    series_time: Mapped[str] = mapped_column(Sealed("series.series_time", 16), default="")
    performed_start_date: Mapped[str] = mapped_column(
        Sealed("series.performed_start_date", 8), default="")
    performed_start_time: Mapped[str] = mapped_column(
        Sealed("series.performed_start_time", 16), default="")
    num_instances: Mapped[int] = mapped_column(Integer, default=0)
    meta_json: Mapped[str] = mapped_column(Sealed("series.meta_json"), default="{}")
    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")


class Instance(Base):
    __tablename__ = "instances"
    pk: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_pk: Mapped[int] = mapped_column(ForeignKey("series.pk"), index=True)
    sop_uid: Mapped[str] = mapped_column(Fixed("instances.sop_uid", 64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    instance_number: Mapped[int | None] = mapped_column(Integer)
    transfer_syntax: Mapped[str] = mapped_column(String(64))
    rows: Mapped[int | None] = mapped_column(Integer)
    columns: Mapped[int | None] = mapped_column(Integer)
    number_of_frames: Mapped[int | None] = mapped_column(Integer)
    content_date: Mapped[str] = mapped_column(Sealed("instances.content_date", 8), default="")
    content_time: Mapped[str] = mapped_column(Sealed("instances.content_time", 16),
                                              default="")
    object_id: Mapped[str] = mapped_column(String(32), unique=True)
    key_id: Mapped[str] = mapped_column(ForeignKey("data_keys.key_id"), index=True)
    size: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[bytes] = mapped_column(LargeBinary(32))
    received: Mapped[dt.datetime] = mapped_column(SealedTime("instances.received"),
                                                  default=utcnow)
    source_ae: Mapped[str] = mapped_column(String(16), default="")
    meta_json: Mapped[str] = mapped_column(Sealed("instances.meta_json"), default="{}")
    # Set when an admin quarantines the instance (``storage.removal``): kept, exportable,
    # but hidden from C-FIND/QIDO/WADO/C-MOVE/C-GET. Added at open to older vaults (db.py).
    quarantined: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    series: Mapped[Series] = relationship(back_populates="instances")
    __table_args__ = (
        # partial: costs nothing to the (NULL) rows written at every store
        Index("ix_instances_quarantined", "quarantined",
              sqlite_where=text("quarantined IS NOT NULL"),
              postgresql_where=text("quarantined IS NOT NULL")),
    )


class ObjectAction(Base):
    """One removal or quarantine change, written in the transaction that makes it.

    Who, when, what and why: the reason is free text an admin typed (it may name a
    patient), so it lives here, in the encrypted index, and never in logs; the trail's
    record points at this row's id. The largest id is the index's *removal generation*:
    processes that cache UIDs and keys (``storage.archive``) compare it to drop what a
    removal made stale. ``pending`` lists the object files still to delete (after commit).
    """

    __tablename__ = "object_actions"
    # ids never reused: generations only grow
    __table_args__ = ({"sqlite_autoincrement": True},)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    time: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    action: Mapped[str] = mapped_column(String(16))  # delete | quarantine | release
    level: Mapped[str] = mapped_column(String(8))  # study | series | instance
    uid: Mapped[str] = mapped_column(Fixed("object_actions.uid", 64))
    reason: Mapped[str] = mapped_column(Sealed("object_actions.reason"), default="")
    actor: Mapped[str] = mapped_column(String(64), default="")
    address: Mapped[str] = mapped_column(String(64), default="")
    instances: Mapped[int] = mapped_column(Integer, default=0)
    keys_destroyed: Mapped[int] = mapped_column(Integer, default=0)
    pending: Mapped[str] = mapped_column(Text, default="")


class Node(Base):
    """A registered DICOM peer: deny by default, so nothing talks to us unless listed here."""

    __tablename__ = "nodes"
    pk: Mapped[int] = mapped_column(Integer, primary_key=True)
    ae_title: Mapped[str] = mapped_column(String(16), unique=True)
    host: Mapped[str] = mapped_column(String(255))
    port: Mapped[int | None] = mapped_column(Integer)
    tls: Mapped[bool] = mapped_column(Boolean, default=False)
    client_cert: Mapped[bool] = mapped_column(Boolean, default=False)
    roles: Mapped[str] = mapped_column(String(64), default="store")
    # "bcp195" (strict) or "legacy-aes": a named old modality's opt-in to the retired
    # AES TLS profile (TLS_RSA_WITH_AES_128_CBC_SHA), never a global downgrade.
    tls_profile: Mapped[str] = mapped_column(String(16), default="bcp195",
                                             server_default="bcp195")
    created: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class NodeCertificate(Base):
    """A certificate issued to a node: the policy accepts a node's client certificate only
    if its serial is here for that node and not revoked. Rows outlive their node (removing a
    node revokes its certificates), so a re-added AE title never revives an old one. A
    table of its own: vaults made before it gain it when opened (``ensure_tables``)."""

    __tablename__ = "node_certificates"
    serial: Mapped[str] = mapped_column(String(40), primary_key=True)  # lowercase hex
    ae_title: Mapped[str] = mapped_column(String(16), index=True)
    kind: Mapped[str] = mapped_column(String(16), default="client")  # or "listener"
    issued: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    not_after: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    revoked: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))


class AuditHead(Base):
    """The last record written to the audit trail: truncating the trail is detected.

    One row per *instance* (a data directory sharing the index: ``vault.json``
    ``instance``, "main" for every vault made before instances existed), so several
    ``serve`` processes sharing a PostgreSQL index each anchor their own chain."""

    __tablename__ = "audit_head"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    instance: Mapped[str] = mapped_column(String(64), unique=True, default="main",
                                          server_default="main")
    seq: Mapped[int] = mapped_column(Integer)
    digest: Mapped[str] = mapped_column(String(64))
    # Set once, never cleared: the file was found shorter or different than anchored when
    # appending. Later appends continue the file, but verification keeps failing.
    broken: Mapped[str] = mapped_column(Text, default="")


class AuditLine(Base):
    """A copy of every record line an instance appended (``audit.instances``), written in
    the transaction that moves that instance's anchor: ``audit verify`` on any instance
    checks every instance's chain from here. The lines are signed and their patient
    references sealed: nothing readable is added. On an embedded index: the lines a store
    batch's commit made durable before the trail file's fsync (``audit.trail_journal``),
    deleted once the file is synced."""

    __tablename__ = "audit_lines"
    instance: Mapped[str] = mapped_column(String(64), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    line: Mapped[str] = mapped_column(Text)



def _token_table(name: str, parent: str) -> Table:
    """One level's blind tokens (``index.blind``): written only when the index encrypts
    its columns (PostgreSQL), empty on SQLite. A table per level so that each row's tokens
    go with it (``ON DELETE CASCADE``): removal and erasure cannot leave a token behind.
    The primary key (token, row) is the lookup index; ``row_pk``'s own index serves the
    cascade."""
    return Table(
        name, Base.metadata,
        Column("token", LargeBinary(16), primary_key=True),
        Column("row_pk", ForeignKey(f"{parent}.pk", ondelete="CASCADE"), primary_key=True,
               index=True),
    )


patient_tokens = _token_table("patient_tokens", "patients")
study_tokens = _token_table("study_tokens", "studies")
series_tokens = _token_table("series_tokens", "series")
