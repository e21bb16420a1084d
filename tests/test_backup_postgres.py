"""Issue 16: ``pacsvault backup`` of a scale-out vault (PostgreSQL index + S3 objects).

One vault on the session's real PostgreSQL (TLS verify-full, password file) and real
SeaweedFS bucket, a few corpus images sent with dcmtk's storescu, one ``backup run`` into
a local restic repository. Then, in this order (the last test destroys the vault):

- the index dump in the repository is a pg_dump stream holding no patient marker and no
  wrapped data key; refusals (pg_dump older than the server, the database out of reach)
  say why in one line and add no snapshot;
- the restore drill restores into a scratch database on the same server, verifies, and
  drops it;
- losing everything (database dropped, bucket emptied, data directory and key file gone),
  then ``backup restore --to-index`` into a new database: every instance reads back
  identical, C-FIND by name answers, ``audit verify`` passes, nothing restored on disk
  holds a patient marker.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset

from tests import corpus
from tests.harness.peers import c_find_json
from tests.harness.postgres import (
    PostgresDatabase,
    PostgresServer,
    create_database,
    drop_database,
)
from tests.harness.seaweed import S3Bucket, S3Server, create_bucket
from tests.helpers import AE, VaultDir, first_run_secrets, pv, start_server, storescu

MODALITY = "PGBACKUP"
RESTIC = shutil.which("restic") or "/usr/bin/restic"
PREFIX = "pv/backed"

pytestmark = [
    pytest.mark.postgres, pytest.mark.s3, pytest.mark.slow,
    pytest.mark.skipif(not Path(RESTIC).exists(), reason="restic not installed"),
]


@dataclass
class Env:
    vault: VaultDir
    db: PostgresDatabase
    bucket: S3Bucket
    repo: Path
    files: list[corpus.CorpusFile]
    digests: dict[str, str]
    root: Path


def _private(path: Path, text: str) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text + "\n")
    return path


def _digests(v: Any) -> dict[str, str]:
    return {item.sop_uid: hashlib.sha256(v.archive.read(item)).hexdigest()
            for item in v.archive.locate()}


def _markers(files: list[corpus.CorpusFile]) -> list[bytes]:
    """Names, IDs, birth dates, UIDs, each in UTF-8, UTF-16 and base64 (middle part)."""
    found: list[bytes] = []
    for text in {*corpus.secrets_of(files), *(f.sop_uid for f in files),
                 *(f.study_uid for f in files)}:
        raw = text.encode()
        found += [raw, text.encode("utf-16-le")]
        for shift in range(3):
            middle = base64.b64encode(b"\x00" * shift + raw)[4:-4]
            if len(middle) >= 8:
                found.append(middle)
    return found


def _snapshots(env: Env) -> list[dict[str, Any]]:
    from pacsvault.backup import runner

    v = env.vault.open()
    try:
        return runner._repo(v, runner._target(v, "usb")).snapshots()
    finally:
        v.close()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, postgres_server: PostgresServer,
        s3_server: S3Server) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("pgbackup")
    db = create_database(postgres_server)
    bucket = create_bucket(s3_server)
    key = root / "v" / "keys" / "master.key"
    (root / "v").mkdir()
    proc = pv("init", "--data", root / "v" / "data", "--key-file", key, "--ae-title", AE,
              "--admin", "admin", "--index-url", db.url,
              "--index-password-file", postgres_server.password_file,
              "--storage-url", f"{bucket.url}/{PREFIX}",
              "--storage-endpoint", s3_server.endpoint, "--storage-region", s3_server.region,
              "--storage-credentials-file", s3_server.credentials_file,
              "--storage-ca-file", s3_server.ca_file, "--storage-path-style")
    found = first_run_secrets(proc.stdout)
    vault = VaultDir(root / "v", key, found.recovery_code, found.admin_password,
                     found.admin_name)
    vault.add_node(MODALITY, "--roles", "store,query,retrieve")
    repo = root / "usb" / "repo"
    repo.parent.mkdir()
    with open(vault.data / "pacsvault.toml", "a") as fh:
        fh.write(f'\n[[backup.targets]]\nname = "usb"\nrepository = "{repo}"\n')
    files = corpus.build(root / "corpus")[:4]
    server = start_server(vault)
    try:
        for f in files:
            res = storescu(server.port, [f.path], calling=MODALITY, extra=f.proposal)
            assert res.returncode == 0, res.stdout + res.stderr
    finally:
        server.stop()
    vault.cli("backup", "init")
    run = vault.cli("backup", "run")
    assert "usb: snapshot" in run.stdout, run.stdout + run.stderr
    v = vault.open()
    try:
        digests = _digests(v)
    finally:
        v.close()
    assert len(digests) == len(files)
    try:
        yield Env(vault, db, bucket, repo, files, digests, root)
    finally:
        drop_database(db)


def test_the_index_dump_holds_no_patient_and_no_key(env: Env) -> None:
    from pacsvault.backup import pgindex, runner

    snaps = _snapshots(env)
    kinds = sorted(runner._kind(s) for s in snaps)
    assert kinds == ["data", "keystore", "pg-index"]
    dump = next(s for s in snaps if runner._kind(s) == "pg-index")
    data = next(s for s in snaps if runner._kind(s) == "data")
    assert set(dump["tags"]) & set(data["tags"]) - {"pacsvault"}  # the run pairs them
    v = env.vault.open()
    try:
        stream = runner._repo(v, runner._target(v, "usb")).dump(
            str(dump["id"]), f"/{pgindex.DUMP_FILE}")
    finally:
        v.close()
    assert stream.startswith(pgindex.MAGIC)
    assert b"PGDMP" in stream[:1 << 16]  # a pg_dump custom archive after the header
    for marker in _markers(env.files):
        assert marker not in stream, "a patient marker is in the index dump"
    with env.db.connect() as conn:
        wrapped = [bytes(r[0]) for r in conn.execute(
            "SELECT wrapped FROM data_keys WHERE wrapped IS NOT NULL")]
    assert wrapped and not any(w in stream for w in wrapped)  # keys: keystore only
    env.vault.cli("backup", "prune")  # the retention keeps a dump whose run it keeps
    assert sorted(runner._kind(s) for s in _snapshots(env)) == kinds


def test_refusals_say_why_and_add_no_snapshot(env: Env) -> None:
    from pacsvault.backup import runner

    before = len(_snapshots(env))
    old = env.root / "old-pg"
    old.mkdir()
    fake = old / "pg_dump"
    fake.write_text("#!/bin/sh\necho 'pg_dump (PostgreSQL) 11.22'\n")
    fake.chmod(0o755)
    env.vault.set_toml("backup", "pg_bin_dir", f'"{old}"')
    try:
        res = env.vault.cli("backup", "run", check=False)
    finally:
        env.vault.set_toml("backup", "pg_bin_dir", '""')
    assert res.returncode != 0
    assert "usb: FAILED: pg_dump 11 cannot back up this PostgreSQL 15 server" in res.stdout
    assert "nothing was backed up" in res.stdout

    # a pg_dump that writes its whole output, then fails: restic is killed before it
    # sees the end of its input, so no snapshot of that stream exists
    real = shutil.which("pg_dump") or "/usr/bin/pg_dump"
    failing = env.root / "failing-pg"
    failing.mkdir()
    (failing / "pg_dump").write_text(
        f'#!/bin/sh\nif [ "$1" = --version ]; then exec {real} --version; fi\n'
        f'{real} "$@"\necho "pg_dump: error: simulated failure" >&2\nexit 1\n')
    (failing / "pg_dump").chmod(0o755)
    env.vault.set_toml("backup", "pg_bin_dir", f'"{failing}"')
    try:
        res = env.vault.cli("backup", "run", check=False)
    finally:
        env.vault.set_toml("backup", "pg_bin_dir", '""')
    assert res.returncode != 0
    assert "usb: FAILED: pg_dump failed: pg_dump: error: simulated failure" in res.stdout
    assert len(_snapshots(env)) == before

    v = env.vault.open()
    try:  # the database goes away after the vault opened
        gone = v.settings.index.url.replace(f":{env.db.server.port}/", ":1/")
        v.settings = v.settings.model_copy(
            update={"index": v.settings.index.model_copy(update={"url": gone})})
        [outcome] = runner.run_backup(v)
    finally:
        v.close()
    assert not outcome.ok and outcome.error is not None
    assert "cannot be reached" in outcome.error and "127.0.0.1:1/" in outcome.error
    assert len(_snapshots(env)) == before
    assert not (env.vault.data / ".backup-staging").exists()


def test_drill_restores_into_a_scratch_database_and_drops_it(env: Env) -> None:
    res = env.vault.cli("backup", "drill")
    assert "drill usb: OK" in res.stdout, res.stdout + res.stderr
    assert f"{len(env.files)} object(s) authenticated" in res.stdout
    with env.db.server.connect(autocommit=True) as conn:
        left = [r[0] for r in conn.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE '%\\_drill\\_%'")]
    assert left == []


def test_restore_after_losing_database_bucket_and_machine(env: Env) -> None:
    """Destroys the module's vault: the last test of the module."""
    vault, server = env.vault, env.db.server
    code = _private(env.root / "code.txt", vault.recovery_code)
    new = env.root / "new"
    new_key = new / "keys" / "master.key"
    base = ("backup", "restore", "--repository", env.repo, "--to", new / "data",
            "--key-file", new_key, "--recovery-code-file", code)
    # refused, nothing written: no database named, or one that is not empty
    res = pv(*base, check=False)
    assert res.returncode != 0 and "--to-index" in res.stderr
    res = pv(*base, "--to-index", env.db.url, "--to-index-password-file",
             server.password_file, check=False)
    assert res.returncode != 0 and "is not empty" in res.stderr
    assert not (new / "data").exists() and not new_key.exists()

    # everything is lost
    drop_database(env.db)
    client = env.bucket.client()
    listed = client.list_objects_v2(Bucket=env.bucket.name).get("Contents", [])
    assert len(listed) == len(env.files)
    for item in listed:
        client.delete_object(Bucket=env.bucket.name, Key=item["Key"])
    shutil.rmtree(vault.data)
    vault.key.unlink()

    target = create_database(server, "pv_restored")
    try:
        res = pv(*base, "--to-index", target.url, "--to-index-password-file",
                 server.password_file)
        assert f"{len(env.files)} instances" in res.stdout
        assert f"PostgreSQL database 127.0.0.1:{server.port}/{target.name}" in res.stdout
        assert "restored as local files" in res.stdout
        restored = VaultDir(new, new_key, vault.recovery_code)
        toml = (restored.data / "pacsvault.toml").read_text()
        assert f'url = "{target.url}"' in toml
        v = restored.open()
        try:
            assert _digests(v) == env.digests  # every instance identical, authenticated
        finally:
            v.close()
        assert restored.cli("audit", "verify").returncode == 0
        running = start_server(restored)
        try:
            first = env.files[0]
            ask = Dataset()
            ask.QueryRetrieveLevel = "STUDY"
            ask.PatientName = first.patient_name
            ask.StudyInstanceUID = ""
            answers = c_find_json(running.port, ask, calling=MODALITY, called=AE)
        finally:
            running.stop()
        assert [a["0020000D"]["Value"][0] for a in answers] == [first.study_uid]
        markers = _markers(env.files)
        for path in restored.data.rglob("*"):
            if path.is_file() and path.name != "serve.log":
                blob = path.read_bytes()
                assert not any(m in blob for m in markers), f"a patient marker in {path.name}"
    finally:
        drop_database(target)


def test_embedded_index_with_a_bucket_backs_up_its_objects(
        tmp_path: Path, s3_server: S3Server) -> None:
    """An embedded index whose objects are in a bucket: the backup takes the objects too
    (their ciphertext mirror), so losing the bucket loses nothing; ``--to-index`` is
    refused for such a backup."""
    bucket = create_bucket(s3_server)
    key = tmp_path / "v" / "keys" / "master.key"
    proc = pv("init", "--data", tmp_path / "v" / "data", "--key-file", key, "--admin",
              "admin", "--storage-url", f"{bucket.url}/{PREFIX}",
              "--storage-endpoint", s3_server.endpoint, "--storage-region", s3_server.region,
              "--storage-credentials-file", s3_server.credentials_file,
              "--storage-ca-file", s3_server.ca_file, "--storage-path-style")
    found = first_run_secrets(proc.stdout)
    vault = VaultDir(tmp_path / "v", key, found.recovery_code)
    vault.add_node(MODALITY)
    repo = tmp_path / "repo"
    with open(vault.data / "pacsvault.toml", "a") as fh:
        fh.write(f'\n[[backup.targets]]\nname = "usb"\nrepository = "{repo}"\n')
    files = corpus.build(tmp_path / "corpus")[:2]
    server = start_server(vault)
    try:
        for f in files:
            res = storescu(server.port, [f.path], calling=MODALITY, extra=f.proposal)
            assert res.returncode == 0, res.stdout + res.stderr
    finally:
        server.stop()
    vault.cli("backup", "init")
    vault.cli("backup", "run")
    v = vault.open()
    try:
        before = _digests(v)
    finally:
        v.close()
    client = bucket.client()
    for item in client.list_objects_v2(Bucket=bucket.name).get("Contents", []):
        client.delete_object(Bucket=bucket.name, Key=item["Key"])
    shutil.rmtree(vault.data)
    key.unlink()
    code = _private(tmp_path / "code.txt", vault.recovery_code)
    new_key = tmp_path / "new" / "keys" / "master.key"
    base = ("backup", "restore", "--repository", repo, "--to", tmp_path / "new" / "data",
            "--key-file", new_key, "--recovery-code-file", code)
    res = pv(*base, "--to-index", "postgresql://pv@127.0.0.1:1/none", check=False)
    assert res.returncode != 0 and "holds an embedded index" in res.stderr
    res = pv(*base)
    assert "restored as local files" in res.stdout
    restored = VaultDir(tmp_path / "new", new_key, vault.recovery_code)
    v = restored.open()
    try:
        assert v.store.kind == "local"
        assert _digests(v) == before and len(before) == len(files)
    finally:
        v.close()
