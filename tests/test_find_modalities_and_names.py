"""Issue 13, defects 4 and 10: C-FIND and QIDO-RS with ModalitiesInStudy at every level, and
person-name matching per component group.

* ModalitiesInStudy (0008,0061) is a study-level key. At SERIES and IMAGE level it matches on
  the parent study's modalities (the same way every other higher-level key in this archive
  filters a lower-level query); it used to answer C000 (an auto-correlated SQL subquery).
* A Japanese name ``Yamada^Tarou=山田^太郎=やまだ^たろう`` (pydicom's chrH31.dcm) is found by a
  pattern on any one of its component groups: ``山田*``, ``Yamada*``, ``やまだ*`` (PS3.4
  C.2.2.2.4), and group by group when the pattern has ``=`` groups itself.

Objects are stored in-process for QIDO-RS, then the real server answers C-FIND (pynetdicom).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import pytest
from pydicom import dcmread
from pydicom.data import get_charset_files, get_testdata_file
from pydicom.dataset import Dataset
from pynetdicom import AE as ClientAE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
)

from pacsvault.index import matching
from pacsvault.web import qido
from tests.harness.backends import Backend
from tests.helpers import AE, Server, VaultDir, start_server

CALLING = "WS"
JAPANESE = "Yamada^Tarou=山田^太郎=やまだ^たろう"


@dataclass
class Env:
    vault: VaultDir
    server: Server
    ct_study: str
    mr_study: str
    jp_study: str


def _japanese_file() -> Path:
    path = Path(get_charset_files("chrH31.dcm")[0])
    assert str(dcmread(path).PatientName) == JAPANESE
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, backend: Backend) -> Iterator[Env]:
    """Once per index backend (issue 16): embedded, then sealed PostgreSQL."""
    vault = backend.make_vault(tmp_path_factory.mktemp("find-mod-names") / "vault")
    vault.add_node(CALLING, "--roles", "store,query")
    files = [Path(cast(str, get_testdata_file(n))) for n in ("CT_small.dcm", "MR_small.dcm")]
    files.append(_japanese_file())
    opened = vault.open()
    try:
        for f in files:
            opened.archive.store(f.read_bytes())
    finally:
        opened.close()
    ct, mr, jp = (str(dcmread(f, stop_before_pixels=True).StudyInstanceUID) for f in files)
    server = start_server(vault)
    try:
        yield Env(vault, server, ct, mr, jp)
    finally:
        server.stop()


def cfind(server: Server, identifier: Dataset) -> tuple[int, list[Dataset]]:
    """(final status, answers) of one C-FIND in the Study Root model."""
    ae = ClientAE(ae_title=CALLING)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", server.port, ae_title=AE)
    assert assoc.is_established
    answers: list[Dataset] = []
    final = -1
    try:
        for status, ds in assoc.send_c_find(
                identifier, StudyRootQueryRetrieveInformationModelFind):
            if status is None:
                break
            if status.Status in (0xFF00, 0xFF01):
                assert ds is not None
                answers.append(ds)
            else:
                final = int(status.Status)
    finally:
        assoc.release()
    return final, answers


def qido_search(env: Env, level: str, params: list[tuple[str, str]],
                study: str | None = None) -> list[dict[str, object]]:
    opened = env.vault.open()
    try:
        query = qido.parse(params, level, study=study) if study else qido.parse(
            params, level)
        return list(qido.search(opened, query, "https://localhost/dicom-web").answers)
    finally:
        opened.close()


def _identifier(level: str, **keys: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    ds.StudyInstanceUID = ""
    if level in ("SERIES", "IMAGE"):
        ds.SeriesInstanceUID = ""
    if level == "IMAGE":
        ds.SOPInstanceUID = ""
    for k, v in keys.items():
        setattr(ds, k, v)
    return ds


# --- defect 4: ModalitiesInStudy at every level ------------------------------------------


@pytest.mark.parametrize("level", ["STUDY", "SERIES", "IMAGE"])
def test_cfind_modalities_in_study_at_every_level(env: Env, level: str) -> None:
    status, answers = cfind(env.server, _identifier(level, ModalitiesInStudy="CT"))
    assert status == 0x0000
    assert answers
    assert {str(a.StudyInstanceUID) for a in answers} == {env.ct_study}
    status, answers = cfind(env.server, _identifier(level, ModalitiesInStudy="CT\\MR"))
    assert status == 0x0000
    assert {str(a.StudyInstanceUID) for a in answers} == {env.ct_study, env.mr_study}
    status, answers = cfind(env.server, _identifier(level, ModalitiesInStudy="XA"))
    assert (status, answers) == (0x0000, [])


@pytest.mark.parametrize("level", ["STUDY", "SERIES", "IMAGE"])
def test_qido_modalities_in_study_at_every_level(env: Env, level: str) -> None:
    answers = qido_search(env, level, [("ModalitiesInStudy", "MR")])
    assert answers
    assert {a["0020000D"]["Value"][0] for a in answers} == {env.mr_study}  # type: ignore[index]


# --- defect 10: person names per component group -----------------------------------------


NAME_QUERIES = {
    "山田*": True, "Yamada*": True, "yamada^tar*": True, "やまだ*": True,
    "*太郎": True, "山田^太郎": True, "Yamada^Tarou": True, "Yamada*=山田*": True,
    "山田*=Yamada*": False, "田*": False, "Tarou*": False,
}


def test_cfind_names_match_each_component_group(env: Env) -> None:
    for pattern, found in NAME_QUERIES.items():
        ident = _identifier("STUDY", PatientName=pattern, SpecificCharacterSet="ISO_IR 192")
        status, answers = cfind(env.server, ident)
        assert status == 0x0000, pattern
        got = {str(a.StudyInstanceUID) for a in answers}
        assert got == ({env.jp_study} if found else set()), pattern


def test_qido_names_match_each_component_group(env: Env) -> None:
    for pattern, found in NAME_QUERIES.items():
        answers = qido_search(env, "STUDY", [("PatientName", pattern)])
        got = {a["0020000D"]["Value"][0] for a in answers}  # type: ignore[index]
        assert got == ({env.jp_study} if found else set()), pattern


def test_in_memory_matching_uses_the_same_groups() -> None:
    """Person names outside the index columns are matched on stored JSON, in memory."""
    for pattern, found in NAME_QUERIES.items():
        assert matching.parse("pn", pattern).matches(JAPANESE) is found, pattern
    assert matching.parse("pn", "Yamada^Tarou\\Other^Name").matches(JAPANESE)
    assert matching.parse("pn", "=山田*").matches(JAPANESE)
    assert not matching.parse("pn", "山田*").matches("Yamada^Tarou")
