"""QIDO-RS default return keys: ``qido.parse`` adds them from tags and VRs looked up once
(``_DEFAULT_TAGS``, issue 17) rather than through ``_put`` keyword by keyword. The
identifier must be the one the generic path builds, at every level and scope, whatever the
request already asked for; and the precomputed path must really be taken."""

from __future__ import annotations

from typing import Any

import pytest
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from pacsvault.index.levels import Level
from pacsvault.web import qido

QUERIES: list[list[tuple[str, str]]] = [
    [],
    [("StudyDate", "20230306-20230312")],
    [("PatientName", "DOE*"), ("includefield", "StudyDescription,00081030")],
    [("ModalitiesInStudy", "CT"), ("ModalitiesInStudy", "MR"), ("limit", "5")],
    [("includefield", "all"), ("SeriesDescription", "")],
    [("RequestAttributesSequence.ScheduledProcedureStepID", "A1")],
    [("includefield", "RequestAttributesSequence.RequestedProcedureID")],
    [("Rows", "512"), ("SOPInstanceUID", "1.2,1.3")],
]
SCOPES: list[tuple[str, dict[str, str]]] = [
    ("STUDY", {}), ("SERIES", {}), ("IMAGE", {}), ("SERIES", {"study": "1.2.3"}),
    ("IMAGE", {"study": "1.2.3"}), ("IMAGE", {"study": "1.2.3", "series": "1.2.3.4"}),
]


def _generic(items: list[tuple[str, str]], level: str, **scope: str) -> Dataset:
    """The identifier as the generic path builds it: ``parse`` without the defaults, then
    each default keyword through ``_put`` (the code before ``_DEFAULT_TAGS``)."""
    saved = qido._DEFAULT_TAGS
    qido._DEFAULT_TAGS = {level_: () for level_ in saved}
    try:
        ds = qido.parse(items, level, **scope).identifier
    finally:
        qido._DEFAULT_TAGS = saved
    given = {Level.STUDY: scope.get("study"), Level.SERIES: scope.get("series")}
    target = Level(level)
    for step in target.path:
        if step is target or (step in given and given[step] is None):
            for keyword in qido.DEFAULTS[step]:
                number = tag_for_keyword(keyword)
                assert number is not None
                qido._put(ds, [Tag(number)], None, overwrite=False)
    return ds


def _shape(ds: Dataset) -> list[tuple[Any, ...]]:
    return [(int(e.tag), e.VR, [_shape(i) for i in e.value] if e.VR == "SQ" else e.value)
            for e in ds]


@pytest.mark.parametrize(("level", "scope"), SCOPES)
@pytest.mark.parametrize("items", QUERIES)
def test_defaults_same_identifier(items: list[tuple[str, str]], level: str,
                                  scope: dict[str, str]) -> None:
    fast = qido.parse(items, level, **scope).identifier
    assert _shape(fast) == _shape(_generic(items, level, **scope))


def test_defaults_taken_without_put(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[object] = []
    original = qido._put

    def spy(*args: Any, **kwargs: Any) -> None:
        calls.append(args[1])
        original(*args, **kwargs)

    monkeypatch.setattr(qido, "_put", spy)
    ds = qido.parse([], "IMAGE").identifier
    assert calls == []  # the precomputed path, not _put per keyword
    assert len(ds) == len({k for step in Level.IMAGE.path for k in qido.DEFAULTS.get(step, ())})


def test_defaults_not_shared_between_requests() -> None:
    first = qido.parse([], "SERIES").identifier
    second = qido.parse([], "SERIES").identifier
    for elem in first:
        assert second[elem.tag] is not elem
    first.RequestAttributesSequence.append(Dataset())
    assert len(second.RequestAttributesSequence) == 0


def _attributes(ds: Dataset) -> list[dict[str, Any]]:
    """Every attribute of every element (not only tag, VR and value), sequences by shape."""
    return [{k: (_shape(Dataset()) if k == "_value" and e.VR == "SQ" else v)
             for k, v in vars(e).items()} for e in ds]


@pytest.mark.parametrize(("level", "scope"), SCOPES)
@pytest.mark.parametrize("items", QUERIES)
def test_default_elements_as_pydicom_builds_them(
        items: list[tuple[str, str]], level: str, scope: dict[str, str]) -> None:
    """The empty default elements, copied from ones built once (``_EMPTY``), carry exactly
    the attributes ``DataElement(tag, vr, None)`` gives, and the same DICOM JSON."""
    fast = qido.parse(items, level, **scope).identifier
    generic = _generic(items, level, **scope)
    assert _attributes(fast) == _attributes(generic)
    assert fast.to_json_dict() == generic.to_json_dict()
    assert [type(e) for e in fast] == [type(e) for e in generic]


def test_default_elements_never_shared() -> None:
    """Each request has its own elements: a change to one identifier (the engine fills
    and reads them) reaches neither the templates nor the next request's."""
    first = qido.parse([], "SERIES").identifier
    templates = {id(e) for e in qido._EMPTY.values()}
    assert not templates & {id(e) for e in first}
    first.StudyDate = "20240101"
    first.Modality = "CT"
    first.RequestAttributesSequence.append(Dataset())
    second = qido.parse([], "SERIES").identifier
    assert not {id(e) for e in first} & {id(e) for e in second}
    assert second.StudyDate is None
    assert second.Modality is None
    assert len(second.RequestAttributesSequence) == 0
    assert all(e.value is None for e in qido._EMPTY.values())
