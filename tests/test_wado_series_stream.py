"""A WADO-RS series answered as stored (issue 17): the parts come from ``wado_stream``'s
producer thread, the answer carries its exact Content-Length (no chunk framing) and each
part is the stored object byte for byte, in order, framed exactly (each part's header,
object and CRLF, then the closing delimiter, nothing else). A client that goes away
mid-series leaves its access recorded and a server that answers the next one whole."""

from __future__ import annotations

import io
import re
import socket
import ssl
from pathlib import Path

import httpx
import pytest
from pydicom import dcmread

from pacsvault.web.multipart import parse_related
from tests import corpus
from tests.helpers import events, make_vault, start_server, wait_events

USER, PASSWORD = "drserie", "copper-lantern-91-quiet-meadow-falcon"
MODALITY = "CTSCAN"


@pytest.mark.slow
def test_series_as_stored_has_its_length_and_identical_parts(tmp_path: Path) -> None:
    vault = make_vault(tmp_path / "v")
    # 6 x 128 KB: more than the server's write buffer, so a reader can leave mid-series
    files = corpus.synthetic_ct_series(tmp_path / "ct", 6, size=256)
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
    path = f"/dicom-web/studies/{first.StudyInstanceUID}/series/{first.SeriesInstanceUID}"
    accept = 'multipart/related; type="application/dicom"'
    server = start_server(vault)
    try:
        base = f"https://127.0.0.1:{server.https_port}"
        ca = ssl.create_default_context(cafile=str(vault.data / "tls" / "ca.crt"))
        with httpx.Client(headers={"Authorization": f"Bearer {token}"}, verify=ca,
                          trust_env=False, timeout=60) as client:
            res = client.get(f"{base}{path}", headers={"Accept": accept})
            recorded = len(wait_events(vault, "dicomweb.retrieve"))
            _leave_mid_series(server.https_port, ca, path, accept, token)
            again = wait_events(vault, "dicomweb.retrieve", count=recorded + 1)
            assert len(again) == recorded + 1  # the access left early is recorded
            assert again[-1]["resource"] == "series" and again[-1]["outcome"] == "success"
            after = client.get(f"{base}{path}", headers={"Accept": accept})
        assert server.alive()
    finally:
        server.stop()
    assert after.status_code == 200
    assert "Traceback" not in server.log()
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
    boundary = match.group(1)
    framed = b"".join(_part(boundary, bytes(p.content)) for p in parts)
    assert res.content == framed + f"--{boundary}--\r\n".encode("ascii")  # nothing else
    assert [bytes(p.content) for p in parse_related(after.content, _boundary(after))] == [
        bytes(p.content) for p in parts]  # the next answer after a client left: whole
    assert [e["outcome"] for e in events(vault, "dicomweb.retrieve")] == ["success"] * 3


def _leave_mid_series(port: int, ca: ssl.SSLContext, path: str, accept: str,
                      token: str) -> None:
    """GET the series through a 4 KB receive window, read the status line and a little
    of the first part, and close: the server is then stalled in the middle of the series."""
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.settimeout(30)
    raw.connect(("127.0.0.1", port))
    with ca.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        tls.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: {accept}\r\n"
                    f"Authorization: Bearer {token}\r\n\r\n".encode("ascii"))
        got = b""
        while b"\r\n\r\n" not in got or len(got) < 8192:
            chunk = tls.recv(4096)
            assert chunk
            got += chunk
        assert got.startswith(b"HTTP/1.1 200")


def _boundary(res: httpx.Response) -> str:
    match = re.search(r"boundary=([^;\s]+)", res.headers["content-type"])
    assert match is not None
    return match.group(1)


def _part(boundary: str, data: bytes) -> bytes:
    """One part exactly as PS3.18 / RFC 2046 frame it: delimiter, headers, object, CRLF."""
    syntax = dcmread(io.BytesIO(data), stop_before_pixels=True).file_meta.TransferSyntaxUID
    return (f"--{boundary}\r\nContent-Type: application/dicom; transfer-syntax={syntax}\r\n"
            f"Content-Length: {len(data)}\r\n\r\n").encode("ascii") + data + b"\r\n"
