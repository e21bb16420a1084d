"""Issue 17: C-FIND and QIDO-RS read only the wanted attributes of the stored headers
(``index.header_read``), and answer exactly what reading the whole header answered.

Two layers: the reader against ``json.loads`` on crafted texts (a wanted tag nested in a
sequence, text ``json.dumps`` writes that msgspec refuses, escapes, big numbers), and the
engine on an embedded (SQLCipher) index of real stores: every query of the matching
corpus (``test_matching_backends.QUERIES``) plus queries that return sequences, match on
the header and ask ``includefield=all``, answered with the fast reader and with
``json.loads``, compared answer for answer.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import pytest
from pydicom.dataset import Dataset

from pacsvault.index import header_read
from pacsvault.index.db import open_index
from pacsvault.index.query import QueryEngine
from tests.test_matching_backends import QUERIES, _identifier, _loaded, _returned

_HEADER = {
    "00080005": {"vr": "CS", "Value": ["ISO_IR 192"]},
    "00081110": {"vr": "SQ", "Value": [{"00100010": {"vr": "PN", "Value": [
        {"Alphabetic": "NESTED^NOT^ME"}]}}]},
    "00091001": {"vr": "LO", "Value": ["private \"quoted\" \\ back\\slash"]},
    "00100010": {"vr": "PN", "Value": [{"Alphabetic": "Yamada^Tarou",
                                        "Ideographic": "山田^太郎"}]},
    "00100020": {"vr": "LO", "Value": ["P1"]},
    "00101030": {"vr": "DS", "Value": [12345678901234567890123]},
    "00181050": {"vr": "DS", "Value": [0.1, -0.0, 1.5e-320]},
    "00280030": {"vr": "DS"},
    "7FE00010": {"vr": "OW", "BulkDataURI": "x"},
}


def _subset(text: str, tags: list[str]) -> dict[str, Any]:
    full: dict[str, Any] = json.loads(text)
    return {t: full[t] for t in tags if t in full}


@pytest.mark.parametrize("tags", [
    ["00100010"], ["00100010", "00100020", "00080005"], ["00081110", "00100010"],
    ["00101030", "00181050", "00280030", "7FE00010"], ["00091001"], ["FFFFFFFF"], [],
])
def test_reader_gives_json_loads_subset(tags: list[str]) -> None:
    for text in (json.dumps(_HEADER), json.dumps(_HEADER, ensure_ascii=False),
                 json.dumps(_HEADER, separators=(",", ":"), sort_keys=True)):
        got = header_read.reader(tags)(text)
        assert got == _subset(text, tags)
        assert list(got) == sorted(got)  # key order does not matter to answers, but stable


def test_reader_falls_back_on_what_msgspec_refuses() -> None:
    # json.dumps writes NaN/Infinity; a lone surrogate escape is valid for the stdlib.
    odd = dict(_HEADER)
    odd["00181051"] = {"vr": "FD", "Value": [float("nan"), float("inf")]}
    odd["00081030"] = {"vr": "LO", "Value": ["\ud800"]}
    text = json.dumps(odd)
    for tags in (["00100010", "00181051"], ["00081030"], ["00100020"]):
        got = header_read.reader(tags)(text)
        want = _subset(text, tags)
        assert json.dumps(got, sort_keys=True) == json.dumps(want, sort_keys=True)


def test_reader_of_empty_and_everything() -> None:
    assert header_read.reader(["00100010"])(None) == {}
    assert header_read.reader(["00100010"])("") == {}
    text = json.dumps(_HEADER)
    assert header_read.reader(None)(text) == _HEADER


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[QueryEngine]:
    root = tmp_path_factory.mktemp("header-read")
    lite = open_index(root / "index.db", os.urandom(32), create=True)
    try:
        yield _loaded(lite, root / "objects")
    finally:
        lite.dispose()


def _both(engine: QueryEngine, run: Any) -> tuple[list[str], list[str]]:
    """``run(engine)``'s answers with the fast reader, then with ``json.loads``."""
    def dumped() -> list[str]:
        return [json.dumps(a, sort_keys=True, ensure_ascii=False) for a in run(engine)]

    fast = dumped()
    header_read.ENABLED = False
    try:
        slow = dumped()
    finally:
        header_read.ENABLED = True
    return fast, slow


@pytest.mark.parametrize(("root", "level", "keys"), QUERIES)
def test_matching_corpus_answers_unchanged(engine: QueryEngine, root: str, level: str,
                                           keys: dict[str, str]) -> None:
    ident = _identifier(level, keys, _returned(level))
    fast, slow = _both(engine, lambda e: e.find_json(level, ident, root=root,
                                                     for_dimse=True))
    assert fast == slow


def _with(level: str, **values: Any) -> Dataset:
    ds = _identifier(level, {}, _returned(level))
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


@pytest.mark.parametrize("ident", [
    # attributes without an index column: returned from, and matched on, the header
    _with("STUDY", SpecificCharacterSet="ISO_IR 100", StudyID="", PatientSex="",
          StudyDescription="", ReferringPhysicianName="", SeriesDescription=""),
    _with("IMAGE", SOPClassUID="", ContentDate="", SeriesDescription="CT*"),
    _with("SERIES", SeriesNumber="", SeriesDescription="*series 1"),
    _with("STUDY", RequestedProcedureID="", ReferencedStudySequence=[]),
], ids=["study-extra-keys", "image-header-match", "series-header-match", "sequence"])
def test_header_keys_and_matches_unchanged(engine: QueryEngine, ident: Dataset) -> None:
    level = str(ident.QueryRetrieveLevel)
    fast, slow = _both(engine, lambda e: e.find_json(level, ident, for_dimse=True))
    assert fast == slow
    assert fast  # the corpus answers each of them


@pytest.mark.parametrize("level", ["STUDY", "SERIES", "IMAGE"])
def test_pages_with_include_all_unchanged(engine: QueryEngine, level: str) -> None:
    ident = _identifier(level, {}, _returned(level))
    fast, slow = _both(engine, lambda e: e.page(level, ident, offset=1, limit=5,
                                                include_all=True).answers)
    assert fast == slow
    assert len(fast) == 5
