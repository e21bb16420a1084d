"""Master key rotation on a PostgreSQL index (issue 16): every sealed column and blind
token re-encrypted, in chunks, resumable; online with one instance, refused with two.

One vault on the harness's PostgreSQL (``init --index-url``), a few patients stored with
dcmtk's storescu, baseline C-FIND and QIDO-RS answers taken before any rotation. After
each rotation (offline, resumed after a crash between two chunks, online inside
``serve``) the same queries give the same answers, every instance reads back identical,
the raw rows (read with psycopg, not through pacsvault) open with the new derived keys
only, the old key file opens nothing, and ``audit verify`` passes across the hand-over.
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from pacsvault import config
from pacsvault.crypto import datakeys, keys
from pacsvault.crypto.rotation.sealed_index import encrypted_columns, tables
from pacsvault.index import postgres
from pacsvault.index.db import IndexOpenError
from pacsvault.index.sealing import SealedColumnError, Sealer, sealer_for
from tests.harness.peers import c_find_json
from tests.harness.postgres import PostgresServer, create_database, drop_database
from tests.helpers import AE, Server, VaultDir, pv, start_server, storescu
from tests.test_postgres_index import make_pg_vault

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

CALLING = "PGROTMOD"
CRASH_ENV = "PACSVAULT_TEST_ROTATION_CRASH"
USER, USER_PW = "drrotate", "amber-harbor-violin-37-silent-fjord"
PATIENTS = (("Rotpg^Alice", "PGROT001", "19600212", "20240115"),
            ("Rotpg^Bob", "PGROT002", "19711130", "20240520"),
            ("Other^Carol", "PGROT003", "19850707", "20241103"))
QUERIES: dict[str, dict[str, str]] = {
    "name wildcard": {"PatientName": "ROTPG*"},
    "patient id": {"PatientID": "PGROT002"},
    "date range": {"StudyDate": "20240101-20240630"},
    "name and range": {"PatientName": "*CAROL*", "StudyDate": "20240601-20241231"},
}


@dataclass
class Loaded:
    vault: VaultDir
    pg: PostgresServer
    database: str
    files: list[Path]
    token: str
    cfind: dict[str, list[dict[str, Any]]]
    qido: dict[str, list[dict[str, Any]]]


def _files(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(16)
    found: list[Path] = []
    for name, pid, birth, date in PATIENTS:
        study, series = generate_uid(), generate_uid()
        for n in range(2):
            ds = Dataset()
            ds.file_meta = FileMetaDataset()
            ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.SOPClassUID = CTImageStorage
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
            ds.PatientName, ds.PatientID, ds.PatientBirthDate = name, pid, birth
            ds.StudyDate, ds.SeriesDate, ds.StudyTime = date, date, "101500"
            ds.ReferringPhysicianName, ds.AccessionNumber = "Ref^Doctor", f"A{pid}"
            ds.StudyDescription = "rotation on postgres"
            ds.Modality, ds.InstanceNumber = "CT", n + 1
            ds.Rows = ds.Columns = 8
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.PixelData = rng.integers(-1000, 2000, (8, 8), dtype=np.int16).tobytes()
            path = out / f"{pid}-{n}.dcm"
            ds.save_as(path, enforce_file_format=True)
            found.append(path)
    return found


def _identifier(**keys_: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    for name in ("PatientName", "PatientID", "PatientBirthDate", "StudyDate",
                 "AccessionNumber", "StudyInstanceUID", "ReferringPhysicianName"):
        setattr(ds, name, "")
    for name, value in keys_.items():
        setattr(ds, name, value)
    return ds


def _answers(server: Server, token: str) -> tuple[dict[str, list[dict[str, Any]]],
                                                  dict[str, list[dict[str, Any]]]]:
    cfind = {label: c_find_json(server.port, _identifier(**query), calling=CALLING,
                                called=AE) for label, query in QUERIES.items()}
    ctx = ssl.create_default_context(cafile=str(server.vault.data / "tls" / "ca.crt"))
    qido: dict[str, list[dict[str, Any]]] = {}
    with httpx.Client(base_url=f"https://127.0.0.1:{server.https_port}/dicom-web",
                      verify=ctx, timeout=60, trust_env=False,
                      headers={"Authorization": f"Bearer {token}"}) as http:
        for label, query in QUERIES.items():
            res = http.get("/studies", params=query)
            assert res.status_code in (200, 204), res.text
            # RetrieveURL (0008,1190) names this server's port: not part of the answer
            qido[label] = sorted(({k: v for k, v in answer.items() if k != "00081190"}
                                  for answer in (res.json() if res.status_code == 200
                                                 else [])), key=str)
    return cfind, qido


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory,
           postgres_server: PostgresServer) -> Iterator[Loaded]:
    root = tmp_path_factory.mktemp("pgrotation")
    files = _files(root / "in")
    db = create_database(postgres_server)
    try:
        vault = make_pg_vault(root / "pg", postgres_server, db.url)
        opened = vault.open()
        try:
            opened.nodes.add(CALLING, "127.0.0.1", roles=("store", "query", "retrieve"))
            opened.accounts.add_user(USER, ["physician"], USER_PW)
            token = opened.accounts.create_token(USER, "1d").token
        finally:
            opened.close()
        server = start_server(vault)
        try:
            done = storescu(server.port, files, calling=CALLING)
            assert done.returncode == 0, done.stderr
            cfind, qido = _answers(server, token)
        finally:
            server.stop()
        assert len(cfind["name wildcard"]) == 2 and len(cfind["patient id"]) == 1
        assert len(cfind["date range"]) == 2 and len(cfind["name and range"]) == 1
        assert [len(v) for v in qido.values()] == [len(v) for v in cfind.values()]
        yield Loaded(vault, postgres_server, db.name, files, token, cfind, qido)
    finally:
        drop_database(db)


# --- what must hold after every rotation -------------------------------------------------


def _vault_id(vault: VaultDir) -> str:
    return str(json.loads((vault.data / "vault.json").read_text())["vault_id"])


def _opens(sealer: Sealer, label: str, blob: bytes, fixed: bool) -> bool:
    try:
        if fixed:
            sealer.unfix(label, blob)
        else:
            sealer.open(label, blob)
        return True
    except SealedColumnError:
        return False


def _raw_states(loaded: Loaded, old: keys.MasterKey, new: keys.MasterKey) -> dict[str, int]:
    """Every encrypted value of every table, read raw: how many open with ``new``'s
    derived keys, with ``old``'s, with neither; and the blind tokens' key."""
    vid = _vault_id(loaded.vault)
    old_s, new_s = sealer_for(old, vid), sealer_for(new, vid)
    counts = {"new": 0, "old": 0, "neither": 0, "rows_mixed": 0}
    with loaded.pg.connect(loaded.database) as conn:
        for table in tables():
            columns = encrypted_columns(table)
            if not columns:
                continue
            names = ", ".join(f'"{c.name}"' for c in columns)
            query = f'SELECT {names} FROM "{table.name}"'  # noqa: S608 (model names)
            for row in conn.execute(query).fetchall():
                states = set()
                for column, blob in zip(columns, row, strict=True):
                    if blob is None:
                        continue
                    state = ("new" if _opens(new_s, column.label, bytes(blob), column.fixed)
                             else "old" if _opens(old_s, column.label, bytes(blob),
                                                  column.fixed) else "neither")
                    counts[state] += 1
                    states.add(state)
                counts["rows_mixed"] += len(states) > 1  # a row is under one key
        # The exact-name token of each patient: under the new token key only.
        for pk, name_norm in conn.execute("SELECT pk, name_norm FROM patients").fetchall():
            try:
                group = new_s.open("patients.name_norm", bytes(name_norm)).split("=")[0]
            except SealedColumnError:
                group = old_s.open("patients.name_norm", bytes(name_norm)).split("=")[0]
            held = {bytes(t) for (t,) in conn.execute(
                "SELECT token FROM patient_tokens WHERE row_pk = %s", (pk,)).fetchall()}
            counts["tokens_new"] = counts.get("tokens_new", 0) + (
                new_s.token("pn/patient_name/exact", group) in held)
            counts["tokens_old"] = counts.get("tokens_old", 0) + (
                old_s.token("pn/patient_name/exact", group) in held)
    return counts


def assert_old_key_useless_pg(loaded: Loaded, old_key: Path) -> None:
    """The old key file opens nothing: not the vault, not the index (owner row), no
    sealed value, token, data key or TLS key."""
    vault = loaded.vault
    proc = pv("audit", "verify", "--data", vault.data, "--key-file", old_key, check=False)
    assert proc.returncode == 2
    assert "does not open this vault" in proc.stderr and "Traceback" not in proc.stderr
    vid = _vault_id(vault)
    old, new = keys.read_key_file(old_key)[0], keys.read_key_file(vault.key)[0]
    settings = config.load(vault.data).index
    with pytest.raises(IndexOpenError, match="does not open with this key"):
        postgres.open_postgres(settings, sealer_for(old, vid), vid)
    states = _raw_states(loaded, old, new)
    assert states["new"] > 30 and states["old"] == states["neither"] == 0, states
    assert states["tokens_new"] == len(PATIENTS) and states["tokens_old"] == 0, states
    with loaded.pg.connect(loaded.database) as conn:
        rows = conn.execute("SELECT key_id, wrapped FROM data_keys").fetchall()
    assert len(rows) == len(PATIENTS)
    old_kek, new_kek = (m.derive(keys.PURPOSE_KEK, vid) for m in (old, new))
    for key_id, wrapped in rows:
        with pytest.raises(datakeys.DataKeyError):
            datakeys.unwrap(old_kek, uuid.UUID(key_id), bytes(wrapped))
        datakeys.unwrap(new_kek, uuid.UUID(key_id), bytes(wrapped))
    old_pw, new_pw = (m.derive(keys.PURPOSE_TLS, vid).hex().encode() for m in (old, new))
    tls_keys = sorted((vault.data / "tls").rglob("*.key.enc"))
    assert tls_keys
    for path in tls_keys:
        with pytest.raises((ValueError, TypeError)):
            serialization.load_pem_private_key(path.read_bytes(), old_pw)
        serialization.load_pem_private_key(path.read_bytes(), new_pw)


def assert_same_answers(loaded: Loaded, server: Server) -> None:
    """Same C-FIND and QIDO-RS answers (name wildcard, ID, date range) as before any
    rotation."""
    cfind, qido = _answers(server, loaded.token)
    assert cfind == loaded.cfind
    assert qido == loaded.qido


def assert_same_vault(loaded: Loaded, *, answers: bool = True) -> None:
    """Same answers (a server started for them); every instance reads back identical
    (header and pixels); the trail verifies across every hand-over."""
    if answers:
        server = start_server(loaded.vault)
        try:
            assert_same_answers(loaded, server)
        finally:
            server.stop()
    sent = {str(ds.SOPInstanceUID): ds for ds in (dcmread(p) for p in loaded.files)}
    opened = loaded.vault.open()
    try:
        items = list(opened.archive.locate())
        assert {item.sop_uid for item in items} == set(sent)
        for item in items:
            back = dcmread(_bytes_io(opened.archive.read(item)))
            original = sent[item.sop_uid]
            assert back.PixelData == original.PixelData
            for keyword in ("PatientName", "PatientID", "PatientBirthDate", "StudyDate",
                            "StudyInstanceUID", "SeriesInstanceUID"):
                assert str(back.get(keyword)) == str(original.get(keyword))
        verdict = opened.audit.verify()
        assert verdict.ok, verdict.problem
    finally:
        opened.close()
    verify = loaded.vault.cli("audit", "verify")
    assert "Traceback" not in verify.stderr


def _bytes_io(data: bytes) -> Any:
    import io

    return io.BytesIO(data)


def _rotate_crashing(vault: VaultDir, point: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, CRASH_ENV: point}
    return subprocess.run(
        [sys.executable, "-m", "pacsvault", "keys", "rotate", "--data", str(vault.data),
         "--key-file", str(vault.key)], capture_output=True, text=True, env=env, timeout=180)


# --- the tests -------------------------------------------------------------------------------


def test_offline_rotation_reencrypts_every_sealed_column(loaded: Loaded, tmp_path: Path) -> None:
    vault = loaded.vault
    old_key = tmp_path / "old.key"
    shutil.copy2(vault.key, old_key)
    before = json.loads((vault.data / "vault.json").read_text())
    proc = vault.cli("keys", "rotate")
    assert "offline" in proc.stderr and "Traceback" not in proc.stderr
    after = json.loads((vault.data / "vault.json").read_text())
    assert "rotation" not in after and after["key_check"] != before["key_check"]
    assert after["recovery"] != before["recovery"]
    assert not Path(f"{vault.key}.new").exists()
    assert_old_key_useless_pg(loaded, old_key)
    assert_same_vault(loaded)
    rotated = [json.loads(line) for line in vault.cli(
        "audit", "show", "--action", "keys.rotated", "--json").stdout.splitlines()]
    assert rotated and rotated[-1]["detail"]["old_signing_key"] != \
        rotated[-1]["detail"]["new_signing_key"]


def test_crash_between_chunks_resumes(loaded: Loaded, tmp_path: Path) -> None:
    """Killed after the first chunk of index rows (chunks of 2): the index is half under
    each key, each row under one; the next command completes the rotation. Killed right
    after the index step (the owner row already under the new keys): the next command
    opens the index with the new sealer and completes the rest."""
    vault = loaded.vault
    for n, point in enumerate(("index-rows:2", "index")):
        old_key = tmp_path / f"old-{n}.key"
        shutil.copy2(vault.key, old_key)
        crashed = _rotate_crashing(vault, point)
        assert crashed.returncode == 70, crashed.stderr
        assert "rotation" in json.loads((vault.data / "vault.json").read_text())
        old = keys.read_key_file(old_key)[0]
        new = keys.read_key_file(Path(f"{vault.key}.new"))[0]
        state = _raw_states(loaded, old, new)
        assert state["neither"] == 0 and state["rows_mixed"] == 0, state
        if point == "index":
            assert state["old"] == 0 and state["tokens_old"] == 0, state
        else:
            assert state["new"] > 0 and state["old"] > 0, state
        resumed = vault.cli("audit", "verify")
        assert "Traceback" not in resumed.stderr
        assert "rotation" not in json.loads((vault.data / "vault.json").read_text())
        assert keys.read_key_file(vault.key)[0] == new
    assert_old_key_useless_pg(loaded, old_key)
    assert_same_vault(loaded)


def test_online_rotation_one_instance_and_refused_when_shared(loaded: Loaded,
                                                              tmp_path: Path) -> None:
    """Inside ``serve`` (the control command): the server keeps answering, with the same
    answers, on the new keys. A second instance registered in the index (its anchor row,
    as ``instances add`` reserves it): refused online and offline, nothing changed."""
    vault = loaded.vault
    old_key = tmp_path / "old.key"
    shutil.copy2(vault.key, old_key)
    server = start_server(vault)
    try:
        proc = vault.cli("keys", "rotate")
        assert "online" in proc.stderr and "Traceback" not in proc.stderr
        assert_same_answers(loaded, server)  # same process, the new keys
        with loaded.pg.connect(loaded.database) as conn:
            # what ``audit.instances.insert_anchor`` writes for a reserved name
            conn.execute("INSERT INTO audit_head (id, instance, seq, digest, broken) "
                         "SELECT COALESCE(MAX(id), 0) + 1, 'second', 0, '', '' "
                         "FROM audit_head")
        try:
            key_before = vault.key.read_bytes()
            refused = vault.cli("keys", "rotate", check=False)
            assert refused.returncode != 0 and "Traceback" not in refused.stderr
            assert "1 other instance(s) (second)" in refused.stderr
            # No stop checkpoint naming the fake instance (its chain is not in the index).
            server.kill9()
            offline = vault.cli("keys", "rotate", check=False)
            assert offline.returncode != 0 and "one instance only" in offline.stderr
            assert vault.key.read_bytes() == key_before
            assert "rotation" not in json.loads((vault.data / "vault.json").read_text())
        finally:
            with loaded.pg.connect(loaded.database) as conn:
                conn.execute("DELETE FROM audit_head WHERE instance = 'second'")
    finally:
        server.stop()
    assert_old_key_useless_pg(loaded, old_key)
    assert_same_vault(loaded, answers=False)  # answered by the running server above
