"""Sealed mode (issue 14, item 3): the server starts without its master key, keeps receiving,
refuses every read with the sealed status, and is unsealed live with nothing lost.

Everything runs against the real server subprocess and real peers: dcmtk's storescu and
echoscu, pynetdicom for C-FIND/C-GET/C-MOVE (to read the status and Error Comment), httpx
for HTTPS, a loopback webhook receiver for the exposure alert.
"""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import struct
import time
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE as PynetAE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from pacsvault.vault import Vault
from tests import corpus
from tests.harness.webhook import Webhook
from tests.helpers import (
    VaultDir,
    echoscu,
    events,
    make_vault,
    pv,
    start_server,
    storescu,
)

pytestmark = pytest.mark.slow

MODALITY = "MODALITY"
OTHER = "127.0.0.2"  # outside the trusted networks
SEALED = "archive sealed: an administrator must unlock it"


def _dataset_bytes(raw: bytes) -> bytes:
    assert raw[128:132] == b"DICM"
    (group_len,) = struct.unpack("<I", raw[140:144])
    return raw[144 + group_len:]


def _vault(root: Path, hook: Webhook | None = None) -> VaultDir:
    vault = make_vault(root)
    vault.set_toml("dicom", "trusted_networks", '["127.0.0.1/32"]')
    if hook is not None:
        vault.set_toml("alerts", "webhook_url", json.dumps(hook.url))
        vault.set_toml("alerts", "webhook_allow_http_loopback", "true")
    vault.add_node(MODALITY, "--roles", "store,query,retrieve")  # also makes the material
    return vault


def _seal(vault: VaultDir) -> Path:
    """Take the key medium away (the USB key removed)."""
    away = vault.root / "away.key"
    vault.key.rename(away)
    return away


def _unseal(vault: VaultDir, away: Path) -> str:
    away.rename(vault.key)
    return pv("unseal", "--data", vault.data, "--key-file", vault.key).stdout


def _stored_ok(proc: Any, count: int) -> None:
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _qr_status(port: int, model: str, identifier: Dataset) -> tuple[int, str]:
    ae = PynetAE(ae_title=MODALITY)
    ae.add_requested_context(model)
    assoc = ae.associate("127.0.0.1", port, ae_title="PACSVAULT")
    assert assoc.is_established
    try:
        if model == StudyRootQueryRetrieveInformationModelFind:
            responses = list(assoc.send_c_find(identifier, model))
        elif model == StudyRootQueryRetrieveInformationModelGet:
            responses = list(assoc.send_c_get(identifier, model))
        else:
            responses = list(assoc.send_c_move(identifier, MODALITY, model))
        status = responses[-1][0]
        return int(status.Status), str(status.get("ErrorComment", ""))
    finally:
        assoc.release()


def _study_identifier(study_uid: str = "") -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = study_uid
    return ds


def _wait(predicate: Any, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    return predicate()


def test_sealed_receives_refuses_reads_and_unseals(tmp_path: Path, hook: Webhook) -> None:
    vault = _vault(tmp_path / "v", hook)
    files = corpus.build(tmp_path / "corpus")
    plain = [f for f in files if not f.proposal][:3]  # CT, MR (UTF-8 name), synthetic CR
    series = corpus.synthetic_ct_series(tmp_path / "series", 4)
    # One instance stored before the key went away, re-sent while sealed: a duplicate the
    # merge must drop as the archive would have.
    v = Vault.open(vault.data, vault.key)
    try:
        v.archive.store(plain[0].path.read_bytes(), source_ae=MODALITY)
        v.archive.settle()
    finally:
        v.close()
    away = _seal(vault)
    server = start_server(vault)
    try:
        assert "ARCHIVE SEALED" in server.log()
        assert json.loads((vault.data / "serve.json").read_text())["sealed"] is True
        # C-ECHO and C-STORE work, on the plain and the TLS port alike
        assert echoscu(server.port, calling=MODALITY).returncode == 0
        _stored_ok(storescu(server.port, [f.path for f in plain], calling=MODALITY), 3)
        _stored_ok(storescu(server.port, series, calling=MODALITY), 4)
        # reads are refused with the sealed status
        assert _qr_status(server.port, StudyRootQueryRetrieveInformationModelFind,
                          _study_identifier()) == (0xA700, SEALED)
        for model in (StudyRootQueryRetrieveInformationModelGet,
                      StudyRootQueryRetrieveInformationModelMove):
            assert _qr_status(server.port, model, _study_identifier(plain[1].study_uid)) \
                == (0xA701, SEALED)
        # an unregistered AE is still refused
        stranger = storescu(server.port, [plain[0].path], calling="STRANGER")
        assert stranger.returncode != 0
        # an outside address is still refused and still alerts (webhook, while sealed)
        with socket.create_connection(("127.0.0.1", server.port), timeout=10,
                                      source_address=(OTHER, 0)) as s, \
                contextlib.suppress(ConnectionResetError):
            assert s.recv(1) == b""
        assert _wait(lambda: [b for b in hook.bodies if b.get("rule") == "exposure"
                              or "exposure" in json.dumps(b).lower()]), hook.bodies
        # and the practice was told at start that it must unlock the archive
        assert [b for b in hook.bodies if "archive-sealed" in json.dumps(b)], hook.bodies
        # HTTPS: every call 503 sealed (fr/en), but the unseal page
        ca = vault.data / "tls" / "ca.crt"
        with httpx.Client(base_url=f"https://127.0.0.1:{server.https_port}",
                          verify=ssl.create_default_context(cafile=str(ca)),
                          timeout=30) as web:
            qido = web.get("/dicom-web/studies", headers={"accept": "application/dicom+json"})
            assert qido.status_code == 503 and "archive sealed" in qido.json()["error"].lower()
            wado = web.get(f"/dicom-web/studies/{plain[1].study_uid}")
            assert wado.status_code == 503
            page = web.get("/", headers={"accept": "text/html", "accept-language": "fr"})
            assert page.status_code == 503 and "Archive scellée" in page.text
            login = web.get("/login", headers={"accept": "text/html"})
            assert login.status_code == 503 and "an administrator must unlock it" in login.text
            form = web.get("/unseal", headers={"accept": "text/html"})
            assert form.status_code == 200 and 'name="passphrase"' in form.text
            assert form.headers["content-security-policy"]
            # the form needs its CSRF token
            refused = web.post("/unseal", data={"retry": "1"})
            assert refused.status_code == 403
        # nothing about the patients is readable in the journals
        journal = vault.data / "sealed" / "journal"
        blobs = b"".join(p.read_bytes() for p in journal.iterdir())
        assert blobs
        for secret in [*corpus.secrets_of(plain), "Batch^Crash", "PVBATCH01",
                       *(f.sop_uid for f in plain), *(f.study_uid for f in plain)]:
            assert secret.encode() not in blobs, secret
            assert secret.encode("utf-16-le") not in blobs, secret

        out = _unseal(vault, away)
        assert "unsealed" in out.lower(), out
        assert "6 object(s)" in out and "1 duplicate" in out, out  # 3 + 4 - 1 known
        # the same listeners now serve reads
        status, _ = _qr_status(server.port, StudyRootQueryRetrieveInformationModelFind,
                               _study_identifier(plain[1].study_uid))
        assert status == 0x0000
        with httpx.Client(base_url=f"https://127.0.0.1:{server.https_port}",
                          verify=ssl.create_default_context(cafile=str(ca)),
                          timeout=30) as web:
            assert web.get("/login", headers={"accept": "text/html"}).status_code == 200
            again = web.get("/unseal", headers={"accept": "text/html"})
            assert again.status_code == 303 and again.headers["location"] == "/login"
        assert not list(journal.iterdir())  # merged, deleted
        assert "not sealed" in pv("unseal", "--data", vault.data).stdout
        # new stores after unsealing take the normal path
        extra = corpus.synthetic_ct_series(tmp_path / "extra", 1, seed=9)
        _stored_ok(storescu(server.port, extra, calling=MODALITY), 1)
    finally:
        server.stop()

    # every instance readable, byte for byte; every data key an ordinary one
    v = Vault.open(vault.data, vault.key)
    try:
        counts = v.archive.counts()
        assert counts["instances"] == 3 + 4 + 1
        for path in [f.path for f in plain] + series:
            sop = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
            found = list(v.archive.locate(sop_uid=sop))
            assert len(found) == 1
            assert _dataset_bytes(v.archive.read(found[0])) == _dataset_bytes(
                path.read_bytes())
        from sqlalchemy import select

        from pacsvault.index.models import DataKey

        with v.sessions() as session:
            wrapped = [bytes(cast(bytes, w)) for w in session.scalars(select(DataKey.wrapped))]
        assert wrapped and all(w[0] == 1 for w in wrapped)
    finally:
        v.close()
    verify = vault.cli("audit", "verify", check=False)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    actions = [e["action"] for e in events(vault)]
    for expected in ("dicom.find.sealed", "dicom.get.sealed", "dicom.move.sealed",
                     "exposure", "dicom.association.rejected", "sealed.unseal.page",
                     "sealed.merged", "sealed.unseal", "dicom.store.committed"):
        assert expected in actions, expected
    # the sealed period's events precede the merge, in order
    assert actions.index("dicom.find.sealed") < actions.index("sealed.merged")
    merged = next(e for e in events(vault, "sealed.merged"))
    assert merged["stored"] == 6 and merged["duplicates"] == 1
    # a patient's access report shows the sealed period's association with their study
    shown = vault.cli("audit", "show", "--patient", plain[1].patient_id, "--json").stdout
    mine = [json.loads(line) for line in shown.splitlines() if line.strip()] \
        if not shown.lstrip().startswith("[") else json.loads(shown)
    assert any(r.get("action") == "dicom.store.association" for r in mine), shown[:2000]
    # the plain log never carried patient data
    log = server.log()
    for secret in corpus.secrets_of(plain):
        assert secret not in log


def test_kill9_while_sealed_loses_nothing(tmp_path: Path) -> None:
    vault = _vault(tmp_path / "v")
    first = corpus.synthetic_ct_series(tmp_path / "a", 5, seed=1)
    second = corpus.synthetic_ct_series(tmp_path / "b", 3, seed=2)
    away = _seal(vault)
    server = start_server(vault)
    try:
        _stored_ok(storescu(server.port, first, calling=MODALITY), 5)
    finally:
        server.kill9()
    server = start_server(vault, log_name="serve2.log")  # still sealed: keeps appending
    try:
        assert "ARCHIVE SEALED" in server.log()
        _stored_ok(storescu(server.port, second, calling=MODALITY), 3)
        out = _unseal(vault, away)
        assert "8 object(s)" in out, out
    finally:
        server.stop()
    v = Vault.open(vault.data, vault.key)
    try:
        assert v.archive.counts()["instances"] == 8
        for path in first + second:
            sop = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
            (found,) = list(v.archive.locate(sop_uid=sop))
            assert _dataset_bytes(v.archive.read(found)) == _dataset_bytes(path.read_bytes())
        # no staged leftovers: recovery ran after the merge
        assert not any((vault.data / "objects" / ".spare").glob("*.part")) or all(
            p.stat().st_size == 0 for p in (vault.data / "objects" / ".spare").glob("*.part"))
    finally:
        v.close()
    assert vault.cli("audit", "verify", check=False).returncode == 0


def test_normal_start_merges_journals_left_by_a_sealed_run(tmp_path: Path) -> None:
    """The key came back before anyone ran unseal: the next normal start merges first."""
    vault = _vault(tmp_path / "v")
    files = corpus.synthetic_ct_series(tmp_path / "a", 3, seed=3)
    away = _seal(vault)
    server = start_server(vault)
    try:
        _stored_ok(storescu(server.port, files, calling=MODALITY), 3)
    finally:
        server.kill9()
    away.rename(vault.key)
    server = start_server(vault, log_name="serve2.log")
    try:
        assert "ARCHIVE SEALED" not in server.log()
        status, _ = _qr_status(server.port, StudyRootQueryRetrieveInformationModelFind,
                               _study_identifier())
        assert status == 0x0000
    finally:
        server.stop()
    v = Vault.open(vault.data, vault.key)
    try:
        assert v.archive.counts()["instances"] == 3
    finally:
        v.close()
    assert not list((vault.data / "sealed" / "journal").iterdir())
    assert "sealed.merged" in [e["action"] for e in events(vault)]


def test_storing_while_unsealing_loses_nothing(tmp_path: Path) -> None:
    """Modalities keep sending during the merge: their images go to the sealed journal
    (merged last, stores paused briefly) or, once switched, to the normal archive."""
    import subprocess

    from tests.helpers import dcmtk, dcmtk_env

    vault = _vault(tmp_path / "v")
    before = corpus.synthetic_ct_series(tmp_path / "a", 60, seed=21, size=64)
    during = corpus.synthetic_ct_series(tmp_path / "b", 60, seed=22, size=64)
    away = _seal(vault)
    server = start_server(vault)
    try:
        _stored_ok(storescu(server.port, before, calling=MODALITY), 60)
        sending = subprocess.Popen(
            [dcmtk("storescu"), "-aet", MODALITY, "-aec", "PACSVAULT", "127.0.0.1",
             str(server.port), *map(str, during)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dcmtk_env())
        time.sleep(0.3)
        out = _unseal(vault, away)
        output, _ = sending.communicate(timeout=120)
        assert sending.returncode == 0, output
        assert "unsealed" in out.lower()
    finally:
        server.stop()
    v = Vault.open(vault.data, vault.key)
    try:
        assert v.archive.counts()["instances"] == 120
    finally:
        v.close()
    assert not list((vault.data / "sealed" / "journal").iterdir())


def test_status_says_sealed_and_what_to_do(tmp_path: Path) -> None:
    """The IT provider's first command: a sealed server is reported as such (running,
    receiving, reads refused, how to unseal), not as an error about a missing key file."""
    vault = _vault(tmp_path / "v")
    away = _seal(vault)
    server = start_server(vault)
    try:
        out = pv("status", "--data", vault.data, "--key-file", vault.key, check=False)
        assert out.returncode == 1, out.stdout + out.stderr
        assert "SEALED" in out.stdout and "pacsvault unseal" in out.stdout
        assert "error:" not in out.stderr
        as_json = json.loads(pv("status", "--json", "--data", vault.data, "--key-file",
                                vault.key, check=False).stdout)
        assert as_json["server"]["running"] and as_json["server"]["sealed"]
        _unseal(vault, away)
        out = pv("status", "--data", vault.data, "--key-file", vault.key)
        assert "SEALED" not in out.stdout and "running" in out.stdout
    finally:
        server.stop()
