"""The index rows of a store, as one batch transaction writes them.

Why apart from ``archive``: the archive decides *when* rows are written (staging, group
commit, caches, removal generations); this module is *what* is written for one instance
(study and series found or created, the instance row, the counters) and what a re-send
of a known SOP Instance UID is. ``archive`` re-exports the public names.

On PostgreSQL every statement is a network round trip made while the batch holds the
index's write lock (shared by every instance), so a batch's per-image statements are
sent together (``BatchRows``, issue 16 scale-out ingest): one look-up of which SOP
Instance UIDs are known (with the removal generation), one multi-row ``INSERT`` of the
instance rows, one counter ``UPDATE`` per table for the series and studies touched; a
batch costs the same handful of round trips whatever its size. SQLite keeps its
per-image driver calls (no round trips to save).
"""

from __future__ import annotations

import enum
import secrets
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, cast

from sqlalchemy import (
    Connection,
    CursorResult,
    Select,
    Table,
    bindparam,
    insert,
    literal_column,
    select,
    table,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from pacsvault.audit.stores import StoredRef
from pacsvault.dicomfile.parse import ParsedInstance
from pacsvault.index import blind, dialect
from pacsvault.index.levels import Level
from pacsvault.index.matching import normalise_date, normalise_name, normalise_time
from pacsvault.index.models import DataKey, Instance, Patient, Series, Study, utcnow
from pacsvault.storage.rawinsert import RawInsert

_instances = cast(Table, Instance.__table__)
_series = cast(Table, Series.__table__)
_studies = cast(Table, Study.__table__)
_patients = cast(Table, Patient.__table__)
_keys = cast(Table, DataKey.__table__)

_INSERT_INSTANCE = (
    "INSERT INTO instances (series_pk, sop_uid, sop_class_uid, instance_number, "
    "transfer_syntax, rows, columns, number_of_frames, content_date, content_time, "
    "object_id, key_id, size, sha256, received, source_ae, meta_json) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_INSTANCE_COLUMNS = (
    "series_pk", "sop_uid", "sop_class_uid", "instance_number", "transfer_syntax", "rows",
    "columns", "number_of_frames", "content_date", "content_time", "object_id", "key_id",
    "size", "sha256", "received", "source_ae", "meta_json")
_COUNT_SERIES = "UPDATE series SET num_instances = num_instances + 1 WHERE pk = ?"
_COUNT_STUDY = "UPDATE studies SET num_instances = num_instances + 1 WHERE pk = ?"
_KNOWN = "SELECT sha256 FROM instances WHERE sop_uid = ?"
_STUDY_PK = "SELECT pk FROM studies WHERE study_uid = ?"
_PATIENT_PK = "SELECT pk FROM patients WHERE patient_id = ? AND issuer = ?"
_SERIES_PK = "SELECT pk FROM series WHERE series_uid = ?"
_MODALITIES = "SELECT modalities FROM studies WHERE pk = ?"
_KEY_ROW = "SELECT key_id FROM data_keys WHERE key_id = ?"
# Everything ``_index_sqlite`` reads for an instance whose study or series is not known
# to this batch, in one statement (one snapshot, under the batch's write lock).
_LOOK = ("SELECT (SELECT sha256 FROM instances WHERE sop_uid = ?), "
         "(SELECT pk FROM studies WHERE study_uid = ?), "
         "(SELECT modalities FROM studies WHERE study_uid = ?), "
         "(SELECT pk FROM series WHERE series_uid = ?), "
         "(SELECT pk FROM patients WHERE patient_id = ? AND issuer = ?), "
         "(SELECT key_id FROM data_keys WHERE key_id = ?)")
# A new series in a known study: its counters in one statement (with the instance's).
_STUDY_GAINS_SERIES_SQL = ("UPDATE studies SET num_series = num_series + 1, "
                           "num_instances = num_instances + 1 WHERE pk = ?")
_STUDY_GAINS_SERIES_MODALITY = ("UPDATE studies SET modalities = ?, num_series = num_series "
                                "+ 1, num_instances = num_instances + 1 WHERE pk = ?")
# A new study's, series', patient's and key's rows (the SQLite path of ``index_one``):
# statements built once and given their values at execution, so SQLAlchemy's types and
# column defaults apply as before while building a statement per row, which cost more than
# SQLite's own work (issue 17, the one-instance-study "filler" row), is gone.
_NEW_STUDY = insert(_studies)
_NEW_SERIES = insert(_series)
_NEW_PATIENT = insert(_patients)
_NEW_KEY = insert(_keys)
# The same inserts for ``_index_sqlite``, straight to the driver (``storage.rawinsert``).
_RAW_STUDY = RawInsert(_studies)
_RAW_SERIES = RawInsert(_series)
_RAW_PATIENT = RawInsert(_patients)
_RAW_KEY = RawInsert(_keys)
_STUDY_GAINS_SERIES = (update(_studies).where(_studies.c.pk == bindparam("row_pk"))
                       .values(num_series=_studies.c.num_series + 1))
_STUDY_GAINS_MODALITY = _STUDY_GAINS_SERIES.values(modalities=bindparam("modalities"))


class StaleChoice(RuntimeError):
    """Objects were removed since this store chose its study rows and data key: choose
    again (``store`` retries; raised to the caller only if removals keep racing it)."""


class StoreStatus(enum.Enum):
    STORED = "stored"
    DUPLICATE = "duplicate"  # re-send, byte-identical or re-encoded: success, nothing new
    CONFLICT = "conflict"  # different object under an existing SOP Instance UID


@dataclass(frozen=True)
class StoreResult:
    status: StoreStatus
    sop_uid: str
    study_uid: str


@dataclass
class Pending:
    """One staged object waiting for the commit of its index rows."""

    parsed: ParsedInstance
    object_id: str
    key_id: uuid.UUID
    source_ae: str
    generation: int = -1  # removal generation the study/key choice was valid at
    done: bool = False
    result: StoreResult | None = None  # set when the instance turned out to be known
    error: BaseException | None = None
    # primary keys learnt while indexing, cached once the transaction has committed
    learnt: dict[str, Any] = field(default_factory=dict)
    # who sent it, for the batch's audit record (``StoreJournal``)
    actor_address: str = ""
    actor_user: str = ""
    # A data key minted for a patient not in the index when this store chose its key
    # (``Keyring.mint``, unwrapped): its row, and the patient's if still missing, are
    # written with the instance's, in the batch (no transaction of their own), wrapped
    # there under the KEK of the commit's moment (a key rotation holds the commits).
    new_key: bytes | None = None
    # The object's fsync when it runs beside the commit (``ObjectStore.write_spare``):
    # the batch waits for it before its transaction commits (None: durable already).
    durable: Future[None] | None = None


class BatchRows:
    """A batch's instance rows and counters, written together by ``flush`` (not SQLite:
    see the module docstring). Made inside the batch's transaction, whose write lock it
    takes first: the known SOP Instance UIDs it reads are every commit's so far, and the items
    of this batch are added as they are indexed (a UID twice in one batch: the second
    is a re-send of the first).

    The driver-level subclass (``storage.pgrows.DriverRows``, what the archive uses on
    PostgreSQL) writes the same rows without SQLAlchemy's statement machinery: ``direct``
    tells ``index_one`` to hand it each item (``index``); this class stays the reference
    its rows are checked against (``tests/test_pg_driver_rows.py``)."""

    direct = False

    def __init__(self, conn: Connection, batch: Sequence[Pending]) -> None:
        dialect.take_write_lock(conn)  # first: everything below reads after it
        self.conn = conn
        self.rows: list[dict[str, Any]] = []
        self.series = Counter[int]()
        self.studies = Counter[int]()
        # The removal generation (``Archive._index_batch``) and the known UIDs in one
        # statement (one snapshot, after the write lock): one row at least, the
        # generation's, joined to each known instance.
        generation = select(literal_column(
            "coalesce(max(id), 0)").label("generation")).select_from(
            table("object_actions")).subquery()
        uids = sorted({item.parsed.sop_uid for item in batch})
        found = conn.execute(
            select(generation.c.generation, _instances.c.sop_uid, _instances.c.sha256)
            .select_from(generation.outerjoin(_instances, _instances.c.sop_uid.in_(uids))))
        self.generation = 0
        self.known: dict[str, bytes] = {}
        for row in found:
            self.generation = int(row[0])
            if row[1] is not None:
                self.known[str(row[1])] = bytes(row[2])

    def index(self, item: Pending, overlay_studies: dict[str, int],
              overlay_series: dict[str, int], cached_study: tuple[int, uuid.UUID] | None,
              cached_series: int | None, wrap: Callable[[uuid.UUID, bytes], bytes]) -> None:
        """One item's rows, for a ``direct`` batch (``DriverRows``); here ``index_one``
        does the work."""
        raise NotImplementedError

    def flush(self) -> None:
        """Send the collected rows (part of the batch's transaction: one commit): the
        instance rows as one executemany (one multi-row INSERT), each counter UPDATE as
        one executemany. Measured (``bench/scaleout_ingest.py``): folding the counters
        into the INSERT as CTEs saved a round trip but cost more CPU than it saved."""
        conn = self.conn
        if self.rows:
            conn.execute(insert(_instances), self.rows)
        for target, counts in ((_series, self.series), (_studies, self.studies)):
            if counts:
                conn.execute(update(target).where(target.c.pk == bindparam("row_pk")).values(
                    num_instances=target.c.num_instances + bindparam("added")),
                    [{"row_pk": pk, "added": n} for pk, n in sorted(counts.items())])
        self.rows, self.series, self.studies = [], Counter(), Counter()


def index_one(
    conn: Connection, item: Pending, overlay_studies: dict[str, int],
    overlay_series: dict[str, int], cached_study: tuple[int, uuid.UUID] | None,
    cached_series: int | None, received: Callable[[Any], Any],
    wrap: Callable[[uuid.UUID, bytes], bytes], together: BatchRows | None = None,
) -> None:
    """Write one instance's rows in the batch's transaction: its study and series found
    (cached, learnt earlier in this batch, or read) or created, the instance row and the
    counters (into ``together`` when given: sent by its ``flush``). ``item.learnt`` gets
    what the archive may cache once this commits; an instance known already gets
    ``item.result`` instead."""
    if together is not None and together.direct:
        together.index(item, overlay_studies, overlay_series, cached_study, cached_series,
                       wrap)
        return
    if together is None and conn.dialect.name == "sqlite":
        _index_sqlite(conn, item, overlay_studies, overlay_series, cached_study,
                      cached_series, received, wrap)
        return
    _index_general(conn, item, overlay_studies, overlay_series, cached_study, cached_series,
                   received, wrap, together)


def _index_general(
    conn: Connection, item: Pending, overlay_studies: dict[str, int],
    overlay_series: dict[str, int], cached_study: tuple[int, uuid.UUID] | None,
    cached_series: int | None, received: Callable[[Any], Any],
    wrap: Callable[[uuid.UUID, bytes], bytes], together: BatchRows | None,
) -> None:
    """``index_one``'s reference path: each step its own statement, through SQLAlchemy's
    types where a column may be sealed (PostgreSQL, ``BatchRows``)."""
    parsed = item.parsed
    if together is not None:
        digest = together.known.get(parsed.sop_uid)
        found = None if digest is None else answer(parsed, digest)
    else:
        found = known(conn, parsed)
    if found is not None:
        item.result = found
        return
    if item.new_key is not None:
        _ensure_key(conn, item.key_id, item.new_key, wrap)
    study_pk = cached_study[0] if cached_study else overlay_studies.get(parsed.study_uid)
    if study_pk is None:
        study_pk = _one(conn, _STUDY_PK, (parsed.study_uid,), lambda: select(_studies.c.pk)
                        .where(_studies.c.study_uid == parsed.study_uid))
    if study_pk is None:
        patient_pk = _one(conn, _PATIENT_PK, (parsed.patient_id, parsed.issuer),
                          lambda: select(_patients.c.pk).where(
                              _patients.c.patient_id == parsed.patient_id,
                              _patients.c.issuer == parsed.issuer))
        if patient_pk is None and item.new_key is not None:
            patient_pk = _new_patient(conn, parsed, item.key_id)
        if patient_pk is None:
            raise RuntimeError("patient row vanished between key and index steps")
        study_pk = _new_pk(conn.execute(_NEW_STUDY, _study_values(
            parsed, patient_pk, num_series=0, num_instances=0)))
        blind.write(conn, Level.STUDY, study_pk, {
            "StudyDate": normalise_date(parsed.study_date),
            "ReferringPhysicianName": normalise_name(parsed.referring_physician)})
    overlay_studies[parsed.study_uid] = study_pk
    series_pk = cached_series if cached_series else overlay_series.get(parsed.series_uid)
    if series_pk is None:
        series_pk = _one(conn, _SERIES_PK, (parsed.series_uid,), lambda: select(_series.c.pk)
                         .where(_series.c.series_uid == parsed.series_uid))
    if series_pk is None:
        series_pk = _new_pk(conn.execute(_NEW_SERIES, _series_values(parsed, study_pk, 0)))
        blind.write(conn, Level.SERIES, series_pk, {
            "SeriesDate": normalise_date(parsed.series_date),
            "PerformedProcedureStepStartDate": normalise_date(parsed.performed_start_date)})
        current = _one(conn, _MODALITIES, (study_pk,), lambda: select(_studies.c.modalities)
                       .where(_studies.c.pk == study_pk))
        modalities = set(filter(None, (current or "").split("\\")))
        if parsed.modality and parsed.modality not in modalities:
            conn.execute(_STUDY_GAINS_MODALITY, {
                "row_pk": study_pk,
                "modalities": "\\".join(sorted(modalities | {parsed.modality}))})
        else:
            conn.execute(_STUDY_GAINS_SERIES, {"row_pk": study_pk})
    overlay_series[parsed.series_uid] = series_pk
    row = _instance_row(item, series_pk, received)
    if together is not None:
        # Sealed columns (``index.sealing``): through SQLAlchemy's types, in the batch's
        # one multi-row INSERT.
        values = dict(zip(_INSTANCE_COLUMNS, row, strict=True))
        values["received"] = utcnow()  # sealed by its column type, not pre-processed
        together.rows.append(values)
        together.known[parsed.sop_uid] = parsed.sha256
        together.series[series_pk] += 1
        together.studies[study_pk] += 1
    elif conn.dialect.name != "sqlite":
        # Sealed columns (PostgreSQL, ``index.sealing``): through SQLAlchemy's types.
        values = dict(zip(_INSTANCE_COLUMNS, row, strict=True))
        values["received"] = utcnow()  # sealed by its column type, not pre-processed
        conn.execute(insert(_instances).values(values))
        conn.execute(update(_series).where(_series.c.pk == series_pk)
                     .values(num_instances=_series.c.num_instances + 1))
        conn.execute(update(_studies).where(_studies.c.pk == study_pk)
                     .values(num_instances=_studies.c.num_instances + 1))
    else:
        # The per-image statements go straight to the driver (same connection and
        # transaction): SQLAlchemy's statement building costs more than SQLite itself.
        cursor = conn.connection.cursor()
        try:
            cursor.execute(_INSERT_INSTANCE, row)
            cursor.execute(_COUNT_SERIES, (series_pk,))
            cursor.execute(_COUNT_STUDY, (study_pk,))
        finally:
            cursor.close()
    item.learnt["study"] = (study_pk, item.key_id) if cached_study is None else None
    item.learnt["series"] = series_pk if cached_series is None else None


def _index_sqlite(
    conn: Connection, item: Pending, overlay_studies: dict[str, int],
    overlay_series: dict[str, int], cached_study: tuple[int, uuid.UUID] | None,
    cached_series: int | None, received: Callable[[Any], Any],
    wrap: Callable[[uuid.UUID, bytes], bytes],
) -> None:
    """``index_one`` on the embedded index: the same rows in fewer statements (issue 17,
    the one-instance-study "filler" row, where each image is a new study: 15 statements
    per image became 6 to 9). Every read this instance needs is one statement
    (``_LOOK``: is it known, its study with that study's modalities, its series, its
    patient, the minted key's row), and a study or series created here is inserted with
    its final counters and modalities instead of being inserted and then updated. The
    rows are exactly ``index_one``'s general path's (``tests/test_store_rows_sqlite.py``
    compares them)."""
    parsed = item.parsed
    study_pk = cached_study[0] if cached_study else overlay_studies.get(parsed.study_uid)
    series_pk = cached_series if cached_series else overlay_series.get(parsed.series_uid)
    modalities: str | None = None
    patient_pk = None
    looked = study_pk is None or series_pk is None
    cursor = conn.connection.cursor()
    try:
        if not looked:  # a series known to this batch: one look-up
            row = cursor.execute(_KNOWN, (parsed.sop_uid,)).fetchone()
            digest = None if row is None else row[0]
            key_row = None
        else:
            (digest, found_study, modalities, found_series, patient_pk,
             key_row) = cursor.execute(_LOOK, (
                parsed.sop_uid, parsed.study_uid, parsed.study_uid, parsed.series_uid,
                parsed.patient_id, parsed.issuer, str(item.key_id))).fetchone()
            study_pk = study_pk if study_pk is not None else found_study
            series_pk = series_pk if series_pk is not None else found_series
    finally:
        cursor.close()
    if digest is not None:
        item.result = answer(parsed, digest)
        return
    if item.new_key is not None:  # the minted key's row, unless written already
        if not looked:
            _ensure_key(conn, item.key_id, item.new_key, wrap)
        elif key_row is None:
            _RAW_KEY.run(conn, {"key_id": str(item.key_id),
                                "wrapped": wrap(item.key_id, item.new_key)})
    new_study = study_pk is None
    new_series = series_pk is None
    if new_study:
        if patient_pk is None and item.new_key is not None:
            patient_pk = _new_patient(conn, parsed, item.key_id, raw=True)
        if patient_pk is None:
            raise RuntimeError("patient row vanished between key and index steps")
        # final values: this series (when new) and this instance counted already
        study_pk = _RAW_STUDY.run(conn, _study_values(
            parsed, patient_pk, num_series=1 if new_series else 0, num_instances=1,
            modalities=parsed.modality if new_series else ""))
    assert study_pk is not None
    overlay_studies[parsed.study_uid] = study_pk
    if new_series:
        series_pk = _RAW_SERIES.run(conn, _series_values(parsed, study_pk, 1))  # + this one
    assert series_pk is not None
    overlay_series[parsed.series_uid] = series_pk
    row = _instance_row(item, series_pk, received)
    cursor = conn.connection.cursor()
    try:
        cursor.execute(_INSERT_INSTANCE, row)
        if not new_series:
            cursor.execute(_COUNT_SERIES, (series_pk,))
        if new_series and not new_study:
            if modalities is None:  # (the study came from the cache)
                found = cursor.execute(_MODALITIES, (study_pk,)).fetchone()
                modalities = None if found is None else found[0]
            known_modalities = set(filter(None, (modalities or "").split("\\")))
            if parsed.modality and parsed.modality not in known_modalities:
                cursor.execute(_STUDY_GAINS_SERIES_MODALITY, (
                    "\\".join(sorted(known_modalities | {parsed.modality})), study_pk))
            else:
                cursor.execute(_STUDY_GAINS_SERIES_SQL, (study_pk,))
        elif not new_study:
            cursor.execute(_COUNT_STUDY, (study_pk,))
    finally:
        cursor.close()
    item.learnt["study"] = (study_pk, item.key_id) if cached_study is None else None
    item.learnt["series"] = series_pk if cached_series is None else None
    # A study made here was chosen its key by its patient (theirs, or minted for them and
    # now written): what a new study of theirs may be encrypted under
    # (``Archive._patient_cache``). Not from a study found: its patient may be another
    # (an instance naming a known study under another patient ID).
    item.learnt["patient"] = item.key_id if new_study else None


def _ensure_key(conn: Connection, key_id: uuid.UUID, key: bytes,
                wrap: Callable[[uuid.UUID, bytes], bytes]) -> None:
    """The minted key's row, unless an earlier item of this batch (or an earlier batch:
    concurrent stores of one new patient share the key) wrote it already."""
    if conn.dialect.name == "postgresql":  # one round trip instead of a read and a write
        conn.execute(pg_insert(_keys).values(key_id=str(key_id), wrapped=wrap(key_id, key))
                     .on_conflict_do_nothing(index_elements=[_keys.c.key_id]))
        return
    if _one(conn, _KEY_ROW, (str(key_id),),
            lambda: select(_keys.c.key_id).where(_keys.c.key_id == str(key_id))) is None:
        conn.execute(_NEW_KEY, {"key_id": str(key_id), "wrapped": wrap(key_id, key)})


def _new_patient(conn: Connection, parsed: ParsedInstance, key_id: uuid.UUID, *,
                 raw: bool = False) -> int:
    """The patient's row, first seen in this batch, under the minted key. When the
    patient appeared meanwhile (another process), the caller found it instead and the
    minted key simply joins their keys: the instance row names its own key.

    On PostgreSQL the insert is ``ON CONFLICT DO NOTHING`` and a conflict re-reads the
    row: a writer that does not take the index's write lock (another version, a tool)
    may have created the patient since the caller looked (issue 16, several instances)."""
    name_norm = normalise_name(parsed.patient_name)
    birth_date = normalise_date(parsed.birth_date)
    values = {"patient_id": parsed.patient_id, "issuer": parsed.issuer,
              "name": parsed.patient_name, "name_norm": name_norm, "birth_date": birth_date,
              "sex": parsed.sex, "key_id": str(key_id), "meta_json": parsed.meta_json}
    if conn.dialect.name == "postgresql":
        made = conn.scalar(pg_insert(_patients).values(values).on_conflict_do_nothing(
            index_elements=[_patients.c.patient_id, _patients.c.issuer])
            .returning(_patients.c.pk))
        if made is None:  # created meanwhile by another writer: theirs, tokens and all
            theirs = conn.scalar(select(_patients.c.pk).where(
                _patients.c.patient_id == parsed.patient_id,
                _patients.c.issuer == parsed.issuer))
            if theirs is None:
                raise RuntimeError("patient row conflicted but cannot be read")
            return int(theirs)
        pk = int(made)
    elif raw:  # (SQLite's fast path: ``storage.rawinsert``)
        pk = _RAW_PATIENT.run(conn, values)
    else:
        pk = _new_pk(conn.execute(_NEW_PATIENT, values))
    # as the ORM listener does for patients added through a session (``index.blind``)
    blind.write(conn, Level.PATIENT, pk, {"PatientName": name_norm or "",
                                          "PatientBirthDate": birth_date or ""})
    return pk


def _one(conn: Connection, sql: str, params: tuple[Any, ...],
         statement: Callable[[], Select[Any]]) -> Any:
    """The first column of the first row (None if none): on SQLite straight through the
    driver (plain columns; SQLAlchemy's statement building cost more than the look-up),
    elsewhere through SQLAlchemy's types (sealed columns)."""
    if conn.dialect.name != "sqlite":
        return conn.scalar(statement())
    cursor = conn.connection.cursor()
    try:
        row = cursor.execute(sql, params).fetchone()
    finally:
        cursor.close()
    return None if row is None else row[0]


def known(conn: Connection | Session, parsed: ParsedInstance) -> StoreResult | None:
    """The answer for an instance already indexed (same bytes: duplicate; other bytes:
    conflict), None for a new one."""
    if isinstance(conn, Connection) and conn.dialect.name == "sqlite":
        cursor = conn.connection.cursor()
        try:
            row = cursor.execute(_KNOWN, (parsed.sop_uid,)).fetchone()
        finally:
            cursor.close()
        digest = None if row is None else row[0]
    else:
        digest = conn.scalar(
            select(_instances.c.sha256).where(_instances.c.sop_uid == parsed.sop_uid))
    if digest is None:
        return None
    return answer(parsed, digest)


def answer(parsed: ParsedInstance, digest: bytes) -> StoreResult:
    """What a store of ``parsed`` is when its SOP Instance UID is indexed with the
    plaintext SHA-256 ``digest``: the same bytes are a duplicate, others a conflict."""
    same = secrets.compare_digest(bytes(digest), parsed.sha256)
    status = StoreStatus.DUPLICATE if same else StoreStatus.CONFLICT
    return StoreResult(status, parsed.sop_uid, parsed.study_uid)


def acknowledged(batch: list[Pending]) -> list[StoredRef]:
    """The instances of a batch that ``store`` will answer with success."""
    return [
        StoredRef(item.parsed.sop_uid, item.parsed.study_uid, item.parsed.patient_id,
                  item.source_ae, item.actor_address, item.actor_user,
                  duplicate=item.result is not None)
        for item in batch
        if item.error is None
        and (item.result is None or item.result.status is StoreStatus.DUPLICATE)
    ]


def _study_values(parsed: ParsedInstance, patient_pk: int, *, num_series: int,
                  num_instances: int, modalities: str | None = None) -> dict[str, Any]:
    """A new study row's values (both paths: the same normalisation, one place)."""
    values: dict[str, Any] = dict(
        patient_pk=patient_pk,
        study_uid=parsed.study_uid,
        study_date=normalise_date(parsed.study_date),
        study_time=normalise_time(parsed.study_time),
        accession_number=parsed.accession_number,
        study_id=parsed.study_id,
        description=parsed.study_description,
        referring_physician=parsed.referring_physician,
        referring_physician_norm=normalise_name(parsed.referring_physician),
        num_series=num_series,
        num_instances=num_instances,
        meta_json=parsed.meta_json,
    )
    if modalities is not None:
        values["modalities"] = modalities
    return values


def _series_values(parsed: ParsedInstance, study_pk: int, num_instances: int
                   ) -> dict[str, Any]:
    """A new series row's values (both paths)."""
    return dict(
        study_pk=study_pk,
        series_uid=parsed.series_uid,
        modality=parsed.modality,
        series_number=parsed.series_number,
        description=parsed.series_description,
        body_part=parsed.body_part,
        series_date=normalise_date(parsed.series_date),
        series_time=normalise_time(parsed.series_time),
        performed_start_date=normalise_date(parsed.performed_start_date),
        performed_start_time=normalise_time(parsed.performed_start_time),
        num_instances=num_instances,
        meta_json=parsed.meta_json,
    )


def _instance_row(item: Pending, series_pk: int, received: Callable[[Any], Any]
                  ) -> tuple[Any, ...]:
    """An instance row's values in ``_INSERT_INSTANCE``'s column order (both paths);
    ``received``: the column's bind processor for the receive time."""
    parsed = item.parsed
    return (
        series_pk, parsed.sop_uid, parsed.sop_class_uid, parsed.instance_number,
        parsed.transfer_syntax, parsed.rows, parsed.columns, parsed.number_of_frames,
        normalise_date(parsed.content_date), normalise_time(parsed.content_time),
        item.object_id, str(item.key_id), parsed.size, parsed.sha256,
        received(utcnow()), item.source_ae, parsed.meta_json,
    )


def _new_pk(result: CursorResult[Any]) -> int:
    pk = result.inserted_primary_key
    assert pk is not None
    return int(pk[0])
