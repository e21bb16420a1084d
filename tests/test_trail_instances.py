"""Several instances, one accountable trail (issue 16, part 3).

Two data directories of one vault (instances "main" and "b") share one real PostgreSQL
index (the harness's cluster, TLS verify-full). Each appends to its own signed chain
through the archive's group commit (``Archive.store``) and the recorder; every line is
copied into the index with the anchor, so ``audit verify`` on either instance checks both
chains, and ``audit show`` merges them. Damage done to B (its file cut, its rows deleted,
its anchor moved back with them) is found by verification on A.

B's data directory is made the way ``pacsvault instances add`` makes it (``vault.json``
with ``instance``, the same settings and CA) but without its bucket check: these tests
keep objects local to each instance, which the trail does not care about. The embedded
vault's trail tests (tests/test_audit*.py, test_trail_*.py, test_hardening_audit.py) run
unchanged on the default index.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import delete, select, update

from pacsvault import config
from pacsvault.audit import AuditEvent, EventCode, Outcome
from pacsvault.audit import instances as trail_instances
from pacsvault.index.models import AuditHead, AuditLine
from pacsvault.storage.archive import StoreStatus
from pacsvault.vault import Vault, create
from tests import corpus
from tests.harness.postgres import PostgresDatabase
from tests.harness.seaweed import S3Bucket
from tests.helpers import VaultDir, pv

shared = pytest.mark.postgres


def _join(a: VaultDir, name: str, root: Path) -> VaultDir:
    """B's data directory: what ``instances add`` writes, minus the listener pair."""
    data = root / "data"
    data.mkdir(parents=True, mode=0o700)
    shutil.copyfile(a.data / "pacsvault.toml", data / "pacsvault.toml")
    shutil.copytree(a.data / "tls", data / "tls")
    (data / "objects").mkdir(mode=0o700)
    (data / "audit").mkdir(mode=0o700)
    (data / "audit" / "trail.jsonl").touch(mode=0o600)
    meta = json.loads((a.data / "vault.json").read_text())
    meta["instance"] = name
    (data / "vault.json").write_text(json.dumps(meta))
    return VaultDir(root, a.key, a.recovery_code)


@pytest.fixture
def pair(tmp_path: Path, postgres_db: PostgresDatabase) -> Iterator[tuple[VaultDir, VaultDir]]:
    root = tmp_path / "a"
    key = root / "keys" / "master.key"
    index = config.IndexSettings(url=postgres_db.url,
                                 password_file=str(postgres_db.server.password_file))
    a = VaultDir(root, key, create(root / "data", key_file=key, ae_title="PVMAIN", index=index))
    yield a, _join(a, "b", tmp_path / "b")


def _event(action: str, n: int = 0) -> AuditEvent:
    return AuditEvent(action=action, outcome=Outcome.SUCCESS,
                      code=EventCode.APPLICATION_ACTIVITY, actor_user=f"user{n}")


def _store(vault: Vault, paths: list[Path]) -> None:
    for path in paths:
        assert vault.archive.store(path.read_bytes(), source_ae="MOD").status == \
            StoreStatus.STORED


def _load(pair: tuple[VaultDir, VaultDir], tmp_path: Path) -> None:
    """Stores and events on both instances, with checkpoints in between."""
    a, b = pair
    slices = corpus.synthetic_ct_series(tmp_path / "ct", 6)
    va, vb = a.open(), b.open()
    try:
        assert va.audit.instance == "main" and vb.audit.instance == "b"
        assert va.audit.copies and vb.audit.copies
        _store(va, slices[:3])
        va.recorder.emit(_event("test.a", 1))
        assert trail_instances.checkpoint(vb.audit, "start") is not None
        _store(vb, slices[3:])
        vb.recorder.emit(_event("test.b", 2))
        assert trail_instances.checkpoint(va.audit, "periodic") is not None
        va.recorder.emit(_event("test.a", 3))
    finally:
        va.close()
        vb.close()


def _verify(vault_dir: VaultDir) -> trail_instances.DeploymentVerdict:
    vault = vault_dir.open()
    try:
        return trail_instances.verify_all(vault.audit)
    finally:
        vault.close()


@shared
@pytest.mark.slow
def test_verify_on_either_instance_checks_both_chains(
        pair: tuple[VaultDir, VaultDir], tmp_path: Path) -> None:
    _load(pair, tmp_path)
    for side in pair:
        verdict = _verify(side)
        assert verdict.ok, verdict.problem
        assert {v.instance for v in verdict.instances} == {"main", "b"}
        assert all(v.records > 3 for v in verdict.instances)
    # Each instance's file and its copy in the index are line for line the same.
    a, b = pair
    vault = a.open()
    try:
        with vault.engine.connect() as conn:
            rows = conn.execute(select(AuditLine.instance, AuditLine.seq, AuditLine.line)
                                .order_by(AuditLine.instance, AuditLine.seq)).all()
            heads = {h.instance: h.seq for h in conn.execute(
                select(AuditHead.instance, AuditHead.seq)).all()}
    finally:
        vault.close()
    for name, side in (("main", a), ("b", b)):
        copied = [r.line for r in rows if r.instance == name]
        local = (side.data / "audit" / "trail.jsonl").read_text().splitlines()
        assert copied == local
        assert heads[name] == len(local)
    # The CLI says it per instance.
    out = pv("audit", "verify", "--data", b.data, "--key-file", b.key).stdout
    assert "instance main:" in out and "instance b:" in out
    assert "audit trail intact" in out and "over 2 instances" in out
    listed = pv("instances", "list", "--data", b.data, "--key-file", b.key).stdout
    assert "b (this one): last record" in listed and "main: last record" in listed


@shared
@pytest.mark.slow
def test_show_merges_both_instances_by_time(
        pair: tuple[VaultDir, VaultDir], tmp_path: Path) -> None:
    _load(pair, tmp_path)
    a, _b = pair
    out = pv("audit", "show", "--json", "--data", a.data, "--key-file", a.key).stdout
    records = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert {r["instance"] for r in records} == {"main", "b"}
    times = [r["time"] for r in records]
    assert times == sorted(times)
    actions = [(r["instance"], r["action"]) for r in records]
    assert ("b", "test.b") in actions and ("main", "test.a") in actions
    assert ("b", "dicom.store") in actions or any(
        inst == "b" and act.startswith("dicom") for inst, act in actions)
    # B's references are unsealed on A (one vault, one key): the filter by patient works.
    mine = pv("audit", "show", "--json", "--patient", "PVBATCH01", "--data", a.data,
              "--key-file", a.key).stdout
    assert {json.loads(line)["instance"] for line in mine.splitlines() if line.strip()} \
        >= {"main", "b"}


@shared
@pytest.mark.slow
def test_truncating_b_file_is_detected_on_a(
        pair: tuple[VaultDir, VaultDir], tmp_path: Path) -> None:
    _load(pair, tmp_path)
    _a, b = pair
    trail = b.data / "audit" / "trail.jsonl"
    lines = trail.read_bytes().splitlines(keepends=True)
    trail.write_bytes(b"".join(lines[:-2]))
    # B's next append (a checkpoint at its next start, any access) finds the cut and
    # flags its anchor; the index keeps the removed records.
    vb = b.open()
    try:
        vb.recorder.emit(_event("test.after-cut"))
    finally:
        vb.close()
    verdict = _verify(pair[0])
    assert not verdict.ok
    assert "instance b" in verdict.problem and "removed" in verdict.problem
    assert [v.ok for v in verdict.instances if v.instance == "main"] == [True]


@shared
@pytest.mark.slow
def test_deleting_b_rows_is_detected_on_a(
        pair: tuple[VaultDir, VaultDir], tmp_path: Path) -> None:
    _load(pair, tmp_path)
    a, _b = pair
    vault = a.open()
    try:
        with vault.engine.begin() as conn:
            last = conn.execute(select(AuditLine.seq).where(AuditLine.instance == "b")
                                .order_by(AuditLine.seq.desc())).scalars().first()
            assert last is not None
            conn.execute(delete(AuditLine).where(AuditLine.instance == "b",
                                                 AuditLine.seq > last - 2))
    finally:
        vault.close()
    verdict = _verify(a)
    assert not verdict.ok
    assert "instance b" in verdict.problem and "anchored" in verdict.problem


@shared
@pytest.mark.slow
def test_b_cut_everywhere_with_its_anchor_moved_back_is_found_by_a_checkpoint(
        pair: tuple[VaultDir, VaultDir], tmp_path: Path) -> None:
    """Someone with the database and B's disk removes B's last records from the file, the
    index and the anchor alike: only what A witnessed can tell."""
    _load(pair, tmp_path)
    a, b = pair
    vb = b.open()
    try:
        vb.recorder.emit(_event("test.b-late"))  # after this, A checkpoints B's head
    finally:
        vb.close()
    va = a.open()
    try:
        trail_instances.checkpoint(va.audit, "periodic")
        with va.engine.begin() as conn:
            witnessed = conn.execute(select(AuditHead.seq).where(AuditHead.instance == "b")
                                     ).scalar_one()
            keep = witnessed - 2
            kept = conn.execute(select(AuditLine.line).where(
                AuditLine.instance == "b", AuditLine.seq == keep)).scalar_one()
            conn.execute(delete(AuditLine).where(AuditLine.instance == "b",
                                                 AuditLine.seq > keep))
            from pacsvault.audit.trail_format import parse_line, record_hash

            body = parse_line(kept.encode())
            assert body is not None
            body.pop("sig")
            conn.execute(update(AuditHead).where(AuditHead.instance == "b")
                         .values(seq=keep, digest=record_hash(body)))
    finally:
        va.close()
    trail = b.data / "audit" / "trail.jsonl"
    trail.write_bytes(b"".join(trail.read_bytes().splitlines(keepends=True)[:keep]))
    verdict = _verify(a)
    assert not verdict.ok
    assert "instance b" in verdict.problem and "witnessed" in verdict.problem
    # B alone sees nothing wrong with its own file and anchor: the witness is A's.
    own = b.open()
    try:
        assert own.audit.verify().ok
    finally:
        own.close()


@shared
@pytest.mark.slow
def test_a_rewritten_b_record_is_detected_on_a(
        pair: tuple[VaultDir, VaultDir], tmp_path: Path) -> None:
    _load(pair, tmp_path)
    a, _b = pair
    vault = a.open()
    try:
        with vault.engine.begin() as conn:
            line = conn.execute(select(AuditLine.line).where(
                AuditLine.instance == "b", AuditLine.seq == 2)).scalar_one()
            conn.execute(update(AuditLine).where(AuditLine.instance == "b",
                                                 AuditLine.seq == 2)
                         .values(line=line.replace('"user":"', '"user":"x')))
    finally:
        vault.close()
    verdict = _verify(a)
    assert not verdict.ok and "instance b" in verdict.problem


def test_instances_add_is_refused_on_an_embedded_vault(tmp_path: Path) -> None:
    from tests.helpers import new_vault

    vault = new_vault(tmp_path)
    res = pv("instances", "add", "b", "--to", tmp_path / "b", "--data", vault.data,
             "--key-file", vault.key, check=False)
    assert res.returncode == 2
    assert "PostgreSQL" in res.stderr
    assert not (tmp_path / "b").exists()


@shared
@pytest.mark.s3
@pytest.mark.slow
def test_two_serve_instances_one_trail(tmp_path: Path, postgres_db: PostgresDatabase,
                                       s3_bucket: S3Bucket) -> None:
    """Two real ``serve`` processes (data directories A and B made by ``instances add``)
    on one PostgreSQL index and one SeaweedFS bucket: storescu to A, C-FIND on B finds
    the study, and after both stop ``audit verify`` on either holds over both chains, each
    holding checkpoints that witnessed the other."""
    from pydicom.dataset import Dataset
    from pynetdicom import AE as ClientAE
    from pynetdicom.sop_class import (  # type: ignore[attr-defined]
        StudyRootQueryRetrieveInformationModelFind,
    )

    from tests.helpers import AE, first_run_secrets, start_server, storescu
    from tests.test_s3_storage import use_bucket

    root_a = tmp_path / "a"
    root_a.mkdir()
    key = tmp_path / "keys" / "master.key"
    made = pv("init", "--data", root_a / "data", "--key-file", key, "--ae-title", AE,
              "--admin", "admin", "--index-url", postgres_db.url, "--index-password-file",
              postgres_db.server.password_file)
    a = VaultDir(root_a, key, first_run_secrets(made.stdout).recovery_code)
    use_bucket(a, s3_bucket)
    va = a.open()
    try:
        va.nodes.add("MODALITY", "127.0.0.1", roles=("store", "query"))
    finally:
        va.close()
    added = pv("instances", "add", "b", "--to", tmp_path / "b" / "data", "--host",
               "127.0.0.1", "--data", a.data, "--key-file", key)
    assert "NOT copied" in added.stdout
    assert key.read_bytes().hex() not in added.stdout
    b = VaultDir(tmp_path / "b", key, a.recovery_code)
    assert json.loads((b.data / "vault.json").read_text())["instance"] == "b"
    assert pv("instances", "add", "b", "--to", tmp_path / "c", "--data", a.data,
              "--key-file", key, check=False).returncode == 2  # the name is taken

    files = corpus.synthetic_ct_series(tmp_path / "ct", 4, size=32)
    server_a, server_b = start_server(a), start_server(b)
    try:
        sent = storescu(server_a.port, files, calling="MODALITY")
        assert sent.returncode == 0, sent.stderr
        client = ClientAE(ae_title="MODALITY")
        client.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        assoc = client.associate("127.0.0.1", server_b.port, ae_title=AE)
        assert assoc.is_established
        query = Dataset()
        query.QueryRetrieveLevel, query.PatientID, query.StudyInstanceUID = \
            "STUDY", "PVBATCH01", ""
        try:
            found = [ds for status, ds in assoc.send_c_find(
                query, StudyRootQueryRetrieveInformationModelFind)
                if status and status.Status in (0xFF00, 0xFF01) and ds is not None]
        finally:
            assoc.release()
        assert len(found) == 1
    finally:
        server_a.stop()
        server_b.stop()
    for side in (a, b):
        out = pv("audit", "verify", "--data", side.data, "--key-file", key).stdout
        assert "over 2 instances" in out, out
    shown = pv("audit", "show", "--json", "--data", b.data, "--key-file", key).stdout
    records = [json.loads(line) for line in shown.splitlines() if line.strip()]
    checkpoints = {(r["instance"], r["detail"].get("reason")) for r in records
                   if r["action"] == trail_instances.CHECKPOINT_ACTION}
    assert {("main", "start"), ("main", "stop"), ("b", "start"), ("b", "stop")} <= checkpoints
    assert any(r["instance"] == "main" and r["action"].startswith("dicom.")
               for r in records)
    assert any(r["instance"] == "b" and r["action"].startswith("dicom.")  # the C-FIND
               for r in records)


@shared
@pytest.mark.slow
def test_retention_seals_the_copy_as_the_file(
        pair: tuple[VaultDir, VaultDir], tmp_path: Path) -> None:
    """A's retention purge seals its file's prefix and its copy's alike: both instances
    still verify, and B's checkpoints witnessing sealed records of A are accepted."""
    import datetime as dt

    _load(pair, tmp_path)
    a, b = pair
    va = a.open()
    try:
        assert va.audit.purge_before(dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1),
                                     "test") > 0
        va.recorder.emit(_event("test.after-purge"))
        with va.engine.connect() as conn:
            first = conn.execute(select(AuditLine.line).where(AuditLine.instance == "main")
                                 .order_by(AuditLine.seq)).scalars().first()
        assert first is not None and '"kind":"seal"' in first
    finally:
        va.close()
    for side in (a, b):
        verdict = _verify(side)
        assert verdict.ok, verdict.problem
