"""Master key rotation (issue 14, item 4): ``pacsvault keys rotate`` offline, and resumed
after a crash between its steps. The online rotation (while storescu sends) is in
tests/test_rotation_online.py.

Every check is made with the real CLI and server; afterwards the OLD key file must open
nothing of the live vault (index, data keys, TLS keys), while the new key opens all of it,
the trail verifies across the hand-over and ``audit show`` still unseals old records."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from sqlalchemy import text

from pacsvault.crypto import datakeys, keys
from pacsvault.index.db import IndexOpenError, open_index
from tests.helpers import VaultDir, make_vault, pv, start_server, storescu

pytestmark = pytest.mark.slow

CALLING = "ROTMOD"
CRASH_ENV = "PACSVAULT_TEST_ROTATION_CRASH"


def patients_files(out: Path, patients: int, per_patient: int = 2) -> dict[str, list[Path]]:
    """Small CT objects for several patients (one data key each): Patient ID -> files."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    found: dict[str, list[Path]] = {}
    for p in range(patients):
        pid = f"PVROT{p:03d}"
        study, series = generate_uid(), generate_uid()
        for n in range(per_patient):
            ds = Dataset()
            ds.file_meta = FileMetaDataset()
            ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.SOPClassUID = CTImageStorage
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
            ds.PatientName, ds.PatientID = f"Rotation^Patient{p:03d}", pid
            ds.Modality, ds.InstanceNumber = "CT", n + 1
            ds.Rows = ds.Columns = 16
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.PixelData = rng.integers(-1000, 2000, (16, 16), dtype=np.int16).tobytes()
            path = out / f"p{p:03d}-{n:02d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            found.setdefault(pid, []).append(path)
    return found


def stored_vault(tmp_path: Path, patients: int = 5) -> tuple[VaultDir, list[Path]]:
    vault = make_vault(tmp_path / "v")
    vault.add_node(CALLING)
    files = [f for group in patients_files(tmp_path / "in", patients).values() for f in group]
    server = start_server(vault)
    try:
        done = storescu(server.port, files, calling=CALLING)
        assert done.returncode == 0, done.stderr
    finally:
        server.stop()
    return vault, files


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> tuple[VaultDir, list[Path]]:
    """One stored vault (5 patients, 10 objects), copied by each test that changes it."""
    return stored_vault(tmp_path_factory.mktemp("template"))


def copy_of(template: tuple[VaultDir, list[Path]], where: Path) -> tuple[VaultDir, list[Path]]:
    source, files = template
    shutil.copytree(source.root, where / "v", symlinks=True)
    toml = where / "v" / "data" / "pacsvault.toml"
    toml.write_text(toml.read_text().replace(str(source.root), str(where / "v")))
    return dataclasses.replace(source, root=where / "v", key=where / "v" / "keys" /
                               "master.key"), files


def read_code_file(stdout: str) -> str:
    path = Path(stdout.strip().splitlines()[-1].strip())
    assert path.stat().st_mode & 0o077 == 0
    assert not path.resolve().is_relative_to(Path.cwd() / "data")
    for line in path.read_text().splitlines():
        if line.startswith("recovery code:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError("no recovery code in the file")


def assert_old_key_useless(vault: VaultDir, old_key: Path) -> None:
    """The old key file opens nothing of the live vault, and says so clearly."""
    proc = pv("audit", "verify", "--data", vault.data, "--key-file", old_key, check=False)
    assert proc.returncode == 2
    assert "does not open this vault" in proc.stderr and "Traceback" not in proc.stderr
    vault_id = json.loads((vault.data / "vault.json").read_text())["vault_id"]
    old = keys.read_key_file(old_key)[0]
    with pytest.raises(IndexOpenError):
        open_index(vault.data / "index.db", old.derive(keys.PURPOSE_INDEX, vault_id))
    new = keys.read_key_file(vault.key)[0]
    engine = open_index(vault.data / "index.db", new.derive(keys.PURPOSE_INDEX, vault_id))
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT key_id, wrapped FROM data_keys")).all()
    finally:
        engine.dispose()
    assert rows
    old_kek = old.derive(keys.PURPOSE_KEK, vault_id)
    new_kek = new.derive(keys.PURPOSE_KEK, vault_id)
    for key_id, wrapped in rows:
        with pytest.raises(datakeys.DataKeyError):
            datakeys.unwrap(old_kek, uuid.UUID(key_id), wrapped)
        datakeys.unwrap(new_kek, uuid.UUID(key_id), wrapped)
    old_pw = old.derive(keys.PURPOSE_TLS, vault_id).hex().encode()
    new_pw = new.derive(keys.PURPOSE_TLS, vault_id).hex().encode()
    tls_keys = sorted((vault.data / "tls").rglob("*.key.enc"))
    assert len(tls_keys) >= 3
    for path in tls_keys:
        with pytest.raises((ValueError, TypeError)):
            serialization.load_pem_private_key(path.read_bytes(), old_pw)
        serialization.load_pem_private_key(path.read_bytes(), new_pw)


def assert_all_readable(vault: VaultDir, files: list[Path], out: Path) -> None:
    """Every stored instance exports (decrypts and authenticates) with the new key."""
    vault.cli("export", "--all", "--out", out)
    exported = {p.name for p in out.rglob("*") if p.is_file()}
    assert len(exported) >= len(files)


def assert_trail_across(vault: VaultDir, patient: str) -> None:
    verify = vault.cli("audit", "verify")
    assert "Traceback" not in verify.stderr
    rotated = json.loads(vault.cli("audit", "show", "--action", "keys.rotated", "--json")
                         .stdout.splitlines()[-1])
    assert rotated["user"] and rotated["detail"]["old_signing_key"] != \
        rotated["detail"]["new_signing_key"]
    assert "recovery" not in json.dumps(rotated["detail"]).lower()
    # Records sealed before the rotation still unseal: the patient's stores are listed.
    shown = [json.loads(line) for line in
             vault.cli("audit", "show", "--patient", patient, "--json").stdout.splitlines()]
    stores = [r for r in shown if r["action"].startswith("dicom.store")]
    assert stores and all(patient in r.get("patient_ids", []) or r.get("study_uids")
                          for r in stores)


def assert_consistent_inproc(vault: VaultDir, files: list[Path], patient: str) -> None:
    """The same checks in-process (cheaper than one CLI call each): every instance
    decrypts and authenticates, the trail verifies, old records' references unseal."""
    from pydicom import dcmread

    opened = vault.open()
    try:
        items = list(opened.archive.locate())
        assert len(items) == len(files)
        wanted = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files}
        assert {item.sop_uid for item in items} == wanted
        for item in items:
            assert opened.archive.read(item)[128:132] == b"DICM"
        verdict = opened.audit.verify()
        assert verdict.ok, verdict.problem
        records = list(opened.audit.records())
        assert [r.action for r in records].count("keys.rotated") == 1
        assert any(patient in r.refs.get("patient_ids", []) or
                   patient in r.refs.get("patients", {}) for r in records
                   if r.action.startswith("dicom.store"))
    finally:
        opened.close()


def test_offline_rotation_old_key_useless_new_recovery_code(
        tmp_path: Path, template: tuple[VaultDir, list[Path]]) -> None:
    vault, files = copy_of(template, tmp_path)
    old_key = tmp_path / "stolen-copy.key"
    shutil.copy2(vault.key, old_key)
    before = json.loads((vault.data / "vault.json").read_text())
    proc = vault.cli("keys", "rotate")
    assert "offline" in proc.stderr and "OLD recovery code" in proc.stderr
    code = read_code_file(proc.stdout)
    assert code != vault.recovery_code and code not in proc.stderr
    after = json.loads((vault.data / "vault.json").read_text())
    assert "rotation" not in after and after["key_check"] != before["key_check"]
    assert after["recovery"] != before["recovery"]
    assert not Path(f"{vault.key}.new").exists()
    assert not list(vault.key.parent.glob("*.retired-*"))  # removed by default
    assert vault.key.stat().st_mode & 0o777 == 0o600
    # named secrets keep their values: the backup password did not change
    for name in before.get("secrets", {}):
        assert name in after["secrets"]
    assert_old_key_useless(vault, old_key)
    assert_all_readable(vault, files, tmp_path / "out")
    assert_trail_across(vault, "PVROT000")
    # The new code recovers the key; the old one no longer does.
    vault.key.rename(tmp_path / "away.key")
    bad = vault.cli("keys", "recover", input=vault.recovery_code + "\n", check=False)
    assert bad.returncode == 2 and "does not open" in bad.stderr
    vault.cli("keys", "recover", input=code + "\n")
    assert keys.read_key_file(vault.key)[0] == keys.read_key_file(tmp_path / "away.key")[0]
    # The server starts on the rotated vault, and storing goes on.
    server = start_server(vault)
    try:
        more = patients_files(tmp_path / "more", 1)["PVROT000"]
        assert storescu(server.port, more, calling=CALLING).returncode == 0
    finally:
        server.stop()
    vault.cli("audit", "verify")


def test_keep_old_key_file_on_request(tmp_path: Path) -> None:
    vault = make_vault(tmp_path / "v")
    proc = vault.cli("keys", "rotate", "--keep-old-key")
    kept = list(vault.key.parent.glob("master.key.retired-*"))
    assert len(kept) == 1 and str(kept[0]) in proc.stderr
    assert kept[0].stat().st_mode & 0o777 == 0o600
    refused = pv("status", "--data", vault.data, "--key-file", kept[0], check=False)
    assert refused.returncode == 2 and "does not open this vault" in refused.stderr


@pytest.mark.parametrize("point", ["data-keys:2", "index", "trail", "key-file"])
def test_crash_between_steps_resumes(tmp_path: Path, point: str,
                                     template: tuple[VaultDir, list[Path]]) -> None:
    """A rotation killed between two steps (after half the data keys, after the files,
    after the index re-key, after the trail record, after the key file swap) is completed
    by the next open, with whichever key file is in place: nothing lost."""
    vault, files = copy_of(template, tmp_path)
    old_key = tmp_path / "old.key"
    shutil.copy2(vault.key, old_key)
    env = {**os.environ, CRASH_ENV: point}
    crashed = subprocess.run(
        [sys.executable, "-m", "pacsvault", "keys", "rotate", "--data", str(vault.data),
         "--key-file", str(vault.key)], capture_output=True, text=True, env=env, timeout=120)
    assert crashed.returncode == 70, crashed.stderr
    meta = json.loads((vault.data / "vault.json").read_text())
    assert "rotation" in meta
    # Any command completes it first (here: audit verify).
    resumed = vault.cli("audit", "verify")
    assert "rotation" not in json.loads((vault.data / "vault.json").read_text())
    assert "Traceback" not in resumed.stderr
    codes = list(vault.key.parent.rglob("*.recovery.txt"))
    assert codes, "the resumed rotation's recovery code was handed over"
    assert_old_key_useless(vault, old_key)
    assert_consistent_inproc(vault, files, "PVROT001")  # and keys.rotated written once


def test_interrupted_rotation_without_its_new_key_refuses_clearly(tmp_path: Path) -> None:
    vault = make_vault(tmp_path / "v")
    env = {**os.environ, CRASH_ENV: "files"}
    crashed = subprocess.run(
        [sys.executable, "-m", "pacsvault", "keys", "rotate", "--data", str(vault.data),
         "--key-file", str(vault.key)], capture_output=True, text=True, env=env, timeout=120)
    assert crashed.returncode == 70
    Path(f"{vault.key}.new").rename(tmp_path / "elsewhere.key")
    proc = vault.cli("status", check=False)
    assert proc.returncode == 2 and "new key file" in proc.stderr
    assert "Traceback" not in proc.stderr
    Path(tmp_path / "elsewhere.key").rename(f"{vault.key}.new")
    vault.cli("audit", "verify")
