"""Issue 16, part 5: ``migrate`` carries *every* table of the index, and what the rows
stand for still works on the other side.

One embedded vault holds at least one row of every table the index can hold: images of two
patients (one MR, two CT), nodes, a physician, an API token used once
and a revoked one, a failed sign-in, a share link whose code is still unused, two CT
instances queued for forwarding to a workstation that is down (dcmtk's storescp, started
only later), a breach register entry; the tables no workflow here fills get one synthetic
row through their ORM column types. The tables are read from the *database's catalog*, not
from a model list: a table that a future change adds and ``migrate`` does not carry (or
does not know) fails here.

Then ``migrate`` to the session's PostgreSQL + SeaweedFS, killed (SIGKILL) right after
the forward queue's rows were committed in the target and before its progress was saved,
and run again: every table's decoded rows (through the ORM types and the target's sealer)
equal the source's, except what the migration regenerates on purpose (the blind tokens:
equal to a rebuild from the decrypted rows, and every matching query answers as before;
the trail's anchor and copies: ``vault.migrated`` is appended). The migrated server: the
share link's code opens its study (rendered from the bucket); the token answers QIDO over
HTTPS, the revoked one is refused; the queued forward is delivered once the workstation is
up; the breach entry is listed; ``audit verify`` holds; every instance identical. Back to
the embedded backends: the same tables again, tokens empty (SQLCipher needs none).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import ssl
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid
from sqlalchemy import Integer, Table, TypeDecorator, func, inspect, select
from sqlalchemy.engine import Connection

from pacsvault.vault import Vault
from tests.harness.peers import StoreSCP, free_port
from tests.harness.postgres import PostgresDatabase, PostgresServer, create_database
from tests.harness.seaweed import S3Bucket, S3Server, create_bucket
from tests.helpers import VaultDir, make_vault, start_server
from tests.test_migrate import _parts, run_here
from tests.web_helpers import client

pytestmark = [pytest.mark.postgres, pytest.mark.s3, pytest.mark.slow]

MODALITY, FWD = "MIGTAB", "MIGFWD"
PHYSICIAN, PASSWORD = "drtables", "copper-meadow-violin-73-quiet-otter"
PREFIX = "pv/tables"
# Empty on the embedded index by design: blind tokens (SQLCipher encrypts the file whole)
# and the trail's index copies (one instance, nothing to share).
EMPTY_EMBEDDED = frozenset({"patient_tokens", "study_tokens", "series_tokens",
                            "audit_lines"})
# The schema's own bookkeeping, made by each index for itself (never carried).
BOOKKEEPING = frozenset({"alembic_version", "pacsvault_index_owner"})
TOKENS = ("patient_tokens", "study_tokens", "series_tokens")
TRAIL = ("audit_head", "audit_lines")  # moved by the migration's own record
QUERIES: tuple[tuple[str, dict[str, str]], ...] = (
    ("/studies", {"PatientName": "Quillfeather*"}),
    ("/studies", {"PatientName": "quillfeather^ottilie"}),
    ("/studies", {"PatientBirthDate": "19400101-19491231"}),
    ("/studies", {"StudyDate": "20240101-20240630"}),
    ("/studies", {"ReferringPhysicianName": "Marchbank*"}),
    ("/studies", {"PatientID": "PVMIGT02"}),
    ("/series", {"SeriesDate": "20240301-20240331"}),
    ("/series", {"Modality": "MR"}),
)


# --- the vault's content -------------------------------------------------------------------


@dataclass(frozen=True)
class Image:
    path: Path
    sop_uid: str
    study_uid: str
    series_uid: str
    modality: str


def _image(out: Path, n: int, *, name: str, pid: str, birth: str, study: str, series: str,
           date: str, modality: str) -> Image:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    sop_class = CTImageStorage if modality == "CT" else MRImageStorage
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = sop_class
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = name, pid, birth
    ds.StudyDate = ds.SeriesDate = date
    ds.StudyTime = "101500"
    ds.ReferringPhysicianName = "Marchbank^Ursula"
    ds.AccessionNumber, ds.StudyDescription = f"ACCMT{n}", "Knee"
    ds.Modality, ds.InstanceNumber, ds.SeriesNumber = modality, n + 1, 1
    ds.Rows = ds.Columns = 32
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = np.random.default_rng(n).integers(
        -1000, 2000, (32, 32), dtype=np.int16).tobytes()
    path = out / f"img{n}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return Image(path, str(ds.SOPInstanceUID), study, series, modality)


def _images(out: Path) -> list[Image]:
    out.mkdir(parents=True)
    ct_study, ct_series = generate_uid(), generate_uid()
    first = {"name": "Quillfeather^Ottilie", "pid": "PVMIGT01", "birth": "19450607"}
    return [
        _image(out, 0, **first, study=ct_study, series=ct_series, date="20240312",
               modality="CT"),
        _image(out, 1, **first, study=ct_study, series=ct_series, date="20240312",
               modality="CT"),
        _image(out, 2, name="Brackenridge^Amos", pid="PVMIGT02", birth="19620203",
               study=generate_uid(), series=generate_uid(), date="20240815", modality="MR"),
    ]


def _tables() -> dict[str, Table]:
    """Every table a vault's index may hold, by name: the index layout and the side
    tables (the forward queue and cursor, on their own metadata)."""
    from pacsvault.dicom import forward
    from pacsvault.vaultindex import layout_tables as _layout_tables

    return {t.name: t for t in [*_layout_tables(), *forward.metadata.sorted_tables]}


def _synthetic(conn: Connection, table: Table) -> dict[str, Any]:
    """One row for a table no workflow of this test fills, value by column type (a
    foreign key names the parent's first row); the single integer key is left to the
    database."""
    keys = list(table.primary_key.columns)
    row: dict[str, Any] = {}
    for column in table.columns:
        if len(keys) == 1 and column is keys[0] and column.type.python_type is int:
            continue
        if column.foreign_keys:
            parent = next(iter(column.foreign_keys)).column
            row[column.name] = conn.scalar(select(func.min(parent)))
            continue
        plain = (column.type.impl_instance if isinstance(column.type, TypeDecorator)
                 else column.type)  # a TypeDecorator's values are its impl's kind
        kind = plain.python_type
        length = getattr(plain, "length", None) or 16
        if kind is bool:
            row[column.name] = True
        elif kind is int:
            row[column.name] = 7
        elif kind is float:
            row[column.name] = 1.5
        elif kind is bytes:
            row[column.name] = hashlib.sha256(table.name.encode()).digest()[:min(length, 32)]
        elif kind is dt.datetime:
            row[column.name] = dt.datetime(2031, 2, 3, 4, 5, 6, 789000, tzinfo=dt.UTC)
        elif kind is dt.date:
            row[column.name] = dt.date(2031, 2, 3)
        else:  # hex: what most text columns hold (serials, digests, ids)
            row[column.name] = hashlib.sha256(
                f"{table.name}.{column.name}".encode()).hexdigest()[:min(length, 64)]
    return row


# --- what a database holds, decoded -------------------------------------------------------


def _plain(value: Any) -> Any:
    if isinstance(value, memoryview):
        return bytes(value)
    if isinstance(value, dt.datetime):  # SQLite: naive UTC; PostgreSQL: aware
        aware = value if value.tzinfo else value.replace(tzinfo=dt.UTC)
        return aware.astimezone(dt.UTC)
    return value


def snapshot(v: Vault) -> dict[str, list[dict[str, Any]]]:
    """Every table of the database's catalog (bookkeeping aside), its rows read through
    the column types (so through this index's sealer), in key order."""
    known = _tables()
    found = set(inspect(v.engine).get_table_names()) - BOOKKEEPING
    unknown = sorted(found - known.keys())
    assert not unknown, f"tables no one told the migration about: {unknown}"
    out: dict[str, list[dict[str, Any]]] = {}
    with v.engine.connect() as conn:
        for name in sorted(found):
            table = known[name]
            result = conn.execute(select(table).order_by(*table.primary_key.columns))
            out[name] = [{k: _plain(x) for k, x in r._mapping.items()} for r in result]
    return out


def assert_same_tables(before: dict[str, list[dict[str, Any]]],
                       after: dict[str, list[dict[str, Any]]]) -> None:
    """Same tables, same counts, same decoded rows, except the regenerated ones."""
    assert sorted(before) == sorted(after)
    for name in sorted(before):
        if name in TOKENS or name in TRAIL:
            continue
        assert len(before[name]) == len(after[name]), name
        assert before[name] == after[name], name
    # the anchor row: the same instance, not broken (its seq moved: vault.migrated)
    assert [(r["id"], r["instance"], r["broken"]) for r in before["audit_head"]] == \
        [(r["id"], r["instance"], r["broken"]) for r in after["audit_head"]]
    assert after["audit_head"][0]["seq"] > before["audit_head"][0]["seq"]


# --- the world ------------------------------------------------------------------------------


@dataclass
class World:
    vault: VaultDir
    images: list[Image]
    token: str
    revoked: str
    link: str
    code: str
    breach: str
    peer: StoreSCP
    pg: PostgresServer
    db: PostgresDatabase
    bucket: S3Bucket
    digests: dict[str, bytes] = field(default_factory=dict)  # stored bytes by SOP UID
    reference: dict[str, Any] = field(default_factory=dict)  # the embedded server's answers
    synthetic: list[str] = field(default_factory=list)
    before: dict[str, Any] = field(default_factory=dict)
    killed: Any = None
    there: Any = None
    after: dict[str, Any] = field(default_factory=dict)

    @property
    def ca(self) -> Path:
        return self.vault.data / "tls" / "ca.crt"

    def to_scale_out(self) -> list[str]:
        s3: S3Server = self.bucket.server
        return ["migrate", "--to-index", self.db.url,
                "--index-password-file", str(self.pg.password_file),
                "--to-storage", f"{self.bucket.url}/{PREFIX}",
                "--storage-endpoint", s3.endpoint, "--storage-region", s3.region,
                "--storage-credentials-file", str(s3.credentials_file),
                "--storage-ca-file", str(s3.ca_file), "--storage-path-style"]


def _fill(vault: VaultDir, images: list[Image], fwd_port: int) -> dict[str, str]:
    """Rows of every kind through the workflows that make them (in-process)."""
    from pacsvault.breach.model import Breach, new_id
    from pacsvault.breach.store import BreachRegister
    from pacsvault.deidentify.links import LinkTable
    from pacsvault.dicom import forward
    from pacsvault.sharing.links import ShareLinks

    vault.set_toml("forward", "rules", f'[{{ node = "{FWD}", modality = ["CT"] }}]')
    vault.set_toml("forward", "retry_seconds", "1.0")
    vault.set_toml("forward", "max_retry_seconds", "2.0")
    v = vault.open()
    try:
        v.nodes.add(MODALITY, "127.0.0.1", roles=("store", "query", "retrieve"))
        v.nodes.add(FWD, "127.0.0.1", fwd_port, roles=("retrieve",))  # nothing listens
        v.accounts.add_user(PHYSICIAN, ["physician"], PASSWORD, by="test")
        token = v.accounts.create_token(PHYSICIAN, "2d", label="script")
        revoked = v.accounts.create_token(PHYSICIAN, "2d", label="old script")
        assert v.accounts.revoke_token(revoked.token_id, by="test")
        assert v.accounts.verify_token(token.token, "127.0.0.1").ok  # a source row
        failed = v.accounts.authenticate(PHYSICIAN, "not-the-password", "127.0.0.1")
        assert not failed.ticket
        forward.tick(v)  # the cursor: from now on
        for image in images:
            v.archive.store(image.path.read_bytes(), source_ae=MODALITY)
        forward.tick(v)  # both CT queued, sent once to a node that is down: retried
        assert forward.pending(v) == {FWD: 2}
        links = ShareLinks(v.sessions, v.recorder, v.accounts.throttle, v.accounts.hasher,
                           hold=v.accounts.recorder.holding)
        made = links.create(PHYSICIAN, images[0].study_uid, days=3)
        now = dt.datetime.now(dt.UTC)
        breach = BreachRegister(v).open(Breach(
            id=new_id(now), title="Stolen laptop drill",
            aware_at=now.isoformat(timespec="seconds")),
                                        by="test")
        LinkTable(v, "tables-project").add({"PV-TABLES01": "PVMIGT02"})
    finally:
        v.close()
    return {"token": token.token, "revoked": revoked.token, "link": made.link_id,
            "code": made.code, "breach": breach.id}


def _fill_the_rest(vault: VaultDir) -> list[str]:
    """One synthetic row in every table still empty (but those empty by design)."""
    filled: list[str] = []
    v = vault.open()
    try:
        with v.engine.begin() as conn:
            for name, table in _tables().items():
                if name in EMPTY_EMBEDDED:
                    continue
                if not conn.scalar(select(func.count()).select_from(table)):
                    conn.execute(table.insert().values(**_synthetic(conn, table)))
                    filled.append(name)
    finally:
        v.close()
    return filled


def _digests(vault: VaultDir) -> dict[str, bytes]:
    v = vault.open()
    try:
        out = {}
        for location in v.archive.locate():
            out[location.sop_uid] = hashlib.sha256(v.archive.read(location)).digest()
        return out
    finally:
        v.close()


def _same_server(answer: Any) -> Any:
    return json.loads(re.sub(r"https://127\.0\.0\.1:\d+", "https://server", json.dumps(answer)))


def _web(port: int, ca: Path, token: str) -> httpx.Client:
    return httpx.Client(base_url=f"https://127.0.0.1:{port}/dicom-web",
                        verify=ssl.create_default_context(cafile=str(ca)), timeout=60,
                        trust_env=False, headers={"Authorization": f"Bearer {token}"})


def answers(port: int, world: World) -> dict[str, Any]:
    """The matching queries (blind tokens on PostgreSQL) and every instance's bytes."""
    out: dict[str, Any] = {}
    with _web(port, world.ca, world.token) as web:
        for path, params in QUERIES:
            res = web.get(path, params={**params, "includefield": "all"})
            assert res.status_code == 200, (path, params, res.status_code)
            found = sorted(_same_server(res.json()), key=json.dumps)
            assert found, (path, params)
            out[f"{path}?{sorted(params.items())}"] = found
        for image in world.images:
            res = web.get(f"/studies/{image.study_uid}/series/{image.series_uid}/instances/"
                          f"{image.sop_uid}", headers={
                              "Accept": 'multipart/related; type="application/dicom"; '
                                        'transfer-syntax=*'})
            [part] = _parts(res)
            out[image.sop_uid] = hashlib.sha256(part).hexdigest()
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, postgres_server: PostgresServer,
          s3_server: S3Server) -> Iterator[World]:
    root = tmp_path_factory.mktemp("migtables")
    vault = make_vault(root / "v")
    images = _images(root / "img")
    fwd_port = free_port()
    made = _fill(vault, images, fwd_port)
    peer = StoreSCP.start(FWD, root, "+B")
    try:
        w = World(vault, images, made["token"], made["revoked"], made["link"],
                  made["code"], made["breach"], peer, postgres_server,
                  create_database(postgres_server), create_bucket(s3_server))
        server = start_server(vault)
        try:
            w.reference = answers(server.https_port, w)
        finally:
            server.stop()
        w.synthetic = _fill_the_rest(vault)
        w.digests = _digests(vault)
        v = vault.open()
        try:
            w.before = snapshot(v)
        finally:
            v.close()
        # killed (SIGKILL) right after the forward queue's rows were committed in the
        # target, before its progress was saved; the next run continues
        w.killed = vault.cli(*w.to_scale_out(), "--kill-in-table", "forward_queue",
                             check=False)
        w.after["state"] = json.loads((vault.data / "migrate-state.json").read_text())
        w.there = run_here(vault, *w.to_scale_out())
        yield w
    finally:
        peer.stop()


# --- tests ----------------------------------------------------------------------------------


def test_every_table_has_rows_to_carry(world: World) -> None:
    """The test means something only if each table holds a row: a table added later is
    given one here (synthetic, by column type) or by the workflow that makes it."""
    from pacsvault.index import postgres
    from pacsvault.migrate import rows

    assert rows.BOOKKEEPING == BOOKKEEPING and postgres.OWNER_TABLE in BOOKKEEPING
    assert set(world.before) == set(_tables()), "a table of the layout is missing"
    for name, found in world.before.items():
        assert found or name in EMPTY_EMBEDDED, name
    for made_by_a_workflow in ("share_links", "api_tokens", "api_token_sources",
                               "forward_queue", "forward_cursor",
                               "instances", "data_keys", "nodes", "breach_versions",
                               "vault_secrets", "deidentify_links"):
        assert made_by_a_workflow not in world.synthetic


def test_killed_mid_copy_then_resumed(world: World) -> None:
    assert world.killed.returncode == -9, world.killed.stderr
    state = world.after["state"]
    assert state["phase"] == "index"
    queue = state["tables"].get("forward_queue", {})  # committed, not yet recorded
    assert not queue.get("copied") and not queue.get("done")
    assert state["tables"]["share_links"]["done"]
    assert world.there.returncode == 0, world.there.stderr
    assert f"{len(world.images)} instance(s) verified identical" in world.there.stderr


def test_every_table_carried_to_postgresql(world: World) -> None:
    from sqlalchemy import text

    from pacsvault.index import blind

    v = world.vault.open()
    try:
        assert v.engine.dialect.name == "postgresql"
        after = snapshot(v)
        assert_same_tables(world.before, after)
        # blind tokens: regenerated for each patient, study, series row; the same as a
        # rebuild from the decrypted rows writes (twice, rolled back: a name's tokens are
        # padded with random ones, so only the tokens both rebuilds share are compared,
        # and each row's count)
        for name in TOKENS:
            assert after[name], name
        rebuilt: list[dict[str, dict[int, set[bytes]]]] = []
        with v.engine.connect() as conn, conn.begin() as tx:
            for _ in range(2):
                blind.rebuild(conn)
                rebuilt.append({name: _by_row(conn.execute(
                    text(f"SELECT token, row_pk FROM {name}")).all())  # noqa: S608
                    for name in TOKENS})
            tx.rollback()
        for name in TOKENS:
            migrated = _by_row([(r["token"], r["row_pk"]) for r in after[name]])
            first, second = rebuilt[0][name], rebuilt[1][name]
            assert sorted(migrated) == sorted(first), name
            for pk, tokens in migrated.items():
                assert len(tokens) == len(first[pk]), (name, pk)
                fixed = first[pk] & second[pk]
                assert fixed and fixed <= tokens, (name, pk)
        # each serial key's sequence continues after the copied keys (side tables too)
        with v.engine.connect() as conn:
            for name, table in _tables().items():
                keys = list(table.primary_key.columns)
                if len(keys) != 1 or not isinstance(keys[0].type, Integer) or not after[name]:
                    continue
                sequence = conn.scalar(text("SELECT pg_get_serial_sequence(:t, :c)"),
                                       {"t": name, "c": keys[0].name})
                if sequence is not None:
                    last = conn.scalar(text(f"SELECT last_value FROM {sequence}"))  # noqa: S608
                    assert last >= max(r[keys[0].name] for r in after[name]), name
        # the trail's copies: every record line of the file, as the file has it (the
        # migration's own record made the first copy on PostgreSQL)
        from pacsvault.audit import instances

        trail = world.vault.data / "audit" / "trail.jsonl"
        assert [(r["instance"], r["seq"], r["line"]) for r in after["audit_lines"]] == \
            [("main", seq, line.decode()) for seq, line in instances.lines_of(trail, 0, 2**62)]
    finally:
        v.close()


def _by_row(found: Any) -> dict[int, set[bytes]]:
    out: dict[int, set[bytes]] = {}
    for token, pk in found:
        out.setdefault(int(pk), set()).add(bytes(token))
    return out


@pytest.fixture(scope="module")
def served(world: World) -> Iterator[Any]:
    """The migrated vault served from PostgreSQL + S3; the workstation now reachable."""
    assert world.there.returncode == 0, world.there.stderr
    v = world.vault.open()
    try:
        v.nodes.update(FWD, port=world.peer.port)
    finally:
        v.close()
    server = start_server(world.vault)
    try:
        yield server
    finally:
        server.stop()


def test_share_link_made_before_opens_its_study(world: World, served: Any) -> None:
    with client(served.https_port, world.ca) as colleague:
        assert colleague.get(f"/share/{world.link}").status_code == 200
        res = colleague.post(f"/share/{world.link}", data={"code": world.code.lower()})
        assert res.status_code == 303, res.text[:300]
        assert colleague.get(f"/share/{world.link}/study").status_code == 303
        studies = colleague.get("/dicom-web/studies",
                                headers={"accept": "application/dicom+json"})
        assert studies.status_code == 200
        assert [s["0020000D"]["Value"][0] for s in studies.json()] == \
            [world.images[0].study_uid]
        image = colleague.get(f"/share/{world.link}/image/0")  # rendered from the bucket
        assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"


def test_tokens_made_before_work_and_the_revoked_one_stays_refused(world: World,
                                                                  served: Any) -> None:
    assert answers(served.https_port, world) == world.reference  # every instance identical
    with _web(served.https_port, world.ca, world.revoked) as web:
        assert web.get("/studies").status_code == 401


def test_forward_queued_before_is_delivered(world: World, served: Any) -> None:
    from tests.helpers import wait_until

    wanted = {i.sop_uid for i in world.images if i.modality == "CT"}
    assert wait_until(lambda: wanted <= set(world.peer.files()), 60), served.log()[-3000:]
    received = world.peer.files()
    for image in world.images:
        if image.sop_uid in wanted:
            sent = dcmread(received[image.sop_uid])
            assert sent.PixelData == dcmread(image.path).PixelData
    assert not {i.sop_uid for i in world.images if i.modality == "MR"} & set(received)


def test_breach_entry_listed_and_trail_verifies(world: World, served: Any) -> None:
    from pacsvault.deidentify.links import LinkTable

    listed = run_here(world.vault, "breach", "list")
    assert world.breach in listed.stdout and "Stolen laptop drill" in listed.stdout
    v = world.vault.open()  # the link table and its shared secret came along (issue 16)
    try:
        assert LinkTable(v, "tables-project").read() == {"PV-TABLES01": "PVMIGT02"}
    finally:
        v.close()
    assert "intact" in run_here(world.vault, "audit", "verify").stdout


def test_back_to_embedded_carries_every_table(world: World, served: Any) -> None:
    served.stop()
    v = world.vault.open()
    try:
        before = snapshot(v)
    finally:
        v.close()
    back = run_here(world.vault, "migrate", "--to-index", "embedded", "--to-storage", "local")
    assert back.returncode == 0, back.stderr
    v = world.vault.open()
    try:
        assert v.engine.dialect.name == "sqlite"
        after = snapshot(v)
    finally:
        v.close()
    assert_same_tables(before, after)
    for name in TOKENS:
        assert before[name] and not after[name], name  # SQLCipher: none needed
    assert after["forward_queue"] == [] and after["forward_cursor"]  # delivered there
    assert "intact" in run_here(world.vault, "audit", "verify").stdout
    assert _digests(world.vault) == world.digests  # every instance identical
