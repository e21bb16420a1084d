"""Issue 16, part 1: matching on a sealed PostgreSQL index gives the embedded index's
answers.

One corpus (tricky names: several component groups, case, wildcards anywhere; dates across
years; times across midnight; UID lists; ModalitiesInStudy; birth-date ranges) is stored
through the real ``Archive.store`` into an embedded (SQLite) index and into a PostgreSQL
index whose patient columns are encrypted (``index.sealing``) and matched through blind
tokens and residual checks (``index.blind``, ``index.residual``). The same queries then go
through the same ``QueryEngine`` on both, and the answers must be identical; QIDO-style
pages (offset, limit) must cover the same answers. The PostgreSQL database's raw rows must
not show the corpus's names, IDs or dates.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian
from sqlalchemy import Engine, column, create_engine, event, func, select
from sqlalchemy.engine import make_url
from sqlalchemy.orm import sessionmaker

from pacsvault.crypto.keyring import Keyring
from pacsvault.crypto.keys import MasterKey
from pacsvault.index import blind, matching, residual, sealing
from pacsvault.index.db import open_index
from pacsvault.index.keyrows import DataKeyRows
from pacsvault.index.models import (
    Base,
    Instance,
    Patient,
    Series,
    Study,
    patient_tokens,
    series_tokens,
    study_tokens,
)
from pacsvault.index.query import QueryBudgetExceeded, QueryEngine
from pacsvault.storage.archive import Archive
from pacsvault.storage.objects import ObjectStore
from tests.harness.postgres import PostgresServer, create_database, drop_database

pytestmark = pytest.mark.postgres

CT = "1.2.840.10008.5.1.4.1.1.2"
ROOT = "1.2.826.0.1.3680043.8.498.16"

# (patient id, issuer, name, birth date)
PATIENTS = [
    ("P1", "", "Yamada^Tarou=山田^太郎=やまだ^たろう", "19700115"),
    ("P2", "", "DOE^JOHN", "19801231"),
    ("P3", "", "doe^jane", "19800101"),
    ("P4", "", "Müller^Jürgen", "20000229"),
    ("P5", "", "O'BRIEN^MARY^ANN", ""),
    ("P6", "", "DOEBLER^ANNA", "19991231"),
    ("P7", "ISS", "Do^X", "19650601"),
    ("P8", "", "SMITH", "19501010"),
]
# (patient index, date, time, accession, description, referring, [(modality, date, time)])
STUDIES = [
    (0, "20231215", "235900", "ACC001", "CT HEAD", "HOUSE^GREGORY", [("CT", "20231215", "2359")]),
    (0, "20240101", "000100", "ACC002", "ct head", "house^g", [("CT", "20240101", ""),
                                                              ("SR", "20240102", "0900")]),
    (1, "20240115", "120000", "ACC003", "MR KNEE", "", [("MR", "20240115", "120000")]),
    (1, "20240229", "0830", "X-12", "MR KNEE L", "WILSON^JAMES", [("MR", "", ""),
                                                                 ("PT", "20240229", "0831")]),
    (2, "20241231", "", "ACC005", "", "Wilson^James", [("CT", "20241231", "")]),
    (3, "20250101", "101500.5", "ACC006", "US ABDOMEN", "", [("US", "20250101", "1015")]),
    (4, "", "", "", "", "", [("CR", "", "")]),
    (5, "20230601", "060000", "ACC008", "CT CHEST", "HOUSE^GREGORY", [("CT", "20230601", "0600"),
                                                                       ("CT", "20230601", "0610")]),
    (6, "20220310", "2300", "ACC009", "XA", "", [("XA", "20220310", "2300")]),
    (7, "20240615", "1200", "ACC010", "CT HEAD", "", [("CT", "20240615", "1200")]),
    (7, "20190520", "0000", "ACC011", "OLD", "", [("MR", "20190520", "0000")]),
    (2, "20240116", "1300", "ACC012", "CT*HEAD", "", [("CT", "20240116", "1300")]),
]


def _datasets() -> list[Dataset]:
    out: list[Dataset] = []
    for s, (p, date, time, acc, desc, ref, series) in enumerate(STUDIES):
        pid, issuer, name, birth = PATIENTS[p]
        for r, (modality, sdate, stime) in enumerate(series):
            for i in range(2):
                ds = Dataset()
                ds.file_meta = FileMetaDataset()
                ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
                ds.file_meta.MediaStorageSOPClassUID = UID(CT)
                sop = f"{ROOT}.{s + 1}.{r + 1}.{i + 1}"
                ds.file_meta.MediaStorageSOPInstanceUID = UID(sop)
                ds.SOPClassUID, ds.SOPInstanceUID = CT, sop
                ds.StudyInstanceUID = f"{ROOT}.{s + 1}"
                ds.SeriesInstanceUID = f"{ROOT}.{s + 1}.{r + 1}"
                ds.PatientID, ds.PatientName, ds.PatientBirthDate = pid, name, birth
                if issuer:
                    ds.IssuerOfPatientID = issuer
                ds.PatientSex = "F" if p % 2 else "M"
                ds.SpecificCharacterSet = "ISO_IR 192"
                ds.StudyDate, ds.StudyTime, ds.AccessionNumber = date, time, acc
                ds.StudyDescription, ds.ReferringPhysicianName = desc, ref
                ds.StudyID = f"S{s}"
                ds.Modality, ds.SeriesDate, ds.SeriesTime = modality, sdate, stime
                ds.SeriesNumber, ds.InstanceNumber = r + 1, i + 1
                ds.SeriesDescription = f"{modality} series {r}"
                ds.ContentDate, ds.ContentTime = sdate, stime
                out.append(ds)
    return out


def _part10(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _loaded(engine: Engine, objects: Path) -> QueryEngine:
    Base.metadata.create_all(engine)
    sessions = sessionmaker(engine, expire_on_commit=False)
    store = ObjectStore(objects)
    store.create()
    archive = Archive(sessions, store, Keyring(os.urandom(32), DataKeyRows()))
    for ds in _datasets():
        archive.store(_part10(ds))
    archive.settle()
    return QueryEngine(sessions, "PVTEST")


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory, postgres_server: PostgresServer,
            ) -> Iterator[tuple[QueryEngine, QueryEngine, Engine]]:
    """The corpus in the embedded index (SQLCipher, as a vault opens it) and in a fresh
    database of the harness's PostgreSQL (TLS verify-full), sealed."""
    root = tmp_path_factory.mktemp("backends")
    lite = open_index(root / "index.db", os.urandom(32), create=True)
    db = create_database(postgres_server)
    url = make_url(db.url).set(drivername="postgresql+psycopg")
    pg = create_engine(url, connect_args={"password": postgres_server.password()})
    sealing.attach(pg, sealing.sealer_for(MasterKey.generate(), "vault-match"))
    try:
        yield _loaded(lite, root / "lite"), _loaded(pg, root / "pg"), pg
    finally:
        pg.dispose()
        lite.dispose()
        drop_database(db)


def _identifier(level: str, keys: dict[str, str], returned: tuple[str, ...]) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword in returned:
        setattr(ds, keyword, "")
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


_STUDY_KEYS = ("StudyInstanceUID", "PatientName", "PatientID", "StudyDate", "StudyTime",
               "AccessionNumber", "ModalitiesInStudy", "NumberOfStudyRelatedInstances")
_SERIES_KEYS = ("SeriesInstanceUID", "Modality", "SeriesDate", "SeriesTime",
                "StudyInstanceUID")
_IMAGE_KEYS = ("SOPInstanceUID", "ContentDate", "ContentTime", "InstanceNumber")
_PATIENT_KEYS = ("PatientID", "PatientName", "PatientBirthDate",
                 "NumberOfPatientRelatedStudies")

S = "STUDY"
QUERIES: list[tuple[str, str, dict[str, str]]] = [
    (S, "STUDY", {}),
    (S, "STUDY", {"PatientName": "DOE^JOHN"}),
    (S, "STUDY", {"PatientName": "doe^john"}),
    (S, "STUDY", {"PatientName": "DOE*"}),
    (S, "STUDY", {"PatientName": "do*"}),
    (S, "STUDY", {"PatientName": "D?E*"}),
    (S, "STUDY", {"PatientName": "*JOHN"}),
    (S, "STUDY", {"PatientName": "*^J*"}),
    (S, "STUDY", {"PatientName": "DOE^J?HN"}),
    (S, "STUDY", {"PatientName": "山田*"}),
    (S, "STUDY", {"PatientName": "山田^太郎"}),
    (S, "STUDY", {"PatientName": "yamada^tarou=山田^太郎"}),
    (S, "STUDY", {"PatientName": "=山田*"}),
    (S, "STUDY", {"PatientName": "*=*=やまだ*"}),
    (S, "STUDY", {"PatientName": "MÜLLER*"}),
    (S, "STUDY", {"PatientName": "O'BRIEN^MARY^ANN"}),
    (S, "STUDY", {"PatientName": "DOE"}),
    (S, "STUDY", {"PatientName": "SMITH"}),
    (S, "STUDY", {"PatientName": "D"}),
    (S, "STUDY", {"PatientName": "DOEB*"}),
    (S, "STUDY", {"PatientName": "DOEBLER^ANN?"}),
    (S, "STUDY", {"StudyDate": "20240101"}),
    (S, "STUDY", {"StudyDate": "20240101-20241231"}),
    (S, "STUDY", {"StudyDate": "20231201-20240131"}),
    (S, "STUDY", {"StudyDate": "20240101-"}),
    (S, "STUDY", {"StudyDate": "-20231231"}),
    (S, "STUDY", {"StudyDate": "19000101-20991231"}),
    (S, "STUDY", {"StudyDate": "20241231-20240101"}),
    (S, "STUDY", {"StudyDate": "2024"}),
    (S, "STUDY", {"StudyDate": "20240101\\20240615"}),
    (S, "STUDY", {"StudyTime": "2300-0100"}),
    (S, "STUDY", {"StudyTime": "1200"}),
    (S, "STUDY", {"StudyTime": "-0830"}),
    (S, "STUDY", {"StudyDate": "20240101-20241231", "StudyTime": "1200-"}),
    (S, "STUDY", {"AccessionNumber": "ACC001"}),
    (S, "STUDY", {"AccessionNumber": "ACC*"}),
    (S, "STUDY", {"AccessionNumber": "acc001"}),
    (S, "STUDY", {"StudyDescription": "CT*"}),
    (S, "STUDY", {"StudyDescription": "*HEAD"}),
    (S, "STUDY", {"ReferringPhysicianName": "house*"}),
    (S, "STUDY", {"ReferringPhysicianName": "WILSON^JAMES"}),
    (S, "STUDY", {"StudyInstanceUID": f"{ROOT}.1\\{ROOT}.3\\{ROOT}.99"}),
    (S, "STUDY", {"ModalitiesInStudy": "CT"}),
    (S, "STUDY", {"ModalitiesInStudy": "P*"}),
    (S, "STUDY", {"ModalitiesInStudy": "MR", "PatientName": "DOE*"}),
    (S, "STUDY", {"PatientID": "P1"}),
    (S, "STUDY", {"PatientID": "P*"}),
    (S, "STUDY", {"PatientID": "P7", "IssuerOfPatientID": "ISS"}),
    (S, "STUDY", {"PatientBirthDate": "19800101-19991231"}),
    (S, "STUDY", {"PatientBirthDate": "-19700115"}),
    (S, "STUDY", {"PatientSex": "F", "StudyDate": "2023*"}),
    (S, "STUDY", {"PatientName": "DOE*", "StudyDate": "20240101-20241231"}),
    (S, "SERIES", {"StudyInstanceUID": f"{ROOT}.2"}),
    (S, "SERIES", {"Modality": "CT"}),
    (S, "SERIES", {"Modality": "C*"}),
    (S, "SERIES", {"SeriesDate": "20240101-20240229"}),
    (S, "SERIES", {"SeriesTime": "2300-0100"}),
    (S, "SERIES", {"PatientName": "DOE*", "Modality": "MR"}),
    (S, "SERIES", {"ModalitiesInStudy": "SR"}),
    (S, "IMAGE", {"StudyInstanceUID": f"{ROOT}.4", "SeriesInstanceUID": f"{ROOT}.4.2"}),
    (S, "IMAGE", {"ContentDate": "20240101-20240131", "InstanceNumber": "2"}),
    (S, "IMAGE", {"ContentTime": "0830-1300", "PatientName": "*"}),
    ("PATIENT", "PATIENT", {"PatientName": "DOE*"}),
    ("PATIENT", "PATIENT", {"PatientBirthDate": "19800101-20001231"}),
    ("PATIENT", "PATIENT", {"PatientName": "*a*", "PatientID": "P?"}),
    ("PATIENT", "STUDY", {"PatientID": "P2", "StudyDate": "2024*"}),
]


def _returned(level: str) -> tuple[str, ...]:
    return {"PATIENT": _PATIENT_KEYS, "STUDY": _STUDY_KEYS, "SERIES": _SERIES_KEYS,
            "IMAGE": _IMAGE_KEYS}[level]


def _answers(engine: QueryEngine, root: str, level: str, keys: dict[str, str]) -> list[str]:
    ident = _identifier(level, keys, _returned(level))
    return sorted(json.dumps(a, sort_keys=True, ensure_ascii=False)
                  for a in engine.find_json(level, ident, root=root, for_dimse=True))


@pytest.mark.parametrize(("root", "level", "keys"), QUERIES,
                         ids=[f"{lv}-{'-'.join(f'{k}={v}' for k, v in q.items())}"
                              for _r, lv, q in QUERIES])
def test_same_answers_on_both_backends(engines: Any, root: str, level: str,
                                       keys: dict[str, str]) -> None:
    lite, pg, _ = engines
    expected = _answers(lite, root, level, keys)
    assert _answers(pg, root, level, keys) == expected


def test_the_corpus_matches_something(engines: Any) -> None:
    """The comparison above means something: most queries have answers, some none."""
    lite, _, _ = engines
    sizes = [len(_answers(lite, r, lv, q)) for r, lv, q in QUERIES]
    assert sum(1 for n in sizes if n) >= len(QUERIES) * 3 // 4
    assert 0 in sizes


@pytest.mark.parametrize("keys", [{}, {"StudyDate": "20240101-20241231"},
                                  {"PatientName": "DOE*"}, {"StudyDescription": "CT*"}])
def test_pages_cover_the_same_answers(engines: Any, keys: dict[str, str]) -> None:
    """QIDO-RS paging (offset, limit) counts only rows that pass every condition: the
    pages of both backends hold the same answers, with the same "more" flags."""
    lite, pg, _ = engines
    ident = _identifier("STUDY", keys, _STUDY_KEYS)
    lite_pages: list[Any] = []
    pg_pages: list[Any] = []
    for engine, sink in ((lite, lite_pages), (pg, pg_pages)):
        offset = 0
        while True:
            page = engine.page("STUDY", ident, offset=offset, limit=3)
            sink.append(page)
            offset += 3
            if not page.more:
                break
    assert [(len(p.answers), p.more) for p in pg_pages] == \
        [(len(p.answers), p.more) for p in lite_pages]

    def flat(pages: list[Any]) -> list[str]:
        return sorted(json.dumps(a, sort_keys=True) for p in pages for a in p.answers)

    assert flat(pg_pages) == flat(lite_pages)
    assert len(set(flat(pg_pages))) == len(flat(pg_pages))  # no answer twice


def test_tokens_are_written_and_nothing_readable(engines: Any) -> None:
    _, _, pg = engines
    with pg.connect() as conn:
        counts = {t.name: conn.execute(select(func.count()).select_from(t)).scalar()
                  for t in (patient_tokens, study_tokens, series_tokens)}
        assert all(counts.values()), counts
        # as many tokens for every row of a level: their number tells no name length,
        # missing component group or empty date
        for table, each in ((patient_tokens, blind.NAME_TOKENS + 1),
                            (study_tokens, blind.NAME_TOKENS + 1), (series_tokens, 2)):
            per_row = set(conn.execute(select(func.count()).select_from(table)
                                       .group_by(table.c.row_pk)).scalars())
            assert per_row == {each}, (table.name, per_row)
        dump = b"\x00".join(
            value if isinstance(value, bytes) else str(value).encode()
            for table in (Patient.__table__, Study.__table__, Series.__table__,
                          Instance.__table__, patient_tokens, study_tokens)
            # untyped columns: the bytes as stored, not what the sealed types decrypt
            for row in conn.execute(select(*(column(c.name) for c in table.c))
                                    .select_from(table))
            for value in row)
    for marker in ("DOE", "Yamada", "山田", "19801231", "ACC001", "HOUSE", "20240115"):
        assert marker.encode() not in dump


_COMPARED = re.compile(r"(\w+)\.(\w+) (?:NOT )?(?:LIKE|>=|<=|>|<|!=)", re.IGNORECASE)


def test_no_sql_comparison_on_an_encrypted_column(engines: Any) -> None:
    """A LIKE or a range on a sealed column would compare ciphertexts and answer wrong
    silently: every statement the queries above send is checked; name and date
    conditions go through the token tables instead."""
    _, pg, engine = engines
    statements: list[str] = []

    def seen(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement)

    event.listen(engine, "before_cursor_execute", seen)
    try:
        for root, level, keys in QUERIES:
            _answers(pg, root, level, keys)
    finally:
        event.remove(engine, "before_cursor_execute", seen)
    compared = {m.groups() for s in statements for m in _COMPARED.finditer(s)}
    for table, name in compared:
        kind = Base.metadata.tables[re.sub(r"_\d+$", "", table)].c[name].type  # aliases
        assert not isinstance(kind, (sealing.Sealed, sealing.Fixed)), (table, name)
    joined = "\n".join(statements)
    assert "patient_tokens" in joined and "study_tokens" in joined
    assert "series_tokens" in joined


def test_the_time_budget_holds_on_both(engines: Any) -> None:
    lite, pg, _ = engines
    for engine in (lite, pg):
        slow = QueryEngine(engine._sessions, "PVTEST", time_budget=1e-9)
        with pytest.raises(QueryBudgetExceeded):
            list(slow.find_json("STUDY", _identifier("STUDY", {"PatientName": "*A*"},
                                                      _STUDY_KEYS)))


def test_tokens_rebuilt_from_the_rows_answer_the_same(engines: Any) -> None:
    """``blind.rebuild`` (rows copied in without tokens, a new token key) writes tokens
    that answer exactly as those written at store; on SQLite it does nothing."""
    lite, pg, engine = engines
    before = [_answers(pg, r, lv, q) for r, lv, q in QUERIES[:25]]
    with engine.begin() as conn:
        rows = blind.rebuild(conn)
    assert rows == len(PATIENTS) + len(STUDIES) + sum(len(s[6]) for s in STUDIES)
    assert [_answers(pg, r, lv, q) for r, lv, q in QUERIES[:25]] == before
    with lite._sessions() as session:
        assert blind.rebuild(session.connection()) == 0


def test_modalities_checked_in_pacsvault_match_the_sql_exists(engines: Any) -> None:
    """If Series.modality were ever sealed, ModalitiesInStudy falls back to a check after
    decryption (``residual._modalities_match``): it answers as the SQL EXISTS does,
    hidden (quarantined-only) series excluded the same way."""
    _, pg, _ = engines
    with pg._sessions() as session:
        studies = {str(uid): int(pk) for pk, uid in session.execute(
            select(Study.pk, Study.study_uid))}
        for s, (*_, series) in enumerate(STUDIES):
            pk = studies[f"{ROOT}.{s + 1}"]
            modalities = {m for m, _d, _t in series}
            for cond_text in ("CT", "M?", "P*", "SR\\US", "X*"):
                cond = matching.parse("str", cond_text)
                expected = any(cond.matches_stored(m) for m in modalities)
                assert residual._modalities_match(session, pk, cond) is expected
