"""Several instances, one deployment (issue 16, part 3): what used to be files under one
data directory (the breach register, the de-identification link tables, the named secrets
they are keyed by) lives in the shared index, so every instance sees the same.

Two data directories of one vault ("main" and "b", made as ``instances add`` makes them)
share one real PostgreSQL index (the harness's cluster, TLS verify-full) and one SeaweedFS
bucket. Checked: a breach recorded on A is listed, read and put in a notification draft
(PDF and Markdown) on B; two writers of the same version: one wins, the other is told; the
same project gives the same pseudonyms on A and B, and the link lines written on A are
read on B; an erasure on A removes the patient's lines B would read, and an erasure asked
on A is confirmed by a second administrator on B (the subject digests agree); a register
and a link table left as files by an older version are imported on first use (a directory
whose own ``vault.json`` key differed is re-encrypted under the deployment's); two
instances asking for a new shared secret at the same moment agree; the 72-hour clock
ticking on both alerts once; a TLS node bundle issued on A is delivered once, by B; the
same link added on both at once is one line; a ``pg_dump`` shows none of it; on one
instance, a master key rotation reseals the shared secrets (register and link table read
the same after). ``pacsvault migrate`` carrying the new tables: tests/test_migrate_tables.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import hashlib
import hmac
import io
import json
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pypdf import PdfReader
from sqlalchemy import select

from pacsvault import config
from pacsvault.breach import clock as breach_clock
from pacsvault.breach import documents
from pacsvault.breach.model import Breach, BreachError, new_id
from pacsvault.breach.store import FORMAT, IMPORTED_NAME, SECRET_NAME, BreachRegister
from pacsvault.crypto import keys
from pacsvault.deidentify import links as link_tables
from pacsvault.deidentify.export import project_pseudonyms
from pacsvault.deidentify.links import LinkTable
from pacsvault.index.deployment_state import BreachVersionRow, LinkRow, VaultSecretRow
from pacsvault.index.sealing import SealedColumnError, sealer_for
from pacsvault.storage.erasure import Eraser
from pacsvault.vault import Vault, create
from pacsvault.web import node_bundle
from tests.harness.postgres import (
    PostgresDatabase,
    PostgresServer,
    create_database,
    drop_database,
)
from tests.harness.seaweed import S3Server, create_bucket, delete_bucket
from tests.helpers import VaultDir
from tests.test_erasure import Admins, make, store
from tests.test_trail_instances import _join

pytestmark = [pytest.mark.postgres, pytest.mark.s3, pytest.mark.slow]

NOW = dt.datetime(2031, 5, 6, 7, 8, 9, tzinfo=dt.UTC)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory, postgres_server: PostgresServer,
         s3_server: S3Server) -> Iterator[tuple[Vault, Vault]]:
    """Open handles of both instances for the whole module (one vault, one index, one
    bucket)."""
    tmp = tmp_path_factory.mktemp("deployment")
    postgres_db_module = create_database(postgres_server)
    bucket = create_bucket(s3_server)
    root = tmp / "a"
    key = root / "keys" / "master.key"
    index = config.IndexSettings(url=postgres_db_module.url,
                                 password_file=str(postgres_db_module.server.password_file))
    storage = config.StorageSettings(
        url=f"{bucket.url}/pv", endpoint=s3_server.endpoint, region=s3_server.region,
        credentials_file=str(s3_server.credentials_file), path_style=True,
        ca_file=str(s3_server.ca_file))
    a = VaultDir(root, key, create(root / "data", key_file=key, ae_title="PVMAIN", index=index,
                                   storage=storage))
    a.set_toml("retention", "solo_practice", "true")  # one administrator erases
    b = _join(a, "b", tmp / "b")
    # an older vault's own secrets in A's vault.json (made before they moved to the index):
    # the deployment takes them at first use, so A's old files still open
    va = a.open()
    va._secrets._put(SECRET_NAME, b"A" * 32)  # a vault from before
    va._secrets._put(keys.DEIDENTIFY_SECRET, b"D" * 32)
    va.close()
    va, vb = a.open(), b.open()  # A's open offers them to the index
    try:
        yield va, vb
    finally:
        va.close()
        vb.close()
        with contextlib.suppress(Exception):
            drop_database(postgres_db_module)
        with contextlib.suppress(Exception):
            delete_bucket(bucket)


def _old_breach_file(vault: Vault, secret: bytes, breach: Breach) -> None:
    """A version as the file-based register (before issue 16) wrote it."""
    breach.version = 1
    aad = f"{FORMAT}:{breach.id}:1".encode()
    nonce = secrets.token_bytes(12)
    plain = json.dumps(breach.to_json(), sort_keys=True).encode()
    folder = vault.layout.root / "breaches" / breach.id
    folder.mkdir(parents=True, mode=0o700)
    (folder / "v000001.enc").write_bytes(nonce + AESGCM(secret).encrypt(nonce, plain, aad))


def _old_link_file(vault: Vault, secret: bytes, project: str, lines: dict[str, str]) -> None:
    key = keys.project_key(secret, vault.vault_id, "", keys.PURPOSE_DEIDENTIFY_LINKS)
    name = hmac.new(key, b"file:" + project.encode(), hashlib.sha256).hexdigest()[:32]
    out = []
    for pseudonym, patient_id in lines.items():
        nonce = secrets.token_bytes(12)
        row = json.dumps({"pseudonym": pseudonym, "patient_id": patient_id}).encode()
        out.append(base64.b64encode(
            nonce + AESGCM(key).encrypt(nonce, row, b"link:" + name.encode())) + b"\n")
    folder = vault.layout.root / link_tables.LINKS_DIR
    folder.mkdir(exist_ok=True, mode=0o700)
    (folder / f"{name}.links").write_bytes(b"".join(out))


def test_old_files_imported_on_first_use(pair: tuple[Vault, Vault]) -> None:
    va, vb = pair
    old = Breach(id=new_id(NOW), title="Old register entry", aware_at=NOW.isoformat())
    _old_breach_file(va, b"A" * 32, old)
    _old_link_file(va, b"D" * 32, "old-project", {"PV-OLD1": "PVOLD001"})
    # B's directory had made its own register key (the divergence of a file-based era)
    stray = Breach(id=new_id(NOW), title="Recorded on B before", aware_at=NOW.isoformat())
    vb._secrets._put(SECRET_NAME, b"B" * 32)
    _old_breach_file(vb, b"B" * 32, stray)
    BreachRegister(va)  # first use on A: A's files in, under A's (now the deployment's) key
    BreachRegister(vb)  # on B: re-encrypted under the deployment's key
    for vault in (va, vb):
        assert not (vault.layout.root / "breaches").exists()
        assert (vault.layout.root / IMPORTED_NAME).is_dir()  # kept, never read again
        titles = {r.id: r.title for r in BreachRegister(vault).all()}
        assert titles[old.id] == "Old register entry"
        assert titles[stray.id] == "Recorded on B before"
    # the link file: imported by B's first use as well as A's (one index), read on both
    assert LinkTable(vb, "old-project").read() == {}  # B has no file; A's not yet in
    assert LinkTable(va, "old-project").read() == {"PV-OLD1": "PVOLD001"}
    assert LinkTable(vb, "old-project").read() == {"PV-OLD1": "PVOLD001"}
    assert not (va.layout.root / link_tables.LINKS_DIR).exists()
    assert va.named_secret(keys.DEIDENTIFY_SECRET) == b"D" * 32 == vb.named_secret(
        keys.DEIDENTIFY_SECRET)


def test_breach_recorded_on_a_is_seen_on_b(pair: tuple[Vault, Vault]) -> None:
    va, vb = pair
    opened = BreachRegister(va, clock=lambda: NOW).open(Breach(
        id=new_id(NOW), title="Laptop left on a train", aware_at=NOW.isoformat(),
        circumstances_text="the reading room laptop, unencrypted disk"), by="dpo")
    on_b = BreachRegister(vb)
    assert opened.id in on_b.ids()
    record = on_b.get(opened.id)
    assert record.title == "Laptop left on a train" and record.version == 1
    # the DPO on B drafts the notification from what A recorded
    for lang in ("en", "fr"):
        draft = documents.build("notification", record, lang, NOW)
        text = draft.to_markdown().replace("\\-", "-")  # Markdown escapes the hyphens
        assert opened.id in text and "Laptop left on a train" in text
        pdf = "".join(p.extract_text() for p in PdfReader(io.BytesIO(draft.to_pdf())).pages)
        assert opened.id in pdf and "the reading room laptop" in pdf
    # B changes it, A reads B's version
    on_b.update(opened.id, lambda r: setattr(r, "systems", "PACS workstation"), by="dpo-b")
    assert BreachRegister(va).get(opened.id).systems == "PACS workstation"
    assert BreachRegister(va).versions(opened.id) == [1, 2]
    # two instances writing the same next version at once: the row's uniqueness settles it
    stale = BreachRegister(va).get(opened.id, 1)
    with pytest.raises(BreachError, match="changed meanwhile"):
        BreachRegister(va)._write(stale, 2, "dpo-a", "", "breach.updated")
    assert BreachRegister(vb).get(opened.id).updated_by == "dpo-b"
    # what a dump shows: ids and ciphertext, never the facts
    with vb.engine.connect() as conn:
        blobs = list(conn.execute(select(BreachVersionRow.blob)).scalars())
        sealed = [bytes(row[0]) for row in  # as the database holds them
                  conn.exec_driver_sql("SELECT secret FROM vault_secrets")]
    assert blobs and all(b"Laptop" not in blob and b"train" not in blob for blob in blobs)
    assert len(sealed) >= 2 and all(base64.b64encode(b"A" * 32) not in raw and
                                    b"A" * 32 not in raw for raw in sealed)


def test_same_pseudonyms_and_links_on_both_and_erasure_reaches_them(
        pair: tuple[Vault, Vault]) -> None:
    va, vb = pair
    on_a, on_b = project_pseudonyms(va, "trial-7"), project_pseudonyms(vb, "trial-7")
    assert on_a.patient("PVSCALE1") == on_b.patient("PVSCALE1")
    assert on_a.uid("1.2.3.4") == on_b.uid("1.2.3.4")
    assert on_a.shift_days("PVSCALE1") == on_b.shift_days("PVSCALE1")
    assert on_a.patient("PVSCALE1") != project_pseudonyms(vb, "trial-8").patient("PVSCALE1")
    # A exports (link table on), B's export of the same patient adds nothing new
    erased, kept = on_a.patient("PVSCALE1"), on_a.patient("PVSCALE2")
    LinkTable(va, "trial-7").add({erased: "PVSCALE1", kept: "PVSCALE2"})
    LinkTable(vb, "trial-7").add({on_b.patient("PVSCALE1"): "PVSCALE1"})
    LinkTable(vb, "trial-8").add({"PV-OTHER": "PVSCALE1"})
    assert LinkTable(vb, "trial-7").read() == {erased: "PVSCALE1", kept: "PVSCALE2"}
    with va.engine.connect() as conn:
        assert conn.scalar(select(LinkRow.pk).where(LinkRow.project == LinkTable(
            va, "trial-7").project).order_by(LinkRow.pk.desc())) is not None
    # the patient's erasure, run on A, takes their lines out of every table, B's included
    store(va, make("PVSCALE1"))
    eraser = Eraser(va)
    eraser.admins = Admins("alice")  # type: ignore[method-assign]
    eraser.erase_solo("PVSCALE1", "", "retention over, scale-out test", "retention-ended",
                      "PVSCALE1", actor="alice", via="test")
    assert LinkTable(vb, "trial-7").read() == {kept: "PVSCALE2"}
    assert LinkTable(vb, "trial-8").read() == {}
    with vb.engine.connect() as conn:
        raw = b"".join(bytes(b) for b in conn.execute(select(LinkRow.blob)).scalars())
    assert b"PVSCALE" not in raw and erased.encode() not in raw


def test_two_instances_agree_on_a_new_secret(pair: tuple[Vault, Vault]) -> None:
    va, vb = pair
    name = "erasure-subject"
    with va.sessions.begin() as session:  # as if neither had made it yet
        row = session.get(VaultSecretRow, name)
        if row is not None:
            session.delete(row)
    va._secrets._shared.clear()
    vb._secrets._shared.clear()
    start, answers = threading.Barrier(2), {}

    def ask(label: str, vault: Vault) -> None:
        start.wait(10)
        answers[label] = vault.named_secret(name)

    threads = [threading.Thread(target=ask, args=(n, v)) for n, v in (("a", va), ("b", vb))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert answers["a"] == answers["b"] and len(answers["a"]) == 32


def test_the_72_hour_clock_alerts_once_whoever_ticks(pair: tuple[Vault, Vault]) -> None:
    """Both instances run the breach clock job: each alert is sent by one of them only,
    also when they tick at the same moment (the step is claimed as a unique version
    first) or one after the other with a register read before the other's step."""
    va, vb = pair
    aware = dt.datetime(2031, 1, 5, 8, 0, tzinfo=dt.UTC)
    opened = BreachRegister(va, clock=lambda: aware).open(
        Breach(id="", aware_at=aware.isoformat(), title="clock on two"), by="dpo")
    sent: list[tuple[str, int]] = []
    lock = threading.Lock()

    def tick(vault: Vault, hours: float, start: threading.Barrier) -> None:
        start.wait(10)
        found = breach_clock.tick(vault, now=aware + dt.timedelta(hours=hours))
        with lock:
            sent.extend(t for t in found if t[0] == opened.id)

    for hours in (48.5, 49.0, 66.5, 67.0):
        start = threading.Barrier(2)
        threads = [threading.Thread(target=tick, args=(v, hours, start)) for v in (va, vb)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    assert sorted(sent) == [(opened.id, 48), (opened.id, 66)]
    steps = [s.what for s in BreachRegister(vb).get(opened.id).steps]
    assert steps.count("clock-48h") == 1 and steps.count("clock-66h") == 1


def test_erasure_asked_on_a_confirmed_on_b(pair: tuple[Vault, Vault]) -> None:
    va, vb = pair
    patient = make("PVTWO001")
    store(va, patient)
    LinkTable(va, "trial-9").add({"PV-TWO": "PVTWO001"})
    asked = Eraser(va).request("PVTWO001", "", "retention over, two instances",
                               "retention-ended", actor="alice")
    on_b = Eraser(vb)
    assert on_b.subject("PVTWO001") == Eraser(va).subject("PVTWO001")
    assert any(r.id == asked for r in on_b.requests(pending_only=True))
    result = on_b.confirm(asked, actor="bob", via="test")
    assert [done.instances for done in result.erased] == [1]
    assert LinkTable(va, "trial-9").read() == {}
    assert list(va.archive.locate(study_uid=patient.study)) == []


def test_master_key_rotation_reseals_the_shared_secrets(
        tmp_path: Path, postgres_db: PostgresDatabase) -> None:
    """One instance on PostgreSQL (rotation needs one): the register and the link table
    written before ``keys rotate`` read the same after it; the secrets' row opens with the
    new key only (``vault_secrets`` is a sealed column like the others)."""
    from tests.test_postgres_index import make_pg_vault

    vault = make_pg_vault(tmp_path / "one", postgres_db.server, postgres_db.url)
    v = vault.open()
    try:
        opened = BreachRegister(v, clock=lambda: NOW).open(
            Breach(id="", aware_at=NOW.isoformat(), title="before rotation"), by="dpo")
        LinkTable(v, "rotated").add({"PV-ROT": "PVROT001"})
        secret = v.named_secret(SECRET_NAME)
    finally:
        v.close()
    old = keys.read_key_file(vault.key)[0]
    vault.cli("keys", "rotate")
    v = vault.open()
    try:
        assert BreachRegister(v).get(opened.id).title == "before rotation"
        assert LinkTable(v, "rotated").read() == {"PV-ROT": "PVROT001"}
        assert v.named_secret(SECRET_NAME) == secret
        with v.engine.connect() as conn:
            raw = bytes(conn.exec_driver_sql(
                "SELECT secret FROM vault_secrets WHERE name = 'breach-register'").scalar_one())
    finally:
        v.close()
    vault_id = json.loads((vault.data / "vault.json").read_text())["vault_id"]
    with pytest.raises(SealedColumnError):
        sealer_for(old, vault_id).open("vault_secrets.secret", raw)


def test_node_bundle_issued_on_a_downloaded_once_from_b(pair: tuple[Vault, Vault]) -> None:
    """The admin's two clicks may reach two instances: issued on A, delivered by B, and
    then by neither again."""
    va, vb = pair
    va.nodes.add("PVBUNDLE", "127.0.0.1", 11112, tls=True, client_cert=True,
                 roles=("store", "retrieve"))
    node = va.nodes.get("PVBUNDLE")
    assert node is not None
    issued = node_bundle.issue(va, node)
    assert node_bundle.pending(vb, "PVBUNDLE")
    bundle = node_bundle.take(vb, "PVBUNDLE")
    assert sorted(bundle.serials) == sorted(f"{c.serial:x}" for c in issued)
    assert b"-----BEGIN PRIVATE KEY-----" in bundle.pem
    for vault in (va, vb):
        assert not node_bundle.pending(vault, "PVBUNDLE")
        with pytest.raises(node_bundle.BundleGone):
            node_bundle.take(vault, "PVBUNDLE")


def test_same_link_added_on_both_at_once_is_one_line(pair: tuple[Vault, Vault]) -> None:
    va, vb = pair
    pseudonym = project_pseudonyms(va, "race").patient("PVRACE01")
    start = threading.Barrier(2)
    errors: list[BaseException] = []

    def add(vault: Vault) -> None:
        start.wait(10)
        try:
            LinkTable(vault, "race").add({pseudonym: "PVRACE01"})
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=add, args=(v,)) for v in (va, vb)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors
    assert LinkTable(va, "race").read() == {pseudonym: "PVRACE01"}
    with va.engine.connect() as conn:
        lines = conn.execute(select(LinkRow.pk).where(
            LinkRow.project == LinkTable(va, "race").project)).all()
    assert len(lines) == 1


def test_a_database_dump_shows_none_of_it(pair: tuple[Vault, Vault],
                                          postgres_server: PostgresServer) -> None:
    """What the module wrote (breaches, link lines, secrets, bundles), as ``pg_dump``
    shows it: no patient ID, pseudonym, project name, breach text or secret."""
    va, _vb = pair
    database = va.engine.url.database
    assert database
    dump = postgres_server.dump(database)
    assert b"breach_versions" in dump and b"deidentify_links" in dump
    pseudonyms = [project_pseudonyms(va, project).patient(pid).encode() for project, pid in (
        ("race", "PVRACE01"), ("trial-7", "PVSCALE2"))]
    for marker in (b"PVOLD001", b"PVSCALE2", b"PVRACE01", b"PV-OLD1", b"trial-7",
                   b"old-project", b"Laptop left", b"reading room", b"Old register",
                   b"clock on two", base64.b64encode(b"A" * 32), base64.b64encode(b"D" * 32),
                   *pseudonyms):
        assert marker not in dump, marker
