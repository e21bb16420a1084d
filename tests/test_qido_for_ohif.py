"""QIDO-RS answers that OHIF's study list can read: one unreadable attribute fails the
whole list in the doctor's browser, so these shapes are kept by a fast test."""

from __future__ import annotations

from pathlib import Path
from typing import cast

from pydicom import dcmread
from pydicom.data import get_testdata_file

from pacsvault.web import qido
from tests.harness.backends import Backend


def test_study_without_modality_has_no_empty_modalities_in_study(tmp_path: Path,
                                                                 backend: Backend) -> None:
    vault_dir = backend.new_vault(tmp_path / "v")  # both index backends (issue 16)
    ds = dcmread(cast(str, get_testdata_file("CT_small.dcm")))
    del ds.Modality
    source = tmp_path / "no-modality.dcm"
    ds.save_as(source, enforce_file_format=True)
    vault = vault_dir.open()
    try:
        vault.archive.store(source.read_bytes())
        query = qido.parse([("includefield", "00081030,00080060")], "STUDY")
        result = qido.search(vault, query, "https://localhost/dicom-web")
    finally:
        vault.close()
    assert len(result.answers) == 1
    answer = result.answers[0]
    # Either absent or with a value: never {"vr": "CS"} alone (OHIF reads .Value.length).
    assert "Value" in answer.get("00080061", {"Value": ["absent"]})
    assert answer["0020000D"]["Value"] == [str(ds.StudyInstanceUID)]
