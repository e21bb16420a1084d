"""What a scale-out deployment is and needs, in ``pacsvault status`` and on the Health page
(issue 16): the index backend, the object store, the scrubber and orphan sweep, the
instances sharing the index, and what protects the data when ``pacsvault backup`` cannot.

Against real components: the harness's PostgreSQL (TLS verify-full) and SeaweedFS S3
endpoint; an unreachable PostgreSQL is a private server (``running_postgres``) stopped by
the test, never the shared one. Also ``init --index-url`` undoing what it made when it
fails after the schema step, so a retry on the same database is not refused.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from pacsvault import config
from pacsvault.audit import instances as trail_instances
from pacsvault.backup.health import NO_BACKUP_WARNING
from pacsvault.cli.main import main
from pacsvault.status import gather
from pacsvault.status.deployment import STALE_CHECKPOINTS, index_unopened, instances_info
from pacsvault.status.text import BUCKET_BACKUP, SCALE_OUT_BACKUP, as_json, lines
from pacsvault.vault import create
from tests.harness.postgres import PostgresDatabase, create_database, running_postgres
from tests.harness.seaweed import S3Bucket
from tests.helpers import VaultDir
from tests.test_s3_storage import use_bucket
from tests.test_trail_instances import _join

PASSWORD = "copper-meadow-lantern-91-quiet-river"


def _index(db: PostgresDatabase) -> config.IndexSettings:
    return config.IndexSettings(url=db.url, password_file=str(db.server.password_file))


def _new(root: Path, db: PostgresDatabase) -> VaultDir:
    key = root / "keys" / "master.key"
    return VaultDir(root, key, create(root / "data", key_file=key, ae_title="PVSCALE",
                                      index=_index(db)))


@pytest.fixture
def scaleout(tmp_path: Path, postgres_db: PostgresDatabase,
             s3_bucket: S3Bucket) -> Iterator[VaultDir]:
    vault = _new(tmp_path / "a", postgres_db)
    use_bucket(vault, s3_bucket)
    yield vault


def _status(capsys: pytest.CaptureFixture[str], vault: VaultDir, *args: str,
            code: int = 0) -> str:
    capsys.readouterr()
    assert main(["status", *args, "--data", str(vault.data),
                 "--key-file", str(vault.key)]) == code
    return capsys.readouterr().out


def _tables(db: PostgresDatabase) -> int:
    with db.connect() as conn:
        row = conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")\
            .fetchone()
    assert row is not None
    return int(row[0])


@pytest.mark.postgres
@pytest.mark.s3
@pytest.mark.slow
def test_status_names_postgres_s3_scrub_and_instances(
        scaleout: VaultDir, postgres_db: PostgresDatabase, s3_bucket: S3Bucket,
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    server = postgres_db.server
    # a scrub and a sweep recorded (storage scrub runs both), and a second instance "b"
    # that checkpointed once
    capsys.readouterr()
    assert main(["storage", "scrub", "--data", str(scaleout.data),
                 "--key-file", str(scaleout.key)]) == 0
    b = _join(scaleout, "b", tmp_path / "b")
    opened_b = b.open()
    try:
        assert trail_instances.checkpoint(opened_b.audit, "start") is not None
    finally:
        opened_b.close()

    out = _status(capsys, scaleout)
    where = f"{server.host}:{server.port}/{postgres_db.name}"
    assert f"Index        PostgreSQL {where}, TLS verify-full; schema revision " in out
    assert "Warning      the PostgreSQL index" not in out  # loopback, verify-full anyway
    assert (f"Objects      S3 {s3_bucket.name}/" in out
            and f"at {s3_bucket.server.endpoint} (TLS verified (CA file)); reachable" in out)
    assert "Scrub        last pass " in out and "all present and intact" in out
    assert "Sweep        last orphan sweep " in out and "0 orphans removed" in out
    assert "Instances    2 sharing the index (this one: main; checkpoint every 300 s)" in out
    assert "  b                record 1; last checkpoint " in out and "(start)" in out
    assert "  main             this record" in out and "no checkpoint yet" in out
    # a PostgreSQL vault: what protects the data instead of 'pacsvault backup'
    assert f"Backup       WARNING {SCALE_OUT_BACKUP}" in out
    assert BUCKET_BACKUP not in out  # said by the line above, for the bucket too
    assert "Storage      0 B received; the encrypted objects are in the bucket" in out
    assert NO_BACKUP_WARNING not in out
    assert "ERROR" not in out
    assert server.password() not in out

    found = json.loads(_status(capsys, scaleout, "--json"))
    deployed = found["deployment"]
    assert deployed["index"]["backend"] == "postgresql" and deployed["index"]["reachable"]
    assert deployed["index"]["where"] == where and deployed["index"]["tls"] == "verify-full"
    assert deployed["index"]["revision"] == deployed["index"]["head"]
    assert deployed["objects"]["backend"] == "s3" and deployed["objects"]["reachable"]
    assert deployed["objects"]["scrub"]["missing"] == 0
    assert deployed["objects"]["scrub"]["complete"] is True
    assert [i["name"] for i in deployed["instances"]] == ["b", "main"]
    assert found["backup"]["warning"] == SCALE_OUT_BACKUP
    assert "objects_warning" not in found["backup"]
    assert found["storage"]["encrypted_bytes"] is None
    assert server.password() not in json.dumps(found)
    # nothing about a patient or an object in the state file the report reads
    state = json.loads((scaleout.data / "storage-scrub.json").read_text())
    assert set(state) == {"scrub", "sweep"}

    # the same report in-process; an instance silent for more than 3 intervals is a warning
    vault = scaleout.open()
    try:
        report = gather(vault, measure_objects=True)
        assert lines(report) == out.splitlines()
        assert as_json(report) == found
        later = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=STALE_CHECKPOINTS * 300 + 60)
        by_name = {i.name: i for i in instances_info(vault.engine, "main", 300, later)}
        assert by_name["b"].silent and not by_name["main"].silent  # main never served
    finally:
        vault.close()


@pytest.mark.postgres
@pytest.mark.s3
@pytest.mark.slow
def test_health_page_shows_the_backends_in_english_and_french(scaleout: VaultDir,
                                                             tmp_path: Path) -> None:
    from tests.web_helpers import FakeClock, local_web

    b = _join(scaleout, "b", tmp_path / "b")
    opened_b = b.open()
    try:
        assert trail_instances.checkpoint(opened_b.audit, "start") is not None
    finally:
        opened_b.close()
    with local_web(scaleout, FakeClock()) as web:
        web.accounts.add_user("chief", ["admin"], PASSWORD)
        browser = web.browser()
        try:
            web.sign_in(browser, "chief", PASSWORD)
            page = browser.get("/admin/health")
            assert page.status_code == 200, page.text
            html = page.text
            assert 'id="deployment" data-index="postgresql" data-objects="s3"' in html
            assert 'id="index-backend" data-reachable="yes"' in html
            assert 'id="object-backend" data-reachable="yes"' in html
            assert "TLS verify-full" in html and "TLS verified" in html
            assert "reachable, schema revision" in html
            assert 'id="backup-scale-out"' in html and 'id="backup-none"' not in html
            assert 'id="backup-bucket"' not in html
            assert "No object scrub recorded yet" in html
            assert 'data-instance="b" data-silent="no"' in html and "running" in html
            assert 'data-instance="main"' in html and "(this one)" in html

            french = browser.get("/admin/health", headers={"accept-language": "fr"})
            assert french.status_code == 200
            html = french.text
            assert "Déploiement" in html and "Stockage des objets" in html
            assert "joignable, révision du schéma" in html and "TLS vérifié" in html
            assert "prennent l’index PostgreSQL (un pg_dump)" in html  # no target yet
            assert "versionnage ou la réplication du bucket" in html
            assert "Aucune vérification des objets enregistrée" in html
            assert "Instances qui partagent l’index" in html and "en service" in html
        finally:
            browser.close()


@pytest.mark.s3
def test_embedded_index_with_a_bucket_keeps_its_backup_line(
        vault: VaultDir, s3_bucket: S3Bucket, capsys: pytest.CaptureFixture[str]) -> None:
    use_bucket(vault, s3_bucket)
    out = _status(capsys, vault)
    assert f"Index        embedded (SQLCipher, {vault.data / 'index.db'}); schema " in out
    assert f"Objects      S3 {s3_bucket.name}/" in out and "; reachable" in out
    assert "Instances" not in out  # one instance on an embedded index
    assert f"Backup       WARNING {NO_BACKUP_WARNING}" in out  # unchanged
    assert f"Backup       WARNING {BUCKET_BACKUP}" in out
    assert SCALE_OUT_BACKUP not in out


@pytest.mark.s3
def test_an_unreachable_bucket_is_a_red_line(
        vault: VaultDir, s3_bucket: S3Bucket, capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    with socket.socket() as closed:  # a loopback port nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    use_bucket(vault, s3_bucket, endpoint=f'"https://127.0.0.1:{port}"')
    out = _status(capsys, vault, code=1)
    objects = next(line for line in out.splitlines() if line.startswith("Objects"))
    assert objects.startswith(f"Objects      ERROR S3 {s3_bucket.name}/") and \
        f"at https://127.0.0.1:{port} (TLS verified (CA file)): UNREACHABLE (S3 " in objects
    assert "Index        embedded" in out and "Traceback" not in out
    found = json.loads(_status(capsys, vault, "--json", code=1))
    assert found["deployment"]["objects"]["reachable"] is False


@pytest.mark.postgres
@pytest.mark.slow
def test_unreachable_postgres_is_a_red_line_not_a_traceback(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with running_postgres() as pg:
        db = create_database(pg)
        vault = _new(tmp_path / "v", db)
        opened = vault.open()
        try:
            pg.stop()
            # gone after the vault opened (the Health page's case): a fact of the report
            report = gather(opened, probe=True, check_audit=True)
            assert report.deployment is not None and not report.deployment.index.reachable
            assert report.deployment.bad and report.audit is None
            assert any(line.startswith("Index        ERROR PostgreSQL ")
                       for line in lines(report))
        finally:
            opened.close()

        # gone before: status cannot open the vault, and says why in its report
        out = _status(capsys, vault, code=1)
        index_line = next(line for line in out.splitlines() if line.startswith("Index"))
        where = f"{pg.host}:{pg.port}/{db.name}"
        assert index_line.startswith(
            f"Index        ERROR PostgreSQL {where}, TLS verify-full: the PostgreSQL index "
            f"at {where} cannot be used: "), index_line
        assert "Objects      local files (" in out
        assert "Traceback" not in out and pg.password() not in out
        found = json.loads(_status(capsys, vault, "--json", code=1))
        assert found["deployment"]["index"]["reachable"] is False
        assert found["deployment"]["index"]["error"]
        assert found["server"] == {"running": False}
        pg.start()  # for the harness's own stop


def test_a_weak_tls_mode_to_a_remote_database_is_a_warning(tmp_path: Path) -> None:
    def info(url: str) -> tuple[str, str | None]:
        found = index_unopened(config.IndexSettings(url=url), tmp_path, "not asked")
        return found.describe, found.weakness

    described, weakness = info("postgresql://pv@db.example.net:5433/pacs?sslmode=require")
    assert described == "PostgreSQL db.example.net:5433/pacs, TLS require"
    assert weakness is not None and "sslmode=require" in weakness
    assert info("postgresql://pv@db.example.net/pacs")[0].endswith("TLS prefer")
    assert info("postgresql://pv@db.example.net/pacs?sslmode=verify-full&sslrootcert="
                "/etc/ca.crt")[1] is None
    assert info("postgresql://pv@127.0.0.1/pacs?sslmode=disable")[1] is None  # loopback
    assert "/etc/ca.crt" not in info("postgresql://pv@db.example.net/pacs?sslmode=verify-"
                                     "full&sslrootcert=/etc/ca.crt")[0]


def _init(root: Path, db: PostgresDatabase) -> int:
    return main(["init", "--data", str(root / "data"), "--key-file",
                 str(root / "keys" / "master.key"), "--admin", "chief", "--index-url", db.url,
                 "--index-password-file", str(db.server.password_file)])


@pytest.mark.postgres
@pytest.mark.slow
def test_init_failing_after_the_schema_step_leaves_the_database_free(
        tmp_path: Path, postgres_db: PostgresDatabase, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    # 1. inside the vault's creation, after the schema was laid out: an 'audit' directory
    # already in the data directory makes the trail's mkdir fail
    root = tmp_path / "one"
    (root / "data" / "audit").mkdir(parents=True)
    assert _init(root, postgres_db) != 0
    assert _tables(postgres_db) == 0  # the claim and the schema dropped
    assert not (root / "keys" / "master.key").exists()

    # 2. after the vault was made: the first administrator cannot be created
    import pacsvault.cli.setup as setup

    def broken(*_args: object) -> tuple[str, int, Path]:
        raise OSError("no space left on device")

    monkeypatch.setattr(setup, "_first_admin", broken)
    root = tmp_path / "two"
    assert _init(root, postgres_db) != 0
    assert _tables(postgres_db) == 0
    assert not (root / "data" / "vault.json").exists()
    assert not (root / "keys" / "master.key").exists()
    monkeypatch.undo()

    # the retry on the same database succeeds
    capsys.readouterr()
    assert _init(root, postgres_db) == 0
    assert _tables(postgres_db) > 10
    # and a failing init never drops another vault's index
    monkeypatch.setattr(setup, "_first_admin", broken)
    shutil.rmtree(tmp_path / "one")
    assert _init(tmp_path / "one", postgres_db) != 0  # refused: the database is taken
    vault = VaultDir(root, root / "keys" / "master.key", "")
    opened = vault.open()
    try:
        with opened.engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM pacsvault_index_owner")).scalar() == 1
    finally:
        opened.close()
