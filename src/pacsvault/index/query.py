"""Hierarchical queries over the encrypted index: C-FIND, QIDO-RS and retrieval.

Attributes with an index column are matched in SQL; any other attribute with a value is
matched on the stored DICOM JSON of the record (the first instance received at that level),
still without opening a single image. Answers take their values from that JSON, so every
requested return key is filled with what the modality sent.

One engine for every reader (issue 15): C-FIND streams ``find``/``find_json``; QIDO-RS
asks ``page`` (offset, limit, "more results", ``includefield=all``); the computed keys
(``index.computed``) and ``ModalitiesInStudy`` matching at every level are answered here
for both. C-MOVE/C-GET and WADO-RS select with ``instances`` and the archive (export,
drills) with ``stored``: each returns ``StoredInstance`` records holding what retrieval
needs (``index.records``), so nobody re-queries ``Instance``. The hierarchy is
``index.levels.Level``.

Two guards from issue 11: a stored value is answered only in a shape valid for its
dictionary VR (``vr_check.normalised``: headers indexed before VRs were checked at the door
heal here), and a query has a time budget (``time_budget``, the engine's own time, not the
time a slow peer takes to read answers): past it, the SQL statement is interrupted or the
scan stops, and ``QueryBudgetExceeded`` is raised (C-FIND A700, QIDO-RS 413).
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from sqlalchemy import (
    ARRAY,
    Connection,
    Engine,
    Integer,
    Select,
    any_,
    bindparam,
    text,
)
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from pacsvault.dicomfile import vr_check
from pacsvault.dicomfile.dicomjson import json_to_dataset as json_to_dataset  # re-exported
from pacsvault.dicomfile.dicomjson import strip_bulk
from pacsvault.index import (
    computed,
    header_read,
    matching,
    query_raw,
    records,
    residual,
    sealing,
)
from pacsvault.index.answer_rows import (
    StudyRow,
    level_select,
    study_answers,
    study_record,
    undecrypted,
)
from pacsvault.index.headers import (
    answer_charset,
    fits_latin1,
    meta_matches,
    sequence_answer,
    sequence_conditions,
    text_of,
)
from pacsvault.index.levels import Level
from pacsvault.index.models import Instance
from pacsvault.index.query_filter import (
    COLUMNS,
    SKIP,
    Filter,
    build_filter,
    keyword_of,
)
from pacsvault.index.query_filter import QueryBudgetExceeded as QueryBudgetExceeded
from pacsvault.index.query_filter import QueryError as QueryError
from pacsvault.index.records import StoredInstance

_PROGRESS_STEPS = 10000  # SQLite VM instructions between two looks at the clock
# Records of a sealed query answered per load (``_find_sealed``): every load is a round
# trip and a statement PostgreSQL plans again; at 64 an unlimited QIDO-RS answer of ~500
# studies took 9 of them (issue 16, ``bench/compare/qido_cost.py``).
_BATCH = 256


class _Budget:
    """The engine's own time for one query: it runs only while the engine works, not while
    the consumer of the answers (a slow peer) holds the generator suspended."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self.spent = 0.0
        self.started = time.monotonic()

    def resume(self) -> None:
        self.started = time.monotonic()

    def pause(self) -> None:
        self.spent += time.monotonic() - self.started

    def exceeded(self) -> bool:
        if self.seconds is None:
            return False
        return self.spent + (time.monotonic() - self.started) > self.seconds

    def check(self) -> None:
        if self.exceeded():
            raise QueryBudgetExceeded(
                f"the query ran past its {self.seconds:g} s time budget and was stopped; "
                "narrow it")


@dataclass
class Accessed:
    """Patients and studies disclosed by a query (bounded: a trail record stays small)."""

    limit: int = 1000
    patient_ids: set[str] = field(default_factory=set)
    study_uids: set[str] = field(default_factory=set)
    truncated: bool = False
    # Whose each study is, as the answers said: the record's references are grouped per
    # patient from it, without asking the index again (issue 17).
    study_patients: dict[str, str] = field(default_factory=dict)

    def add(self, patient_id: str | None, study_uid: str | None) -> None:
        if len(self.patient_ids) + len(self.study_uids) >= self.limit:
            self.truncated = True
            return
        if patient_id is not None:
            self.patient_ids.add(patient_id)
        if study_uid is not None:
            self.study_uids.add(study_uid)
            if patient_id is not None:
                self.study_patients[study_uid] = patient_id


@dataclass
class Page:
    """One page of answers (QIDO-RS): ``more`` when matches remain past ``limit``."""

    answers: list[dict[str, Any]]
    more: bool


@dataclass
class _Window:
    """Answers skipped (``offset``) and kept (``limit``); set ``more`` on one past it.
    Only kept answers are built and counted as disclosed."""

    skip: int
    room: int
    more: bool = False

    def place(self) -> str:
        """Where the next passing row goes: "skip" (before the offset), "keep", or
        "stop" (one past the limit: ``more`` is set)."""
        if self.skip:
            self.skip -= 1
            return "skip"
        if not self.room:
            self.more = True
            return "stop"
        self.room -= 1
        return "keep"


def _level(level: Level | str, error: str) -> Level:
    found = level if isinstance(level, Level) else Level.of(level)
    if found is None:
        raise QueryError(error)
    return found


class QueryEngine:
    def __init__(self, sessions: sessionmaker[Session], ae_title: str = "", *,
                 time_budget: float | None = None) -> None:
        self._sessions = sessions
        self._ae_title = ae_title
        self._time_budget = time_budget

    # --- C-FIND / QIDO --------------------------------------------------------------

    def find(
        self, level: Level | str, identifier: Dataset, *, root: str = "STUDY",
        accessed: Accessed | None = None,
    ) -> Iterator[Dataset]:
        """Yield one answer per matching record, streaming from the database.

        ``accessed`` collects which patients and studies the answers disclosed, for the
        audit trail ("who saw this patient's data" includes who listed it).
        """
        for answer in self.find_json(level, identifier, root=root, accessed=accessed,
                                     for_dimse=True):
            yield json_to_dataset(answer)

    def find_json(
        self, level: Level | str, identifier: Dataset, *, root: str = "STUDY",
        accessed: Accessed | None = None, for_dimse: bool = False,
        include_all: bool = False,
    ) -> Iterator[dict[str, Any]]:
        """``find``'s answers as DICOM JSON (no pydicom dataset is built: QIDO-RS emits
        them as they are). ``for_dimse`` adds QueryRetrieveLevel and RetrieveAETitle;
        ``include_all`` every attribute of the record's stored header that belongs to its
        level or above (``Level.holds``), bulk data left out."""
        return self._find(level, identifier, root=root, accessed=accessed,
                          for_dimse=for_dimse, include_all=include_all, window=None)

    def page(
        self, level: Level | str, identifier: Dataset, *, offset: int = 0, limit: int,
        accessed: Accessed | None = None, include_all: bool = False,
    ) -> Page:
        """Answers ``offset`` to ``offset + limit`` (Study Root), with whether more match.
        Only the returned answers are built and counted in ``accessed``."""
        window = _Window(offset, limit)
        found = self._find(level, identifier, root="STUDY", accessed=accessed,
                           for_dimse=False, include_all=include_all, window=window)
        try:
            answers = list(found)
        finally:
            found.close()
        return Page(answers, window.more)

    def _find(
        self, level_name: Level | str, identifier: Dataset, *, root: str,
        accessed: Accessed | None, for_dimse: bool, include_all: bool,
        window: _Window | None,
    ) -> Generator[dict[str, Any], None, None]:
        level = Level.of(level_name) if isinstance(level_name, str) else None
        if level is None or (root == "STUDY" and level is Level.PATIENT):
            raise QueryError("unsupported query level for this information model")
        budget = _Budget(self._time_budget)
        charset = answer_charset(identifier)
        plan = _plan(identifier)
        with contextlib.ExitStack() as stack:
            conn, session = self._reading(stack, level)
            dialect = conn.dialect
            sealer = sealing.sealer_of(dialect)
            # The embedded index's study search: compiled once per shape, run on the
            # driver (``query_raw``); its clauses are then never built here.
            fast = (query_raw.ENABLED and sealer is None and level is Level.STUDY
                    and dialect.name == "sqlite")
            filt = self._filter(level, identifier, sealer, clauses=not fast)
            found = query_raw.prepared(filt.terms, dialect) if fast else None
            if fast and found is None:  # a shape it does not stand in for
                filt = self._filter(level, identifier, sealer)
            read = _reader(plan, filt, include_all)
            budget.check()
            sqlite = conn.dialect.name == "sqlite"
            raw: Any = conn.connection.driver_connection
            # The driver's own error: the raw study search (``query_raw``) interrupted by
            # the budget's progress handler raises it unwrapped.
            driver_error: type[Exception] = conn.dialect.loaded_dbapi.OperationalError
            if sqlite:  # a long SQL step (a LIKE over many rows) is interrupted inside SQLite
                raw.set_progress_handler(lambda: 1 if budget.exceeded() else 0,
                                         _PROGRESS_STEPS)
            elif budget.seconds is not None:  # PostgreSQL: the server cancels it
                conn.execute(text("SELECT set_config('statement_timeout', :ms, true)"),
                             {"ms": str(max(1, int(budget.seconds * 1000)))})
            rows: Iterable[Any] = ()
            try:
                if sealer is not None:
                    yield from self._find_sealed(session(), level, filt, budget, window,
                                                 accessed, plan, charset, for_dimse,
                                                 include_all, read)
                    return
                study = level is Level.STUDY
                if found is not None:
                    rows = query_raw.study_rows(raw, *found)
                else:
                    # A study answer reads plain columns, not ORM entities
                    # (``STUDY_ANSWER``, as the sealed path does; issue 17: ~10 us less
                    # per answered study).
                    run: Any = (study_answers() if study else self._select(level)).where(
                        *filt.sql)
                    rows = session().execute(run, filt.params).yield_per(256)
                for row in rows:
                    record, study_uid, patient_id = study_record(row) if study else row
                    budget.check()
                    meta = read(record.meta_json)
                    if not all(meta_matches(meta.get(tag), cond) for tag, cond in filt.meta):
                        continue
                    place = window.place() if window is not None else "keep"
                    if place == "skip":
                        continue
                    if place == "stop":
                        break
                    if accessed is not None:
                        accessed.add(patient_id, study_uid)
                    answer = self._answer(session, level, record, meta, plan, charset,
                                          for_dimse, include_all)
                    budget.pause()
                    yield answer
                    budget.resume()
            except (OperationalError, driver_error) as exc:
                if getattr(getattr(exc, "orig", None), "sqlstate", None) == "57014":
                    # PostgreSQL's statement_timeout
                    budget.spent = float("inf")
                if budget.exceeded():
                    budget.check()
                raise
            finally:
                if isinstance(rows, Generator):  # the raw search's cursor, now
                    rows.close()
                if sqlite:
                    raw.set_progress_handler(None, 0)

    def _reading(self, stack: contextlib.ExitStack, level: Level,
                 ) -> tuple[Connection, Callable[[], Session]]:
        """The connection a search reads on, and its ORM session on demand. The embedded
        index's study search (``query_raw``) reads on a plain pooled connection and opens
        a session on it only if an answer needs entities (``SOPClassesInStudy``) or the
        shape falls back to Core: a session opened and closed per search cost ~75 us of a
        study list's CPU (issue 17). Elsewhere, a session as before."""
        bind = self._sessions.kw.get("bind")
        if (query_raw.ENABLED and level is Level.STUDY and isinstance(bind, Engine)
                and bind.dialect.name == "sqlite" and sealing.sealer_of(bind.dialect) is None):
            conn = stack.enter_context(bind.connect())
            opened: list[Session] = []

            def on_demand() -> Session:
                if not opened:
                    opened.append(stack.enter_context(self._sessions(bind=conn)))
                return opened[0]
            return conn, on_demand
        session = stack.enter_context(self._sessions())
        return session.connection(), lambda: session

    def _find_sealed(
        self, session: Session, level: Level, filt: Filter, budget: _Budget,
        window: _Window | None, accessed: Accessed | None, plan: _Plan,
        charset: str | None, for_dimse: bool, include_all: bool, read: header_read.Reader,
    ) -> Generator[dict[str, Any], None, None]:
        """``_find`` on a sealed index (``index.residual``), in two steps so that only
        what matching needs is decrypted for every candidate: (1) the candidates' keys
        and the columns of the residual conditions (the stored header only when a
        condition reads it), matched here, the window counted on what passes, as the
        embedded path does; (2) the records of what passed, loaded by key in batches
        and answered in the same order. Ordered by key: PostgreSQL gives no stable order
        otherwise, and QIDO-RS pages (offset, limit) must not overlap."""
        batch: list[tuple[int, dict[str, Any] | None]] = []
        for pk, meta in residual.passing(session, self._select(level), level, filt.sql,
                                         filt.residual, filt.modalities, filt.meta,
                                         filt.prefilters, budget.check):
            place = window.place() if window is not None else "keep"
            if place == "skip":
                continue
            if place == "stop":
                break
            batch.append((pk, meta))
            if len(batch) >= _BATCH:
                yield from self._answer_batch(session, level, batch, budget, accessed,
                                              plan, charset, for_dimse, include_all, read)
                batch = []
        yield from self._answer_batch(session, level, batch, budget, accessed, plan,
                                      charset, for_dimse, include_all, read)

    def _answer_batch(
        self, session: Session, level: Level, batch: list[tuple[int, dict[str, Any] | None]],
        budget: _Budget, accessed: Accessed | None, plan: _Plan, charset: str | None,
        for_dimse: bool, include_all: bool, read: header_read.Reader,
    ) -> Generator[dict[str, Any], None, None]:
        if not batch:
            return
        entity = residual.ENTITIES[level]
        # One array parameter, not one bind parameter per key (``IN``): the statement's
        # text is the same for every batch, so neither the driver nor PostgreSQL parses
        # and plans a new one each time (issue 16).
        keys = entity.pk == any_(bindparam("pv_batch", [pk for pk, _ in batch],
                                           type_=ARRAY(Integer)))
        found: dict[int, Any]
        if level is Level.STUDY:
            found = {int(r[0]): r for r in session.execute(
                study_answers().where(keys))}
        else:
            found = {int(r[0].pk): r for r in session.execute(
                self._select(level).where(keys).options(*undecrypted(entity)))}
        for pk, meta in batch:
            budget.check()
            if pk not in found:  # removed between the two steps
                continue
            if level is Level.STUDY:
                record, study_uid, patient_id = study_record(found[pk])
            else:
                record, study_uid, patient_id = found[pk]
            if accessed is not None:
                accessed.add(patient_id, study_uid)
            if meta is None:
                meta = read(record.meta_json)
            answer = self._answer(lambda: session, level, record, meta, plan, charset,
                                  for_dimse, include_all)
            budget.pause()
            yield answer
            budget.resume()

    def _select(self, level: Level) -> Select[Any, Any, Any]:
        """The level's records, with the study UID and patient ID they belong to
        (``level_select``)."""
        return level_select(level)

    def _filter(self, level: Level, identifier: Dataset,
                sealer: sealing.Sealer | None = None, *, clauses: bool = True) -> Filter:
        return build_filter(level, identifier, sealer, clauses=clauses)

    # --- C-MOVE / C-GET / WADO-RS selection --------------------------------------------

    def instances(self, level_name: Level | str, identifier: Dataset, *,
                  with_header: bool = False) -> list[StoredInstance]:
        """The instances a retrieve request names by its unique keys, in one query, with
        what sending them needs (``StoredInstance``); ``with_header`` adds each stored
        header (WADO-RS metadata).

        The unique key of the requested level must be given, as a value or a list, never a
        wildcard or empty: "retrieve everything" is how an exposed archive is harvested.
        """
        level = _level(level_name, "unsupported retrieve level")
        unique = level.unique_key
        # quarantine: kept, never retrieved
        stmt = records.select_instances(with_header=with_header).where(
            Instance.quarantined.is_(None))
        for step in level.path:
            keyword = step.unique_key
            raw = text_of(identifier[keyword]) if keyword in identifier else ""
            cond = matching.parse("uid", raw)  # exact values and lists only
            if keyword == unique and (cond.is_universal or "*" in raw or "?" in raw):
                raise QueryError(f"{unique} must name what to retrieve")
            if not cond.is_universal:
                stmt = stmt.where(cond.clause(COLUMNS[keyword].column))
        return records.load(self._sessions, stmt)

    def stored(self, *, study_uid: str | None = None, patient_id: str | None = None,
               sop_uid: str | None = None) -> list[StoredInstance]:
        """The archive's own selection (``Archive.locate``): see ``records.locate``."""
        return records.locate(self._sessions, study_uid=study_uid, patient_id=patient_id,
                              sop_uid=sop_uid)

    # --- answers ----------------------------------------------------------------------

    def _answer(
        self, session: Callable[[], Session], level: Level, record: Any, meta: dict[str, Any],
        plan: _Plan, charset: str | None, for_dimse: bool, include_all: bool,
    ) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for tag, keyword, vr, sequence in plan.keys:
            value = None if _hidden(level, keyword) else meta.get(tag)
            if value is not None:  # never a value in a shape its VR does not allow
                value = vr_check.normalised(tag, value)
            if value is None:
                out[tag] = {"vr": vr}
            elif sequence is not None:
                out[tag] = sequence_answer(value, sequence, sequence_conditions(sequence))
            else:
                out[tag] = strip_bulk(value)
        if charset == "ISO_IR 100" and not fits_latin1(out):
            charset = "ISO_IR 192"
        if charset:
            out["00080005"] = {"vr": "CS", "Value": [charset]}
        if for_dimse:
            out["00080052"] = {"vr": "CS", "Value": [level.value]}
            out["00080054"] = {"vr": "AE", "Value": [self._ae_title]}
        if plan.availability:
            out["00080056"] = {"vr": "CS", "Value": ["ONLINE"]}
        for tag, keyword, vr in plan.computed:
            value = _computed(session, keyword, record, level)
            if isinstance(value, list):
                out[tag] = {"vr": vr, "Value": value} if value else {"vr": vr}
            elif value is None:
                out[tag] = {"vr": vr}
            else:
                out[tag] = {"vr": vr, "Value": [value]}
        if include_all:
            _include_all(out, meta, level)
        return out


def _reader(plan: _Plan, filt: Filter, include_all: bool) -> header_read.Reader:
    """What of the stored headers this query reads: its return keys and the keys it
    matches on the header (``filt.meta``), or everything for ``includefield=all``."""
    if include_all:
        return header_read.reader(None)
    return header_read.reader([t for t, _kw, _vr, _sq in plan.keys]
                              + [t for t, _cond in filt.meta])


@functools.cache
def _hidden(level: Level, keyword: str) -> bool:
    """A return key of a lower level than the query's: answered empty. Cached: asked for
    every key of every answer, and ``Level.rank`` is a tuple search."""
    col = COLUMNS.get(keyword)
    return col is not None and level.above(col.level)


def _computed(session: Callable[[], Session], keyword: str, record: Any,
              level: Level) -> Any:
    """``computed.value``, with the study row's own keys answered without an entity (and
    without an ORM session: ``session()`` opens one on first use)."""
    if isinstance(record, StudyRow):
        if keyword == "NumberOfStudyRelatedSeries":
            return record.num_series
        if keyword == "NumberOfStudyRelatedInstances":
            return record.num_instances
        if keyword == "ModalitiesInStudy":
            return [m for m in record.modalities.split("\\") if m]
        record = record.entity()
    return computed.value(session(), keyword, record, level)


def _include_all(out: dict[str, Any], meta: dict[str, Any], level: Level) -> None:
    """Every attribute of the record's stored header that belongs to its level or above,
    where the answer has no value yet; bulk data left out."""
    for tag_hex, entry in meta.items():
        if not level.holds(int(tag_hex, 16)):
            continue
        current = out.get(tag_hex)
        if current is not None and ("Value" in current or "BulkDataURI" in current):
            continue
        stripped = strip_bulk(vr_check.normalised(tag_hex, entry), keep_empty=False)
        if stripped is not None:
            out[tag_hex] = stripped


@dataclass(frozen=True)
class _Plan:
    """What each answer to one identifier holds, worked out once per query."""

    keys: list[tuple[str, str, str, DataElement | None]]  # tag, keyword, VR, sequence key
    computed: list[tuple[str, str, str]]  # tag, keyword, VR
    availability: bool


def _plan(identifier: Dataset) -> _Plan:
    keys: list[tuple[str, str, str, DataElement | None]] = []
    computed_keys: list[tuple[str, str, str]] = []
    for elem in identifier:
        keyword = keyword_of(elem.tag)
        if keyword in SKIP or elem.tag.group == 0x0002:
            continue
        tag = f"{elem.tag:08X}"
        if keyword in computed.COMPUTED:
            computed_keys.append((tag, keyword, str(elem.VR)))
            continue
        keys.append((tag, keyword, str(elem.VR), elem if elem.VR == "SQ" else None))
    return _Plan(keys, computed_keys, "InstanceAvailability" in identifier)
