"""Issue 6: every kind of action listed in point 1 produces the expected events.

One scenario drives the real listeners (dcmtk over DICOM, dicomweb-client over HTTPS, a
browser signing in with password + TOTP, the CLI), then reads the trail and checks the
actions recorded with their actor (AE or user), address and event code; then the auditor's
web page lists them for an auditor and answers 403 to a physician.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread

from tests import corpus
from tests.helpers import AE, dcmtk, dcmtk_env, events, make_vault, start_server, storescu
from tests.web_helpers import client, csrf_of, sign_in, write_secret

pytestmark = pytest.mark.slow

LOCAL = "127.0.0.1"
MODALITY, QR = "MODALITY", "QRNODE"
PHYS, PHYS_PW = "drmartin", "quiet-harbour-lantern-47-violet-orchard"
AUD, AUD_PW = "mmeaudit", "copper-meadow-falcon-93-silent-river"


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, env=dcmtk_env(), timeout=60)


def _new(seen: int, vault: object) -> list[dict[str, object]]:
    return [e for e in events(vault)[seen:]  # type: ignore[arg-type]
            if not str(e["action"]).startswith("alert.")]


def test_every_action_is_recorded(tmp_path: Path) -> None:
    vault = make_vault(tmp_path / "v")
    files = corpus.build(tmp_path / "corpus")[:2]
    vault.add_node(MODALITY)
    vault.add_node(QR, "--roles", "store,query,retrieve")
    for user, pw, role in ((PHYS, PHYS_PW, "physician"), (AUD, AUD_PW, "auditor")):
        vault.cli("user", "add", user, "--role", role, "--password-file",
                  write_secret(tmp_path / f"{user}.pw", pw))
    steps: dict[str, list[dict[str, object]]] = {}
    seen = len(events(vault))
    server = start_server(vault)
    try:
        def step(name: str) -> None:
            nonlocal seen
            found = _new(seen, vault)
            seen += len(found) + sum(1 for e in events(vault)[seen:]
                                     if str(e["action"]).startswith("alert."))
            steps[name] = found

        step("start")
        res = storescu(server.port, [f.path for f in files], calling=MODALITY)
        assert res.returncode == 0, res.stderr
        step("store")
        res = _run([dcmtk("echoscu"), "-aet", "NOTREG", "-aec", AE, LOCAL, str(server.port)])
        assert res.returncode != 0
        step("rejected")
        out = tmp_path / "find"
        out.mkdir()
        res = _run([dcmtk("findscu"), "-S", "-aet", QR, "-aec", AE, "-X", "-od", str(out),
                    "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID",
                    "-k", f"PatientID={files[0].patient_id}", LOCAL, str(server.port)])
        assert res.returncode == 0, res.stderr
        step("find")
        got = tmp_path / "get"
        got.mkdir()
        res = _run([dcmtk("getscu"), "-S", "-aet", QR, "-aec", AE, "-od", str(got),
                    "-k", "QueryRetrieveLevel=STUDY",
                    "-k", f"StudyInstanceUID={files[0].study_uid}", LOCAL, str(server.port)])
        assert res.returncode == 0, res.stderr
        assert list(got.iterdir())
        step("get")
        vault.cli("export", "--study", files[0].study_uid, "--out", tmp_path / "export")
        step("export")

        v = vault.open()
        try:
            token = v.accounts.create_token(PHYS, "1d").token
        finally:
            v.close()
        step("token")
        session = requests.Session()
        session.trust_env = False
        session.verify = str(vault.data / "tls" / "ca.crt")
        session.headers["Authorization"] = f"Bearer {token}"
        dw = DICOMwebClient(f"https://{LOCAL}:{server.https_port}/dicom-web", session=session)
        assert dw.search_for_studies(search_filters={"StudyInstanceUID": files[1].study_uid})
        step("search")
        assert dw.retrieve_instance(files[1].study_uid, *_series_sop(files[1].path))
        step("retrieve")
        extra = corpus.synthetic_ct_series(tmp_path / "ct", 1)
        dw.store_instances([dcmread(extra[0])])
        step("stow")
        session.close()

        ca = vault.data / "tls" / "ca.crt"
        with client(server.https_port, ca) as browser:
            form = browser.get("/login")
            bad = browser.post("/login", data={"csrf": csrf_of(form.text), "name": PHYS,
                                               "password": "not-the-password-at-all"})
            assert bad.status_code == 401
        step("login_failed")
        auditor = client(server.https_port, ca)
        sign_in(auditor, AUD, AUD_PW)
        step("login")
        vault.cli("node", "add", "LATER", "--host", LOCAL)
        step("node_add")
        vault.cli("user", "add", "newbie", "--role", "physician", "--password-file",
                  write_secret(tmp_path / "newbie.pw", "lantern-violet-harbour-orchard-12"))
        step("user_add")
        vault.cli("audit", "verify")
        step("verify")

        page = auditor.get("/audit")
        assert page.status_code == 200
        for action in ("dicom.association.rejected", "dicom.find", "export", "auth.login",
                       "audit.verify"):
            assert f"<td>{action}</td>" in page.text, action
        found: Any = auditor.post("/audit", data={"csrf": csrf_of(page.text),
                                             "patient": files[0].patient_id})
        assert found.status_code == 200
        assert files[0].patient_id not in str(found.url)
        assert "<td>dicom.find</td>" in found.text and "<td>export</td>" in found.text
        assert "<td>dicomweb.search</td>" not in found.text
        auditor.close()
        step("audit_page")
        with client(server.https_port, ca) as phys:
            sign_in_result = sign_in(phys, PHYS, PHYS_PW)
            assert sign_in_result.recovery_codes
            assert phys.get("/audit").status_code == 403
        step("phys")
    finally:
        server.stop()
    for name, found in steps.items():
        print(name, [(e["action"], e["outcome"], e["code"], e["ae"], e["user"], e["address"])
                     for e in found])
    _check(steps)


def _series_sop(path: Path) -> tuple[str, str]:
    ds = dcmread(path, stop_before_pixels=True)
    return str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)


S, MINOR = "success", "minor_failure"
# (action, outcome, event code, AE, user, address) per step, exactly (alert.* ignored).
EXPECTED: dict[str, list[tuple[str, ...]]] = {
    "start": [("application.start", S, "110100", "", "", "")],
    # one record per committed batch (here one image each: storescu sends in turn), then
    # the association's summary (issue 11, defect 8)
    "store": [("dicom.association.accepted", S, "110114", MODALITY, "", LOCAL),
              *[("dicom.store.committed", S, "110107", MODALITY, "", LOCAL)] * 2,
              ("dicom.store.association", S, "110104", MODALITY, "", LOCAL)],
    "rejected": [("dicom.association.rejected", MINOR, "110113", "NOTREG", "", LOCAL)],
    "find": [("dicom.association.accepted", S, "110114", QR, "", LOCAL),
             ("dicom.find", S, "110112", QR, "", LOCAL)],
    "get": [("dicom.association.accepted", S, "110114", QR, "", LOCAL),
            ("dicom.get.begin", S, "110102", QR, "", LOCAL),
            ("dicom.get", S, "110104", QR, "", LOCAL)],
    "export": [("export", S, "110106", "", "local-admin", "")],
    "token": [("token.create", S, "110113", "", PHYS, "")],
    # the token's first use from an address is recorded too (issue 19, token policy)
    "search": [("dicomweb.search", S, "110112", "", PHYS, LOCAL),
               ("token.new-address", S, "110113", "", PHYS, LOCAL)],
    "retrieve": [("dicomweb.retrieve", S, "110103", "", PHYS, LOCAL)],
    "stow": [("dicomweb.store.committed", S, "110107", "", PHYS, LOCAL),
             ("dicomweb.store", S, "110107", "", PHYS, LOCAL)],
    "login_failed": [("auth.login.failed", MINOR, "110114", "", PHYS, LOCAL)],
    "login": [("auth.login", S, "110114", "", AUD, LOCAL),
              ("auth.second_factor.enrolled", S, "110114", "", AUD, LOCAL)],
    "node_add": [("node.add", S, "110113", "", "local-admin", "")],
    # (the "user" column here is the event's detail "user", the account made; the actor
    # is local-admin)
    "user_add": [("user.add", S, "110113", "", "newbie", "")],
    "verify": [("audit.verify", S, "110100", "", "local-admin", "")],
    "audit_page": [("audit.show", S, "110112", "", AUD, LOCAL)],
    "phys": [("auth.login", S, "110114", "", PHYS, LOCAL),
             ("auth.second_factor.enrolled", S, "110114", "", PHYS, LOCAL)],
}


def _check(steps: dict[str, list[dict[str, object]]]) -> None:
    assert set(steps) == set(EXPECTED)
    for name, found in steps.items():
        got = sorted(tuple(str(e[k]) for k in ("action", "outcome", "code", "ae", "user",
                                                  "address")) for e in found)
        assert got == sorted(EXPECTED[name]), (name, got)
