"""A WADO-RS series answered as stored (issue 17): the parts come from ``wado_stream``'s
producer thread, the answer carries its exact Content-Length (no chunk framing) and each
part is the stored object byte for byte, in order."""

from __future__ import annotations

import io
import re
import ssl
from pathlib import Path

import httpx
import pytest
from pydicom import dcmread

from pacsvault.web.multipart import parse_related
from tests import corpus
from tests.helpers import make_vault, start_server

USER, PASSWORD = "drserie", "copper-lantern-91-quiet-meadow-falcon"
MODALITY = "CTSCAN"


@pytest.mark.slow
def test_series_as_stored_has_its_length_and_identical_parts(tmp_path: Path) -> None:
    vault = make_vault(tmp_path / "v")
    files = corpus.synthetic_ct_series(tmp_path / "ct", 6, size=64)
    sent = {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID): f.read_bytes()
            for f in files}
    first = dcmread(files[0], stop_before_pixels=True)
    opened = vault.open()
    try:
        opened.accounts.add_user(USER, ["physician"], PASSWORD)
        token = opened.accounts.create_token(USER, "1d").token
        for data in sent.values():
            opened.archive.store(data, source_ae=MODALITY)
    finally:
        opened.close()
    server = start_server(vault)
    try:
        base = f"https://127.0.0.1:{server.https_port}/dicom-web"
        ca = ssl.create_default_context(cafile=str(vault.data / "tls" / "ca.crt"))
        with httpx.Client(headers={"Authorization": f"Bearer {token}"}, verify=ca,
                          trust_env=False, timeout=60) as client:
            res = client.get(
                f"{base}/studies/{first.StudyInstanceUID}/series/{first.SeriesInstanceUID}",
                headers={"Accept": 'multipart/related; type="application/dicom"'})
    finally:
        server.stop()
    assert res.status_code == 200
    assert res.headers.get("content-length") == str(len(res.content))
    assert "transfer-encoding" not in res.headers
    match = re.search(r"boundary=([^;\s]+)", res.headers["content-type"])
    assert match is not None
    parts = parse_related(res.content, match.group(1))
    assert len(parts) == len(sent)
    got = {str(dcmread(io.BytesIO(bytes(p.content))).SOPInstanceUID):
           bytes(p.content) for p in parts}
    assert got == sent  # every object byte for byte
    for p in parts:
        assert p.headers["content-length"] == str(len(p.content))
