"""Issue 11, defect 3 in a real Chromium: after a modality sent an object whose PatientName
is encoded with VR US (refused at the door), and with a header indexed before that check
(the same mismatch written into the index, as an old vault holds it), OHIF's study list
still loads and lists the good studies: no "Data Source Connection Error" for anyone.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from sqlalchemy import select, update

from tests.browser import ErrorLog, chromium, first_sign_in, new_page, shot
from tests.helpers import AE as ARCHIVE_AE
from tests.helpers import Server, make_vault, start_server
from tests.web_helpers import write_secret

pytestmark = [pytest.mark.browser, pytest.mark.slow]

DOCTOR, DOCTOR_PASSWORD = "drbonnet", "falaise rouge et phare blanc 2031"
MODALITY = "MODALITY"


def _dataset(name: str, description: str) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = "PV-" + ds.SOPInstanceUID[-8:]
    ds.PatientName = name
    ds.StudyDate = "20260301"
    ds.StudyDescription = description
    ds.Modality = "CT"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def _send(server: Server, datasets: list[Dataset]) -> list[int]:
    ae = AE(ae_title=MODALITY)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", server.port, ae_title=ARCHIVE_AE)
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, str]]:
    root = tmp_path_factory.mktemp("bad-object")
    vault = make_vault(root)
    vault.add_node(MODALITY)
    secret = write_secret(root / "doctor.pw", DOCTOR_PASSWORD + "\n")
    vault.cli("user", "add", DOCTOR, "--role", "physician", "--password-file", secret)
    server = start_server(vault)
    try:
        good = _dataset("Bonnet^Claire", "GENOU DROIT")
        old = _dataset("Ancien^Objet", "OBJET ANCIEN")
        bad = _dataset("Bad^Object", "BAD OBJECT")
        del bad.PatientName
        bad.add(DataElement(0x00100010, "US", [513, 8195]))
        assert _send(server, [good, old, bad]) == [0x0000, 0x0000, 0xC000]
        # The header of "old" as a vault filled before the check holds it.
        v = vault.open()
        try:
            from pacsvault.index.models import Instance, Patient, Series, Study

            with v.sessions.begin() as session:
                for model, column, uid in (
                        (Study, Study.study_uid, old.StudyInstanceUID),
                        (Series, Series.series_uid, old.SeriesInstanceUID),
                        (Instance, Instance.sop_uid, old.SOPInstanceUID)):
                    meta = json.loads(session.scalar(select(model.meta_json).where(
                        column == uid)) or "{}")
                    meta["00100010"] = {"vr": "US", "Value": [513, 8195]}
                    session.execute(update(model).where(column == uid)
                                    .values(meta_json=json.dumps(meta)))
                session.execute(update(Patient).where(Patient.patient_id == old.PatientID)
                                .values(meta_json=json.dumps({})))
        finally:
            v.close()
        yield server, f"https://localhost:{server.https_port}"
    finally:
        server.stop()


def test_study_list_still_loads_after_a_bad_object(site: tuple[Server, str]) -> None:
    _server, base = site
    errors = ErrorLog()
    with chromium() as browser:
        page: Any = new_page(browser, errors=errors)
        first_sign_in(page, base, DOCTOR, DOCTOR_PASSWORD)
        if page.url.rstrip("/") != base:
            page.goto(base + "/")
        page.get_by_text("Bonnet").first.wait_for()
        page.get_by_text("OBJET ANCIEN").first.wait_for()
        shot(page, "study-list-after-bad-object")
        assert page.get_by_text("Connection Error").count() == 0
        assert page.get_by_text("BAD OBJECT").count() == 0
    assert errors.entries == [], "\n".join(errors.entries)
