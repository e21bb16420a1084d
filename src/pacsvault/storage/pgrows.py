"""A store batch's index rows on PostgreSQL, sent straight to psycopg (issue 16, ingest).

Why apart from ``rows``: on the scale-out deployment SQLAlchemy's own work (statement
build, bind processing loops, execution contexts, result objects) was the largest single
item of the server's CPU per image (bench/RESULTS.md, "Issue 16: scale-out ingest"). This
writes *exactly the same rows* as ``rows.BatchRows`` + ``rows.index_one`` (checked by
``tests/test_pg_driver_rows.py`` against that path, raw bytes and tokens), but as a few
literal statements on the batch's own connection and transaction:

- every value goes through the column's own SQLAlchemy bind processor (``_Binds``), so
  ``Sealed``/``Fixed``/``SealedTime`` columns are sealed by the same functions
  (``index.sealing``) under the dialect's sealer of the moment, and a column default
  (``created``, ``modalities``…) is what SQLAlchemy would have filled in;
- blind tokens come from ``index.blind.row_tokens``, written with their row in the same
  statement (a data-modifying CTE), so a row never commits without its tokens;
- per batch: the write lock and one statement for the removal generation and the known
  SOP Instance UIDs in one round trip (a pipeline), one statement for every instance row
  *and* the series/study counters; per new study one
  statement for the study, its first series and both rows' tokens; per new patient one.

Errors are SQLAlchemy's (``DBAPIError.instance``: ``IntegrityError`` for another
instance's same UID, ``OperationalError`` for a lost server), so the archive and the
DICOM status mapping see what they saw before. Nothing here commits: the archive's
``engine.begin()`` does, after the trail record.
"""

# ruff: noqa: S608 -- every statement here is built from this module's own table and
# column names; every value is a bound parameter.
from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, cast

from sqlalchemy import Connection, Table
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError

from pacsvault.index import blind
from pacsvault.index.dialect import WRITE_LOCK_KEY
from pacsvault.index.matching import normalise_date, normalise_name, normalise_time
from pacsvault.index.models import (
    DataKey,
    Instance,
    Patient,
    Series,
    Study,
    utcnow,
)
from pacsvault.index.sealing import Sealer, sealer_of
from pacsvault.storage.rows import BatchRows, Pending, answer

_instances = cast(Table, Instance.__table__)
_series = cast(Table, Series.__table__)
_studies = cast(Table, Study.__table__)
_patients = cast(Table, Patient.__table__)
_keys = cast(Table, DataKey.__table__)

_INSTANCE_COLUMNS = (
    "series_pk", "sop_uid", "sop_class_uid", "instance_number", "transfer_syntax", "rows",
    "columns", "number_of_frames", "content_date", "content_time", "object_id", "key_id",
    "size", "sha256", "received", "source_ae", "meta_json")
_STUDY_COLUMNS = (
    "patient_pk", "study_uid", "study_date", "study_time", "accession_number", "study_id",
    "description", "referring_physician", "referring_physician_norm", "num_series",
    "num_instances", "meta_json", "modalities", "created")
_SERIES_COLUMNS = (
    "study_pk", "series_uid", "modality", "series_number", "description", "body_part",
    "series_date", "series_time", "performed_start_date", "performed_start_time",
    "num_instances", "meta_json")
_PATIENT_COLUMNS = (
    "patient_id", "issuer", "name", "name_norm", "birth_date", "sex", "key_id",
    "meta_json", "created")
_KEY_COLUMNS = ("key_id", "wrapped", "created")

_LOCK = f"SELECT pg_advisory_xact_lock({WRITE_LOCK_KEY})"
# The generation and the batch's known UIDs in one snapshot (after the write lock):
# always one row, the generation's, joined to each known instance.
_KNOWN = ("SELECT g.generation, i.sop_uid, i.sha256 FROM "
          "(SELECT coalesce(max(id), 0) AS generation FROM object_actions) AS g "
          "LEFT OUTER JOIN instances AS i ON i.sop_uid = ANY(%s)")
_NAMES = {"study": "SELECT pk FROM studies WHERE study_uid = %s",
          "series": "SELECT pk FROM series WHERE series_uid = %s",
          "patient": "SELECT pk FROM patients WHERE patient_id = %s AND issuer = %s"}
_SET_MODALITIES = "UPDATE studies SET modalities = %s WHERE pk = %s"


def _cast(table: Table, name: str, dialect: Dialect) -> str:
    """The SQL type a bound value of ``table.name`` is cast to where PostgreSQL cannot
    infer it from an INSERT's target (``INSERT … SELECT``): the column's type without
    its length (a cast to ``varchar(n)`` would truncate; the column still checks it)."""
    return str(table.c[name].type.compile(dialect)).split("(")[0].lower()


def _placeholders(table: Table, names: Sequence[str], dialect: Dialect) -> str:
    return ", ".join(f"%s::{_cast(table, n, dialect)}" for n in names)


def _statements(dialect: Dialect) -> dict[str, str]:
    """This dialect's literal statements (built once: ``_Binds``)."""
    ph = _placeholders
    study_cols = ", ".join(_STUDY_COLUMNS)
    series_cols = ", ".join(_SERIES_COLUMNS)
    patient_cols = ", ".join(_PATIENT_COLUMNS)
    # ``study_pk`` of the series is the new study's (``st.pk``), not a bound value
    series_rest = ph(_series, _SERIES_COLUMNS[1:], dialect)
    tokens = "unnest(%s::bytea[])"
    return {
        "key": (f"INSERT INTO data_keys ({', '.join(_KEY_COLUMNS)}) VALUES "
                f"({ph(_keys, _KEY_COLUMNS, dialect)}) ON CONFLICT (key_id) DO NOTHING"),
        "patient": (
            f"WITH p AS (INSERT INTO patients ({patient_cols}) VALUES "
            f"({ph(_patients, _PATIENT_COLUMNS, dialect)}) "
            "ON CONFLICT (patient_id, issuer) DO NOTHING RETURNING pk), "
            f"t AS (INSERT INTO patient_tokens (token, row_pk) SELECT x, p.pk FROM p, "
            f"{tokens} AS x) SELECT pk FROM p"),
        "study": (
            f"WITH st AS (INSERT INTO studies ({study_cols}) VALUES "
            f"({ph(_studies, _STUDY_COLUMNS, dialect)}) RETURNING pk), "
            "stt AS (INSERT INTO study_tokens (token, row_pk) SELECT x, st.pk FROM st, "
            f"{tokens} AS x) SELECT st.pk, NULL FROM st"),
        "study+series": (
            f"WITH st AS (INSERT INTO studies ({study_cols}) VALUES "
            f"({ph(_studies, _STUDY_COLUMNS, dialect)}) RETURNING pk), "
            "stt AS (INSERT INTO study_tokens (token, row_pk) SELECT x, st.pk FROM st, "
            f"{tokens} AS x), "
            f"se AS (INSERT INTO series ({series_cols}) SELECT st.pk, {series_rest} "
            "FROM st RETURNING pk), "
            "set_ AS (INSERT INTO series_tokens (token, row_pk) SELECT x, se.pk FROM se, "
            f"{tokens} AS x) SELECT st.pk, se.pk FROM st, se"),
        "series": (
            f"WITH se AS (INSERT INTO series ({series_cols}) VALUES "
            f"({ph(_series, _SERIES_COLUMNS, dialect)}) RETURNING pk), "
            "set_ AS (INSERT INTO series_tokens (token, row_pk) SELECT x, se.pk FROM se, "
            f"{tokens} AS x), "
            "up AS (UPDATE studies SET num_series = num_series + 1 WHERE pk = %s "
            "RETURNING modalities) SELECT se.pk, up.modalities FROM se, up"),
    }


class _Binds:
    """Per dialect: each column's bind processor (what SQLAlchemy applies to a bound
    value: the sealing types' ``process_bind_param`` with this dialect, so the sealer of
    the moment) and the literal statements. Kept on the dialect object itself: the
    processors close over it."""

    def __init__(self, dialect: Dialect) -> None:
        self.processors: dict[tuple[str, str], Callable[[Any], Any] | None] = {}
        for table in (_instances, _series, _studies, _patients, _keys):
            for column in table.c:
                self.processors[(table.name, column.name)] = (
                    column.type.bind_processor(dialect))
        self.sql = _statements(dialect)

    @classmethod
    def of(cls, dialect: Dialect) -> _Binds:
        found: _Binds | None = dialect.__dict__.get("pv_driver_binds")
        if found is None:
            found = cls(dialect)
            dialect.pv_driver_binds = found  # type: ignore[attr-defined]
        return found

    def row(self, table: Table, names: Sequence[str], values: dict[str, Any]) -> list[Any]:
        """``values`` (by column name) in ``names``' order, bound as SQLAlchemy binds
        them; a column missing from ``values`` gets its Python-side default, as a Core
        ``insert`` fills it in."""
        out: list[Any] = []
        for name in names:
            if name in values:
                value = values[name]
            else:
                default: Any = table.c[name].default
                if default is None:
                    value = None
                elif default.is_callable:
                    value = default.arg(None)
                else:
                    value = default.arg
            processor = self.processors[(table.name, name)]
            out.append(value if processor is None or value is None else processor(value))
        return out


def bound(dialect: Dialect, table: Table, name: str, value: Any) -> Any:
    """``value`` of ``table.name`` as SQLAlchemy binds it on ``dialect`` (a ``Fixed``
    UID sealed, a plain column as it is), for a literal statement."""
    return _Binds.of(dialect).row(table, (name,), {name: value})[0]


class DriverRows(BatchRows):
    """``BatchRows`` on PostgreSQL through psycopg (see the module docstring): made inside
    the batch's transaction after its write lock, like ``BatchRows``; ``index`` replaces
    ``rows.index_one``'s work for each item, ``flush`` sends the instance rows."""

    direct = True

    def __init__(self, conn: Connection, batch: Sequence[Pending]) -> None:
        # (``BatchRows.__init__`` would read through SQLAlchemy: not called)
        self.conn = conn
        self.rows: list[dict[str, Any]] = []
        self.series = Counter[int]()
        self.studies = Counter[int]()
        self._dialect = conn.dialect
        self._binds = _Binds.of(conn.dialect)
        sealer = sealer_of(conn.dialect)
        if sealer is None:  # (sealer_of refuses any non-SQLite dialect without one)
            raise TypeError("DriverRows is for a sealed PostgreSQL index")
        self._sealer: Sealer = sealer
        self._cursor: Any = None  # the batch's one DBAPI cursor (``_run``)
        self._instance_rows: list[list[Any]] = []
        fix = self._processor(_instances, "sop_uid")
        by_blob = {bytes(fix(uid)): uid for uid in {item.parsed.sop_uid for item in batch}}
        found = self._locked_read(sorted(by_blob))
        self.generation = 0
        self.known: dict[str, bytes] = {}
        for generation, uid_blob, digest in found:
            self.generation = int(generation)
            if uid_blob is not None:
                self.known[by_blob[bytes(uid_blob)]] = bytes(digest)

    def _locked_read(self, uid_blobs: list[bytes]) -> list[tuple[Any, ...]]:
        """The index's write lock (``dialect.WRITE_LOCK_KEY``), then the generation and
        the known UIDs, sent as one psycopg pipeline: the transaction's BEGIN, the lock
        and the read leave together and come back after one round trip (three before).
        PostgreSQL runs them in order, each statement with its own snapshot (read
        committed), so the read sees every commit made before the lock was granted."""
        import psycopg

        raw: Any = self.conn.connection.driver_connection
        try:
            if self._cursor is None:
                self._cursor = self.conn.connection.cursor()
            with raw.pipeline(), raw.cursor() as lock:
                lock.execute(_LOCK)
                self._cursor.execute(_KNOWN, (uid_blobs,))
                found: list[tuple[Any, ...]] = self._cursor.fetchall()
        except psycopg.Error as exc:
            raise DBAPIError.instance(_KNOWN, None, exc, psycopg.Error, hide_parameters=True,
                                      dialect=self._dialect) from exc
        return found

    def _processor(self, table: Table, name: str) -> Callable[[Any], Any]:
        processor = self._binds.processors[(table.name, name)]
        assert processor is not None
        return processor

    def _run(self, sql: str, params: Sequence[Any]) -> Any:
        """One statement on the batch's connection; psycopg's errors raised as SQLAlchemy
        raises them (same classes, parameters hidden as the engine hides them)."""
        import psycopg

        try:
            if self._cursor is None:
                self._cursor = self.conn.connection.cursor()
            self._cursor.execute(sql, params)
        except psycopg.Error as exc:
            raise DBAPIError.instance(sql, None, exc, psycopg.Error, hide_parameters=True,
                                      dialect=self._dialect) from exc
        return self._cursor

    def _tokens(self, values: dict[str, str]) -> list[bytes]:
        return sorted(blind.row_tokens(self._sealer, values))

    def index(self, item: Pending, overlay_studies: dict[str, int],
              overlay_series: dict[str, int], cached_study: tuple[int, uuid.UUID] | None,
              cached_series: int | None, wrap: Callable[[uuid.UUID, bytes], bytes]) -> None:
        """``rows.index_one`` for one item of this batch (same rows, same ``learnt``)."""
        parsed = item.parsed
        digest = self.known.get(parsed.sop_uid)
        if digest is not None:
            item.result = answer(parsed, digest)
            return
        binds, sql = self._binds, self._binds.sql
        if item.new_key is not None:
            self._run(sql["key"], binds.row(_keys, _KEY_COLUMNS, {
                "key_id": str(item.key_id), "wrapped": wrap(item.key_id, item.new_key)}))
        study_pk = cached_study[0] if cached_study else overlay_studies.get(parsed.study_uid)
        series_pk = cached_series if cached_series else overlay_series.get(parsed.series_uid)
        patient_pk = None
        if study_pk is None or series_pk is None:
            study_pk, series_pk, patient_pk = self._look_up(item, study_pk, series_pk)
        if study_pk is None:
            if patient_pk is None and item.new_key is not None:
                patient_pk = self._new_patient(item)
            if patient_pk is None:
                raise RuntimeError("patient row vanished between key and index steps")
            study_pk, made_series = self._new_study(item, patient_pk, series_pk is None)
            if series_pk is None:
                series_pk = made_series
        elif series_pk is None:
            series_pk = self._new_series(item, study_pk)
        assert series_pk is not None
        overlay_studies[parsed.study_uid] = study_pk
        overlay_series[parsed.series_uid] = series_pk
        self._instance_rows.append(binds.row(_instances, _INSTANCE_COLUMNS, {
            "series_pk": series_pk, "sop_uid": parsed.sop_uid,
            "sop_class_uid": parsed.sop_class_uid, "instance_number": parsed.instance_number,
            "transfer_syntax": parsed.transfer_syntax, "rows": parsed.rows,
            "columns": parsed.columns, "number_of_frames": parsed.number_of_frames,
            "content_date": normalise_date(parsed.content_date),
            "content_time": normalise_time(parsed.content_time),
            "object_id": item.object_id, "key_id": str(item.key_id), "size": parsed.size,
            "sha256": parsed.sha256, "received": utcnow(), "source_ae": item.source_ae,
            "meta_json": parsed.meta_json}))
        self.known[parsed.sop_uid] = parsed.sha256
        self.series[series_pk] += 1
        self.studies[study_pk] += 1
        item.learnt["study"] = (study_pk, item.key_id) if cached_study is None else None
        item.learnt["series"] = series_pk if cached_series is None else None

    def _look_up(self, item: Pending, study_pk: int | None, series_pk: int | None,
                 ) -> tuple[int | None, int | None, int | None]:
        """The rows not known yet, in one statement: the study (and, when it is not in
        the index, its patient) and the series."""
        parsed = item.parsed
        binds = self._binds
        parts: list[str] = []
        params: list[Any] = []
        if study_pk is None:
            parts += [f"({_NAMES['study']})", f"({_NAMES['patient']})"]
            params += binds.row(_studies, ("study_uid",), {"study_uid": parsed.study_uid})
            params += binds.row(_patients, ("patient_id", "issuer"), {
                "patient_id": parsed.patient_id, "issuer": parsed.issuer})
        if series_pk is None:
            parts.append(f"({_NAMES['series']})")
            params += binds.row(_series, ("series_uid",), {"series_uid": parsed.series_uid})
        row = list(self._run("SELECT " + ", ".join(parts), params).fetchone())
        patient_pk = None
        if study_pk is None:
            study_pk, patient_pk = row.pop(0), row.pop(0)
        if series_pk is None:
            series_pk = row.pop(0)
        return study_pk, series_pk, patient_pk

    def _new_patient(self, item: Pending) -> int:
        """``rows._new_patient``: the patient's row and tokens in one statement, or
        another writer's row when it appeared meanwhile."""
        parsed = item.parsed
        name_norm = normalise_name(parsed.patient_name)
        birth_date = normalise_date(parsed.birth_date)
        params = self._binds.row(_patients, _PATIENT_COLUMNS, {
            "patient_id": parsed.patient_id, "issuer": parsed.issuer,
            "name": parsed.patient_name, "name_norm": name_norm, "birth_date": birth_date,
            "sex": parsed.sex, "key_id": str(item.key_id), "meta_json": parsed.meta_json})
        tokens = self._tokens({"PatientName": name_norm or "",
                               "PatientBirthDate": birth_date or ""})
        made = self._run(self._binds.sql["patient"], [*params, tokens]).fetchone()
        if made is not None:
            return int(made[0])
        theirs = self._run(_NAMES["patient"], self._binds.row(
            _patients, ("patient_id", "issuer"),
            {"patient_id": parsed.patient_id, "issuer": parsed.issuer})).fetchone()
        if theirs is None:
            raise RuntimeError("patient row conflicted but cannot be read")
        return int(theirs[0])

    def _series_values(self, item: Pending, study_pk: int | None) -> tuple[
            dict[str, Any], list[bytes]]:
        parsed = item.parsed
        values = {
            "study_pk": study_pk, "series_uid": parsed.series_uid,
            "modality": parsed.modality, "series_number": parsed.series_number,
            "description": parsed.series_description, "body_part": parsed.body_part,
            "series_date": normalise_date(parsed.series_date),
            "series_time": normalise_time(parsed.series_time),
            "performed_start_date": normalise_date(parsed.performed_start_date),
            "performed_start_time": normalise_time(parsed.performed_start_time),
            "num_instances": 0, "meta_json": parsed.meta_json}
        tokens = self._tokens({
            "SeriesDate": normalise_date(parsed.series_date),
            "PerformedProcedureStepStartDate": normalise_date(parsed.performed_start_date)})
        return values, tokens

    def _new_study(self, item: Pending, patient_pk: int, with_series: bool,
                   ) -> tuple[int, int | None]:
        """A new study and its tokens and, when its series is new too (the usual case),
        that series and its tokens, in one statement. The study is written as the
        per-item path leaves it after adding the series (``num_series`` 1, the series'
        modality), not inserted then updated."""
        parsed = item.parsed
        referring_norm = normalise_name(parsed.referring_physician)
        study = {
            "patient_pk": patient_pk, "study_uid": parsed.study_uid,
            "study_date": normalise_date(parsed.study_date),
            "study_time": normalise_time(parsed.study_time),
            "accession_number": parsed.accession_number, "study_id": parsed.study_id,
            "description": parsed.study_description,
            "referring_physician": parsed.referring_physician,
            "referring_physician_norm": referring_norm,
            "num_series": 1 if with_series else 0, "num_instances": 0,
            "meta_json": parsed.meta_json}
        if with_series and parsed.modality:
            study["modalities"] = parsed.modality
        params = self._binds.row(_studies, _STUDY_COLUMNS, study)
        params.append(self._tokens({"StudyDate": normalise_date(parsed.study_date),
                                    "ReferringPhysicianName": referring_norm}))
        if with_series:
            values, tokens = self._series_values(item, None)
            params += self._binds.row(_series, _SERIES_COLUMNS[1:], values)
            params.append(tokens)
        sql = self._binds.sql["study+series" if with_series else "study"]
        made = self._run(sql, params).fetchone()
        return int(made[0]), None if made[1] is None else int(made[1])

    def _new_series(self, item: Pending, study_pk: int) -> int:
        """A new series of a study already in the index: its row, its tokens and the
        study's series count in one statement; the study's modalities after it when
        the series brings a new one."""
        values, tokens = self._series_values(item, study_pk)
        params = [*self._binds.row(_series, _SERIES_COLUMNS, values), tokens, study_pk]
        made = self._run(self._binds.sql["series"], params).fetchone()
        if made is None:
            raise RuntimeError("the study of a new series cannot be read")
        series_pk, current = int(made[0]), str(made[1] or "")
        modalities = set(filter(None, current.split("\\")))
        modality = item.parsed.modality
        if modality and modality not in modalities:
            self._run(_SET_MODALITIES, ("\\".join(sorted(modalities | {modality})),
                                        study_pk))
        return series_pk

    def flush(self) -> None:
        """Every instance row of the batch and the series and study counters, in one
        statement (a multi-row INSERT and two UPDATE … FROM VALUES as CTEs)."""
        rows, self._instance_rows = self._instance_rows, []
        try:
            if not rows:
                return
            width = len(_INSTANCE_COLUMNS)
            one = "(" + ", ".join(["%s"] * width) + ")"
            params: list[Any] = [value for row in rows for value in row]
            counters = []
            for table, counts in (("series", self.series), ("studies", self.studies)):
                pairs = sorted(counts.items())
                values = ", ".join(["(%s::integer, %s::integer)"] * len(pairs))
                counters.append(
                    f"UPDATE {table} AS t SET num_instances = t.num_instances + v.n FROM "
                    f"(VALUES {values}) AS v(pk, n) WHERE t.pk = v.pk")
                params += [x for pair in pairs for x in pair]
            sql = (f"WITH i AS (INSERT INTO instances ({', '.join(_INSTANCE_COLUMNS)}) "
                   f"VALUES {', '.join([one] * len(rows))}), c AS ({counters[0]}) "
                   f"{counters[1]}")
            self._run(sql, params)
        finally:
            self.series, self.studies = Counter(), Counter()
            if self._cursor is not None:
                self._cursor.close()
                self._cursor = None

