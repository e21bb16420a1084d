"""Issue 15, item 2: one query-records layer.

* ``Level`` is the one encoding of the hierarchy (names, unique keys, parents, which
  header attributes belong to a level).
* ``QueryEngine.instances`` returns in one query what retrieval needs (SOP class, transfer
  syntax, frames, patient), so C-MOVE/C-GET, WADO-RS and export stop re-querying.
* QIDO-RS pages come from the engine (``QueryEngine.page``): computed keys below their
  level, ``includefield=all`` and offset/limit, with a number of SQL statements that does
  not grow with the number of answers (the header of each answer is the record the engine
  already read; it was one more query per answer).

In process, no server: a vault made by the CLI, objects stored with ``Archive.store``.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import event

from pacsvault.index.levels import Level
from pacsvault.index.query import QueryEngine, QueryError
from pacsvault.web import qido
from tests.harness.backends import Backend

BASE = "https://localhost/dicom-web"


def test_levels_are_the_hierarchy() -> None:
    assert list(Level) == ["PATIENT", "STUDY", "SERIES", "IMAGE"]
    assert [lvl.rank for lvl in Level] == [0, 1, 2, 3]
    for lvl in Level:
        number = tag_for_keyword(lvl.unique_key)
        assert number is not None and f"{number:08X}" == lvl.unique_tag
        assert lvl.path == (*lvl.parents, lvl)
        assert all(p.above(lvl) for p in lvl.parents) and not lvl.above(lvl)
    assert Level.IMAGE.parents == (Level.PATIENT, Level.STUDY, Level.SERIES)
    assert [lvl.web_name for lvl in Level] == ["patient", "study", "series", "instance"]
    assert Level.of(" series ") is Level.SERIES and Level.of("FRAME") is None
    # which header attributes a level's record answers with (includefield=all)
    assert Level.STUDY.holds(0x00100010) and Level.STUDY.holds(0x00081030)
    assert not Level.STUDY.holds(0x0008103E) and Level.SERIES.holds(0x0008103E)
    assert not Level.SERIES.holds(0x00280010) and Level.IMAGE.holds(0x00280010)
    assert not Level.IMAGE.holds(0x00020010)


def _part10(ds: Dataset) -> bytes:
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _objects(studies: int) -> list[tuple[str, str, bytes]]:
    """``studies`` studies of two series (CT, MR), one instance each."""
    ct_path, mr_path = get_testdata_file("CT_small.dcm"), get_testdata_file("MR_small.dcm")
    assert ct_path is not None and mr_path is not None
    out: list[tuple[str, str, bytes]] = []
    for n in range(studies):
        study = generate_uid()
        for path in (ct_path, mr_path):
            ds = dcmread(path)
            ds.StudyInstanceUID = study
            ds.SeriesInstanceUID = generate_uid()
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.PatientID = f"PVQR{n}"
            out.append((study, str(ds.SOPInstanceUID), _part10(ds)))
    return out


@pytest.fixture(scope="module")
def opened(tmp_path_factory: pytest.TempPathFactory,
           backend: Backend) -> Iterator[tuple[Any, list[Any]]]:
    """Once per index backend (issue 16): embedded, then sealed PostgreSQL."""
    vault = backend.make_vault(Path(tmp_path_factory.mktemp("records")) / "v").open()
    objects = _objects(3)
    try:
        for _study, _sop, raw in objects:
            vault.archive.store(raw)
        vault.archive.settle()
        yield vault, objects
    finally:
        vault.close()


class _Statements:
    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.count = 0

    def __enter__(self) -> _Statements:
        event.listen(self.engine, "before_cursor_execute", self._seen)
        return self

    def __exit__(self, *_exc: object) -> None:
        event.remove(self.engine, "before_cursor_execute", self._seen)

    def _seen(self, *_args: Any) -> None:
        self.count += 1


def test_instances_carry_what_retrieval_needs_in_one_query(opened: Any) -> None:
    vault, objects = opened
    study = objects[0][0]
    identifier = Dataset()
    identifier.StudyInstanceUID = study
    engine = QueryEngine(vault.sessions)
    with _Statements(vault.engine) as seen:
        items = engine.instances("STUDY", identifier)
    assert seen.count == 1
    assert {i.sop_uid for i in items} == {sop for s, sop, _ in objects if s == study}
    for item in items:
        ds = dcmread(io.BytesIO(vault.archive.read(item)))
        assert item.sop_class == ds.SOPClassUID
        assert item.transfer_syntax == ds.file_meta.TransferSyntaxUID
        assert item.frames == 1 and item.patient_id == ds.PatientID
        assert item.meta_json == ""
    (with_header,) = engine.instances("IMAGE", _image(items[0].study_uid, items[0].series_uid,
                                                      items[0].sop_uid), with_header=True)
    assert '"00080018"' in with_header.meta_json
    # archive reads go through the same records (quarantined ones too: export)
    assert list(vault.archive.locate(study_uid=study)) == items
    with pytest.raises(QueryError):
        engine.instances("STUDY", Dataset())
    with pytest.raises(QueryError):
        engine.instances("FRAME", identifier)


def _image(study: str, series: str, sop: str) -> Dataset:
    ds = Dataset()
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, sop
    return ds


def _statements_for(vault: Any, level: str, params: list[tuple[str, str]]) -> tuple[int, Any]:
    query = qido.parse(params, level)
    with _Statements(vault.engine) as seen:
        result = qido.search(vault, query, BASE)
    return seen.count, result


def test_qido_pages_cost_the_same_for_one_or_many_answers(opened: Any) -> None:
    vault, _objects_stored = opened
    one_count, one = _statements_for(vault, "STUDY", [("includefield", "all"), ("limit", "1")])
    all_count, many = _statements_for(vault, "STUDY", [("includefield", "all")])
    assert len(one.answers) == 1 and one.more
    assert len(many.answers) == 3 and not many.more
    assert all_count == one_count, (one_count, all_count)
    for answer in many.answers:
        assert answer["00201206"]["Value"] == [2] and answer["00201208"]["Value"] == [2]
        assert answer["00080061"]["Value"] == ["CT", "MR"]
        assert "00100020" in answer and "0008103E" not in answer  # study-level header only
        assert answer["00081190"]["Value"][0].startswith(f"{BASE}/studies/")
    # offset: the window moves, and only returned answers are disclosed
    rest = qido.search(vault, qido.parse([("offset", "1")], "STUDY"), BASE)
    assert len(rest.answers) == 2 and len(rest.accessed.study_uids) == 2


def test_qido_study_keys_below_the_study_level_come_from_the_engine(opened: Any) -> None:
    vault, _objects_stored = opened
    result = qido.search(vault, qido.parse([("ModalitiesInStudy", "MR"),
                                            ("includefield", "SOPClassesInStudy")],
                                           "SERIES"), BASE)
    assert len(result.answers) == 6  # every series of a study that has an MR series
    for answer in result.answers:
        assert answer["00080061"]["Value"] == ["CT", "MR"]
        assert answer["00201208"]["Value"] == [2] and answer["00201209"]["Value"] == [1]
        assert len(answer["00080062"]["Value"]) == 2
    none = qido.search(vault, qido.parse([("ModalitiesInStudy", "US")], "IMAGE"), BASE)
    assert none.answers == []
