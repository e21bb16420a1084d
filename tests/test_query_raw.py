"""Issue 17: the embedded index's study search compiled once per query shape and run on
the SQLite driver (``index.query_raw``) answers exactly what the SQLAlchemy path answers.

On an embedded (SQLCipher) index of real stores (``test_matching_backends``' corpus), every
study-level query of the matching corpus plus more shapes (person-name lists and groups,
wildcards with LIKE's own characters, value lists, open and midnight-crossing ranges,
malformed dates, keys matched on the stored header, lower-level keys that are no filter):

- the SQL text and its parameters are the ones SQLAlchemy compiles for the query itself;
- the answers, in their order, with the raw path on and off (C-FIND's ``find_json`` and
  QIDO-RS pages at every offset, with and without ``includefield=all``);
- the raw path is taken for each of them (a test fails if it silently is not), and never
  for the series and image levels;
- a search interrupted by its time budget stops with ``QueryBudgetExceeded``;
- the compiled shapes hold no queried value.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import pytest
from pydicom.dataset import Dataset
from sqlalchemy import Engine

from pacsvault.index import query as query_module
from pacsvault.index import query_raw
from pacsvault.index.answer_rows import study_answers
from pacsvault.index.db import open_index
from pacsvault.index.levels import Level
from pacsvault.index.query import QueryBudgetExceeded, QueryEngine
from pacsvault.index.query_filter import build_filter
from tests.test_matching_backends import QUERIES, ROOT, _identifier, _loaded, _returned

EXTRA: list[dict[str, str]] = [
    {"PatientName": "DOE*\\SMITH"},
    {"PatientName": "DOE^JOHN\\"},
    {"PatientName": "*=*=やまだ*\\doe^jane"},
    {"PatientName": "yamada^*=山田^太郎"},
    {"PatientName": "=*=やまだ^たろう"},
    {"PatientName": "1?0%_*"},
    {"PatientName": "D%E*"},
    {"ReferringPhysicianName": "HOUSE^G*=*"},
    {"ReferringPhysicianName": "wilson^james\\house*"},
    {"StudyDescription": "CT\\*HEAD"},
    {"StudyDescription": "CT?HEAD"},
    {"StudyDescription": "CT_HEAD"},
    {"StudyDescription": "*%*"},
    {"StudyDescription": "CT\\*HEAD"},
    {"AccessionNumber": "ACC001\\ACC003\\X-12"},
    {"ModalitiesInStudy": "CT\\MR"},
    {"ModalitiesInStudy": "M?"},
    {"StudyTime": "2359-0001"},
    {"StudyTime": "1200-1200"},
    {"StudyTime": "-"},
    {"StudyTime": "1015"},
    {"StudyTime": "25"},
    {"StudyDate": "20240101-20240101"},
    {"StudyDate": "garbage"},
    {"StudyDate": "2024*"},
    {"PatientBirthDate": "19800101"},
    {"IssuerOfPatientID": "ISS"},
    {"StudyID": "S1*"},
    {"StudyID": "S1\\S2"},
    {"StudyInstanceUID": f"{ROOT}.1"},
    {"StudyInstanceUID": f"{ROOT}.1\\{ROOT}.2"},
    {"PatientSex": "M", "StudyDate": "20240101-", "ModalitiesInStudy": "CT",
     "PatientName": "*O*"},
    {"SeriesDescription": "CT*", "Modality": "CT", "SOPInstanceUID": f"{ROOT}.1.1.1"},
    {"SpecificCharacterSet": "ISO_IR 100", "InstitutionName": "", "StudyDescription": "*"},
]
STUDY_QUERIES = [keys for _root, level, keys in QUERIES if level == "STUDY"] + EXTRA
SHAPE_IDS = ["-".join(f"{k}={v}" for k, v in q.items()) or "all" for q in STUDY_QUERIES]


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[QueryEngine, Engine]]:
    root = tmp_path_factory.mktemp("query-raw")
    lite = open_index(root / "index.db", os.urandom(32), create=True)
    try:
        yield _loaded(lite, root / "objects"), lite
    finally:
        lite.dispose()


@pytest.fixture
def taken(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many searches went through the raw path."""
    count = [0]
    real = query_raw.study_rows

    def counted(*args: Any) -> Iterator[tuple[Any, ...]]:
        count[0] += 1
        return real(*args)

    monkeypatch.setattr(query_raw, "study_rows", counted)
    return count


def _ident(keys: dict[str, str]) -> Dataset:
    return _identifier("STUDY", keys, _returned("STUDY"))


def _both(run: Any) -> tuple[Any, Any]:
    fast = run()
    query_raw.ENABLED = False
    try:
        slow = run()
    finally:
        query_raw.ENABLED = True
    return fast, slow


def _dumped(answers: Any) -> list[str]:
    return [json.dumps(a, sort_keys=True, ensure_ascii=False) for a in answers]


@pytest.mark.parametrize("keys", STUDY_QUERIES, ids=SHAPE_IDS)
def test_same_sql_and_parameters_as_sqlalchemy_compiles(loaded: Any,
                                                       keys: dict[str, str]) -> None:
    _engine, lite = loaded
    dialect = lite.dialect
    filt = build_filter(Level.STUDY, _ident(keys))
    compiled = study_answers().where(*filt.sql).compile(
        dialect=dialect, compile_kwargs={"render_postcompile": True})
    bound = compiled.construct_params(filt.params)
    expected = (str(compiled), tuple(bound[n] for n in compiled.positiontup or ()))
    terms = build_filter(Level.STUDY, _ident(keys), clauses=False).terms
    assert terms == filt.terms
    found = query_raw.prepared(terms, dialect)
    assert found is not None  # every study-level shape of the corpus is stood in for
    prepared, values = found
    assert (prepared.sql, query_raw.arguments(prepared, values)) == expected


@pytest.mark.parametrize("keys", STUDY_QUERIES, ids=SHAPE_IDS)
def test_same_answers_in_the_same_order(loaded: Any, taken: list[int],
                                        keys: dict[str, str]) -> None:
    engine, _lite = loaded
    ident = _ident(keys)
    fast, slow = _both(lambda: _dumped(engine.find_json("STUDY", ident, for_dimse=True)))
    assert taken[0] == 1  # the raw path answered the first, not the second
    assert fast == slow


def test_the_corpus_answers_through_the_raw_path(loaded: Any, taken: list[int]) -> None:
    engine, _lite = loaded
    answered = [len(list(engine.find_json("STUDY", _ident(keys)))) for keys in STUDY_QUERIES]
    assert taken[0] == len(STUDY_QUERIES)
    assert sum(1 for n in answered if n) > len(STUDY_QUERIES) * 2 // 3  # most match


@pytest.mark.parametrize("level", ["SERIES", "IMAGE"])
def test_other_levels_keep_sqlalchemy(loaded: Any, taken: list[int], level: str) -> None:
    engine, _lite = loaded
    assert list(engine.find_json(level, _identifier(level, {}, _returned(level))))
    assert taken[0] == 0


@pytest.mark.parametrize("keys", [{}, {"PatientName": "DOE*"}, {"StudyDate": "20240101-"},
                                  {"ModalitiesInStudy": "CT\\MR"}],
                         ids=["all", "name", "date", "modalities"])
@pytest.mark.parametrize("include_all", [False, True])
def test_pages_at_every_offset(loaded: Any, taken: list[int], keys: dict[str, str],
                               include_all: bool) -> None:
    engine, _lite = loaded
    ident = _ident(keys)
    total = len(list(engine.find_json("STUDY", ident)))
    assert total >= 2
    for limit in (1, 3):
        for offset in range(total + 2):
            def run(offset: int = offset, limit: int = limit) -> tuple[list[str], bool]:
                page = engine.page("STUDY", ident, offset=offset, limit=limit,
                                   include_all=include_all)
                return _dumped(page.answers), page.more
            fast, slow = _both(run)
            assert fast == slow
    assert taken[0] > 2 * (total + 2)


def test_a_search_past_its_budget_is_interrupted(loaded: Any, taken: list[int],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The budget's progress handler interrupts the raw statement inside SQLite: the
    driver's own error becomes ``QueryBudgetExceeded``, as through SQLAlchemy."""
    engine, _lite = loaded
    budgeted = QueryEngine(engine._sessions, "PVTEST", time_budget=30.0)
    monkeypatch.setattr(query_module, "_PROGRESS_STEPS", 1)
    looks = [0]

    def exceeded(self: Any) -> bool:
        looks[0] += 1
        return looks[0] > 1  # the look before the statement passes, the first inside not

    monkeypatch.setattr(query_module._Budget, "exceeded", exceeded)
    for enabled in (True, False):
        looks[0] = 0
        query_raw.ENABLED = enabled
        try:
            with pytest.raises(QueryBudgetExceeded):
                list(budgeted.find_json("STUDY", _ident({"PatientName": "*O*"})))
        finally:
            query_raw.ENABLED = True
    assert taken[0] == 1


def test_compiled_shapes_hold_no_queried_value(loaded: Any) -> None:
    engine, _lite = loaded
    for keys in STUDY_QUERIES:
        list(engine.find_json("STUDY", _ident(keys)))
    kept = query_raw._prepare.cache_info()
    assert kept.currsize > 10
    one = query_raw.prepared(build_filter(Level.STUDY, _ident({"PatientName": "MARTIN*"}),
                                          clauses=False).terms, _lite.dialect)
    two = query_raw.prepared(build_filter(Level.STUDY, _ident({"PatientName": "DURAND*"}),
                                          clauses=False).terms, _lite.dialect)
    assert one is not None and two is not None
    assert one[0] is two[0]  # one compiled search for the shape
    text = repr(one[0])
    for value in ("MARTIN", "DURAND", "DOE", "ACC0", "2024", "HOUSE", ROOT):
        assert value not in text


def test_keywords_read_as_pydicom_reads_them() -> None:
    """``query_filter.keyword_of`` (cached per tag) is ``DataElement.keyword``: standard,
    retired, repeating-group, private and unknown tags."""
    from pydicom._dicom_dict import DicomDictionary
    from pydicom.dataelem import DataElement

    from pacsvault.index.query_filter import keyword_of

    tags = [*sorted(DicomDictionary)[::7], 0x60000010, 0x60020010, 0x50000005, 0x00091001,
            0x00090010, 0x00110011, 0x7FE00010, 0x00080005, 0xFFFEE000, 0x00000000,
            0x12345678]
    for tag in tags:
        assert keyword_of(tag) == DataElement(tag, "UN", None).keyword, hex(tag)
