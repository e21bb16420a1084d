"""Issue 14 item 5: the erasure admin page (real application and HTTPS listener in-process).

Two signed-in administrators (each with their second factor): one asks, the other
confirms; the asker cannot confirm; other roles get 403; during retention a legal reason is
required; after the erasure DICOMweb finds nothing and WADO answers 404 for the patient,
while another patient stays readable. The solo path: the setting, a single administrator,
the patient ID typed again.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pacsvault.storage.erasure import ErasureRequest
from tests.helpers import events, new_vault
from tests.test_erasure import make, store, trail_lines
from tests.web_helpers import FakeClock, csrf_of, local_web

PASSWORD = "radio-du-matin-sur-la-plage"
REASON = "Demande écrite du patient du 3 mars, pas d’obligation de conserver"


def _form(html: str, form_id: str) -> dict[str, str]:
    block = html.split(f'id="{form_id}"', 1)[1].split("</form>", 1)[0]
    return dict(re.findall(r'<input type="hidden" name="([a-z_]+)" value="([^"]*)"', block))


@pytest.mark.slow
def test_two_administrators_ask_and_confirm(tmp_path: Path) -> None:
    vault = new_vault(tmp_path / "v")
    gone, kept = make("PVWEB1", name="Durand^Alice"), make("PVWEB2", name="Petit^Louis")
    young = make("PVWEB3", study_date="20240601")
    with local_web(vault, FakeClock()) as web:
        store(web.vault, gone, kept, young)
        for name, roles in (("chief", ["admin"]), ("second", ["admin"]),
                            ("drmartin", ["physician"])):
            web.accounts.add_user(name, roles, PASSWORD)
        chief, second, doctor = web.browser(), web.browser(), web.browser()
        try:
            web.sign_in(chief, "chief", PASSWORD)
            web.sign_in(second, "second", PASSWORD)
            web.sign_in(doctor, "drmartin", PASSWORD)

            # other roles: refused, page and actions
            assert doctor.get("/admin/erasure").status_code == 403
            res = doctor.post("/admin/erasure/request", data={
                "csrf": csrf_of(doctor.get("/account").text), "patient_id": "PVWEB1",
                "reason": REASON, "basis": "retention-ended"})
            assert res.status_code == 403

            # the list of expired patients, for an administrator only
            page = chief.get("/admin/erasure")
            assert page.status_code == 200 and 'aria-current="page"' in page.text
            assert "PVWEB1" in page.text and "PVWEB2" in page.text
            assert "PVWEB3" not in page.text  # retention runs

            # during retention: refused without a legal reason
            page = chief.get("/admin/erasure", params={"patient_id": "PVWEB3"})
            assert 'id="retention-running"' in page.text
            fields = _form(page.text, "request-erasure")
            res = chief.post("/admin/erasure/request", data={
                **fields, "reason": REASON, "basis": "retention-ended"})
            assert res.status_code == 400 and "legal reason" in res.text

            # chief asks for PVWEB1's erasure
            page = chief.get("/admin/erasure", params={"patient_id": "PVWEB1"})
            assert page.status_code == 200 and "Durand^Alice" in page.text
            fields = _form(page.text, "request-erasure")
            res = chief.post("/admin/erasure/request", data={
                **fields, "reason": REASON, "basis": "retention-ended"})
            assert res.status_code == 303, res.text
            page = chief.get(res.headers["location"])
            assert "another administrator must confirm" in page.text
            with web.vault.sessions() as s:
                (request,) = s.query(ErasureRequest).all()
            assert f'id="confirm-{request.id}"' not in page.text  # not for the asker
            # ... even when posted by hand
            res = chief.post("/admin/erasure/confirm", data={
                "csrf": fields["csrf"], "request_id": str(request.id), "confirm": "1"})
            assert res.status_code == 400 and "another administrator" in res.text
            assert list(web.vault.archive.locate(sop_uid=gone.sop))

            # the second administrator confirms
            page = second.get("/admin/erasure")
            form = _form(page.text, f"confirm-{request.id}")
            res = second.post("/admin/erasure/confirm", data={**form})  # box not ticked
            assert res.status_code == 400
            res = second.post("/admin/erasure/confirm", data={**form, "confirm": "1"})
            assert res.status_code == 303, res.text
            page = second.get(res.headers["location"])
            assert "destroyed" in page.text and "PVWEB1" not in page.text

            # DICOMweb: nothing for the erased patient, the other one intact
            found = doctor.get("/dicom-web/studies", params={"PatientID": "PVWEB1"},
                               headers={"accept": "application/dicom+json"})
            assert found.status_code in (200, 204) and "PVWEB1" not in found.text
            wado = doctor.get(
                f"/dicom-web/studies/{gone.study}/series/{gone.series}/instances/{gone.sop}",
                headers={"accept": "multipart/related; type=application/dicom"})
            assert wado.status_code == 404
            other = doctor.get(
                f"/dicom-web/studies/{kept.study}/series/{kept.series}/instances/{kept.sop}",
                headers={"accept": "multipart/related; type=application/dicom"})
            assert other.status_code == 200 and b"Petit^Louis" in other.content
        finally:
            for b in (chief, second, doctor):
                b.close()
    (tomb,) = events(vault, "patient.erased")
    assert tomb["requested_by"] == "chief" and tomb["confirmed_by"] == "second"
    assert tomb["via"] == "web" and tomb["address"] == "127.0.0.1"
    line = next(x for x in trail_lines(vault) if x["action"] == "patient.erased")
    assert "refs" not in line and "PVWEB1" not in str(line) and "Durand" not in str(line)
    listed = events(vault, "patient.retention.listed")
    assert listed and all(r["patient_ids"] == [] for r in listed)


@pytest.mark.slow
def test_solo_practice_erases_with_the_id_typed_again(tmp_path: Path) -> None:
    vault = new_vault(tmp_path / "v")
    vault.set_toml("retention", "solo_practice", "true")
    gone = make("PVWEB4")
    with local_web(vault, FakeClock()) as web:
        store(web.vault, gone)
        web.accounts.add_user("chief", ["admin"], PASSWORD)
        chief = web.browser()
        try:
            web.sign_in(chief, "chief", PASSWORD)
            page = chief.get("/admin/erasure", params={"patient_id": "PVWEB4"})
            assert 'id="solo-erasure"' in page.text
            fields = _form(page.text, "solo-erasure")
            res = chief.post("/admin/erasure/solo", data={
                **fields, "reason": REASON, "basis": "retention-ended",
                "typed_again": "PVWEB5"})
            assert res.status_code == 400 and list(web.vault.archive.locate(sop_uid=gone.sop))
            res = chief.post("/admin/erasure/solo", data={
                **fields, "reason": REASON, "basis": "retention-ended",
                "typed_again": "PVWEB4"})
            assert res.status_code == 303, res.text
            assert list(web.vault.archive.locate(sop_uid=gone.sop)) == []
            # a second administrator appears: solo is over
            web.accounts.add_user("second", ["admin"], PASSWORD)
            store(web.vault, make("PVWEB6"))
            page = chief.get("/admin/erasure", params={"patient_id": "PVWEB6"})
            assert 'id="solo-erasure"' not in page.text
        finally:
            chief.close()
    (tomb,) = events(vault, "patient.erased")
    assert tomb["mode"] == "solo" and tomb["confirmed_by"] == "chief"


@pytest.mark.slow
def test_expired_patients_asked_together_cancelled_then_confirmed(tmp_path: Path) -> None:
    vault = new_vault(tmp_path / "v")
    old = [make(f"PVWEB{n}") for n in (7, 8)]
    young = make("PVWEB9", study_date="20240601")
    with local_web(vault, FakeClock()) as web:
        store(web.vault, *old, young)
        web.accounts.add_user("chief", ["admin"], PASSWORD)
        web.accounts.add_user("second", ["admin"], PASSWORD)
        chief, second = web.browser(), web.browser()
        try:
            web.sign_in(chief, "chief", PASSWORD)
            web.sign_in(second, "second", PASSWORD)
            for cancel in (True, False):
                page = chief.get("/admin/erasure")
                res = chief.post("/admin/erasure/expired", data={
                    "csrf": csrf_of(page.text), "reason": "Durée de conservation écoulée"})
                assert res.status_code == 303, res.text
                number = res.headers["location"].rsplit("=", 1)[1]
                page = second.get("/admin/erasure")
                assert f'id="confirm-{number}"' in page.text
                if cancel:
                    res = second.post("/admin/erasure/cancel", data={
                        **_form(page.text, f"cancel-{number}")})
                    assert res.status_code == 303
                    assert "cancelled" in second.get(res.headers["location"]).text
                    assert all(list(web.vault.archive.locate(sop_uid=o.sop)) for o in old)
                    continue
                res = second.post("/admin/erasure/confirm", data={
                    **_form(page.text, f"confirm-{number}"), "confirm": "1"})
                assert res.status_code == 303
            assert all(list(web.vault.archive.locate(sop_uid=o.sop)) == [] for o in old)
            assert list(web.vault.archive.locate(sop_uid=young.sop))
        finally:
            chief.close()
            second.close()
    assert len(events(vault, "patient.erased")) == 2
    assert len(events(vault, "patient.erasure.cancelled")) == 1
