"""Issue 16, part 1: a vault whose index is PostgreSQL answers as the embedded one, and a
``pg_dump`` of it shows no patient.

One corpus (tests/corpus.py: distinctive names, IDs, birth dates, several transfer
syntaxes) is sent with dcmtk's storescu to two real servers: an embedded vault (SQLCipher)
and a vault made with ``init --index-url`` on a fresh database of the harness's PostgreSQL
(TLS verify-full, password from a 0600 file). Exact-UID C-FIND, QIDO-RS and WADO-RS
answers must be equal; the dump must not contain any marker in any encoding; a wrong key,
another vault's database and a url holding a password are refused with one line.
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import shutil
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE as ClientAE

from tests import corpus
from tests.harness.peers import c_find_json
from tests.harness.postgres import (
    PostgresDatabase,
    PostgresServer,
    create_database,
    drop_database,
)
from tests.helpers import AE, Server, VaultDir, first_run_secrets, make_vault, pv, start_server

MODALITY = "PGMOD"
PHYSICIAN, PHYSICIAN_PW = "drpostgres", "copper-meadow-lantern-91-quiet-river"


def make_pg_vault(root: Path, server: PostgresServer, url: str,
                  admin: str = "admin") -> VaultDir:
    """``pacsvault init --index-url URL --index-password-file F`` (the CLI, as a user)."""
    root.mkdir(parents=True, exist_ok=True)
    key = root / "keys" / "master.key"
    proc = pv("init", "--data", root / "data", "--key-file", key, "--ae-title", AE,
              "--admin", admin, "--index-url", url,
              "--index-password-file", server.password_file)
    found = first_run_secrets(proc.stdout)
    return VaultDir(root, key, found.recovery_code, found.admin_password, found.admin_name)


@dataclass
class Side:
    vault: VaultDir
    server: Server
    token: str


@dataclass
class Pair:
    files: list[corpus.CorpusFile]
    embedded: Side
    postgres: Side
    pg: PostgresServer
    database: str


def _prepare(vault: VaultDir, files: list[corpus.CorpusFile]) -> Side:
    v = vault.open()
    try:
        v.nodes.add(MODALITY, "127.0.0.1", roles=("store", "query", "retrieve"))
        v.accounts.add_user(PHYSICIAN, ["physician"], PHYSICIAN_PW)
        token = v.accounts.create_token(PHYSICIAN, "1d").token
    finally:
        v.close()
    server = start_server(vault)
    from tests.helpers import storescu

    for f in files:
        res = storescu(server.port, [f.path], calling=MODALITY, extra=f.proposal)
        assert res.returncode == 0, res.stderr
    return Side(vault, server, token)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory,
         postgres_server: PostgresServer) -> Iterator[Pair]:
    root = tmp_path_factory.mktemp("pgindex")
    files = corpus.build(root / "corpus")
    db = create_database(postgres_server)
    sides: list[Side] = []
    try:
        sides.append(_prepare(make_vault(root / "embedded"), files))
        sides.append(_prepare(make_pg_vault(root / "pg", postgres_server, db.url), files))
        yield Pair(files, sides[0], sides[1], postgres_server, db.name)
    finally:
        for side in sides:
            side.server.stop()
        drop_database(db)


# --- answers ----------------------------------------------------------------------------


def _c_find(port: int, identifier: Dataset) -> list[dict[str, Any]]:
    return c_find_json(port, identifier, calling=MODALITY, called=AE)


def _identifier(level: str, **keys: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for name in ("PatientName", "PatientID", "PatientBirthDate", "StudyDate",
                 "AccessionNumber", "StudyDescription", "StudyInstanceUID"):
        setattr(ds, name, "")
    if level != "STUDY":
        ds.SeriesInstanceUID, ds.Modality = "", ""
    if level == "IMAGE":
        ds.SOPInstanceUID, ds.SOPClassUID, ds.InstanceNumber = "", "", ""
    for name, value in keys.items():
        setattr(ds, name, value)
    return ds


@pytest.mark.postgres
@pytest.mark.slow
def test_exact_uid_cfind_answers_equal(pair: Pair) -> None:
    for f in pair.files:
        for ident in (_identifier("STUDY", StudyInstanceUID=f.study_uid),
                      _identifier("IMAGE", StudyInstanceUID=f.study_uid,
                                  SOPInstanceUID=f.sop_uid)):
            embedded = _c_find(pair.embedded.server.port, ident)
            postgres = _c_find(pair.postgres.server.port, ident)
            assert len(embedded) == 1, f.path.name
            assert postgres == embedded, f.path.name


def _http(side: Side) -> httpx.Client:
    ctx = ssl.create_default_context(cafile=str(side.vault.data / "tls" / "ca.crt"))
    return httpx.Client(base_url=f"https://127.0.0.1:{side.server.https_port}/dicom-web",
                        verify=ctx, timeout=60, trust_env=False,
                        headers={"Authorization": f"Bearer {side.token}"})


def _parts(res: httpx.Response) -> list[bytes]:
    assert res.status_code == 200, (res.status_code, res.text[:200])
    boundary = res.headers["content-type"].split("boundary=")[1].split(";")[0].strip('"')
    dash = b"--" + boundary.encode()
    body = res.content
    return [chunk.partition(b"\r\n\r\n")[2].removesuffix(b"\r\n")
            for chunk in body.split(dash)[1:-1]]


def _same_server(answer: Any) -> Any:
    """An answer with each server's own address (Retrieve URLs, bulk data URIs) made
    the same."""
    return json.loads(re.sub(r"https://127\.0\.0\.1:\d+", "https://server",
                             json.dumps(answer)))


@pytest.mark.postgres
@pytest.mark.slow
def test_exact_uid_qido_and_wado_answers_equal(pair: Pair) -> None:
    with _http(pair.embedded) as emb, _http(pair.postgres) as pgc:
        for f in pair.files:
            query = {"StudyInstanceUID": f.study_uid, "includefield": "all"}
            a = emb.get("/studies", params=query)
            b = pgc.get("/studies", params=query)
            assert a.status_code == b.status_code == 200
            assert len(a.json()) == 1
            assert _same_server(b.json()) == _same_server(a.json()), f.path.name
            series = emb.get(f"/studies/{f.study_uid}/series").json()
            assert _same_server(series) == _same_server(
                pgc.get(f"/studies/{f.study_uid}/series").json())
            series_uid = series[0]["0020000E"]["Value"][0]
            path = f"/studies/{f.study_uid}/series/{series_uid}/instances/{f.sop_uid}"
            accept = {"Accept": 'multipart/related; type="application/dicom"; '
                                "transfer-syntax=*"}
            got_a = _parts(emb.get(path, headers=accept))
            got_b = _parts(pgc.get(path, headers=accept))
            assert len(got_a) == 1 and got_b == got_a, f.path.name
            meta_a = _same_server(emb.get(f"{path}/metadata").json())
            assert _same_server(pgc.get(f"{path}/metadata").json()) == meta_a


# --- at rest ----------------------------------------------------------------------------


def _encodings(text: str) -> list[bytes]:
    """``text`` as it could sit in a dump: UTF-8, UTF-16 (both orders), hex (both cases),
    and base64 at each of the three alignments (the stable middle of each)."""
    raw = text.encode("utf-8")
    found = [raw, text.encode("utf-16-le"), text.encode("utf-16-be"),
             raw.hex().encode(), raw.hex().upper().encode()]
    for shift in range(3):
        encoded = base64.b64encode(b"\x00" * shift + raw)
        middle = encoded[4:-4] if len(encoded) > 12 else b""
        if len(middle) >= 8:
            found.append(middle)
    return found


def _markers(files: list[corpus.CorpusFile]) -> list[str]:
    """Names, IDs, birth dates, study/series/instance UIDs, accession numbers, study
    dates (DICOM and ISO form) of the corpus."""
    found = set(corpus.secrets_of(files))
    for f in files:
        ds = dcmread(f.path, stop_before_pixels=True)
        found.update({f.sop_uid, f.study_uid, str(ds.SeriesInstanceUID)})
        accession = str(ds.get("AccessionNumber", "") or "")
        if len(accession) >= 4:
            found.add(accession)
        date = str(ds.get("StudyDate", "") or "")
        if len(date) == 8:
            found.update({date, f"{date[:4]}-{date[4:6]}-{date[6:]}"})
    return sorted(found)


@pytest.mark.postgres
@pytest.mark.slow
def test_pg_dump_contains_no_patient_marker(pair: Pair) -> None:
    data = pair.pg.dump(pair.database)
    # the dump holds the rows (as ciphertext): one COPY line per stored instance
    copy = data.split(b"COPY public.instances ")[1].split(b"\n\\.\n")[0]
    assert copy.count(b"\n") == len(pair.files)
    for marker in _markers(pair.files):
        for needle in _encodings(marker):
            assert needle not in data, f"a patient marker ({marker[:3]}...) is in the dump"
    assert b"pacsvault_index_owner" in data and b"alembic_version" in data


def test_encodings_of_a_marker_are_found() -> None:
    """The scan above would see a marker written in any of its encodings."""
    marker = "Quetzal^Bartholomew07"
    for blob in (marker.encode(), marker.encode("utf-16-le"), marker.encode().hex().encode(),
                 base64.b64encode(b"x" + marker.encode()),
                 base64.b64encode(b"xy" + marker.encode())):
        assert any(needle in blob for needle in _encodings(marker)), blob


# --- refusals ---------------------------------------------------------------------------


@pytest.mark.postgres
@pytest.mark.slow
def test_settings_name_the_database_without_a_password(pair: Pair) -> None:
    toml = (pair.postgres.vault.data / "pacsvault.toml").read_text()
    assert f'url = "{pair.pg.url_for(pair.database)}"' in toml
    assert f'password_file = "{pair.pg.password_file}"' in toml
    assert pair.pg.password() not in toml
    assert not (pair.postgres.vault.data / "index.db").exists()


@pytest.mark.postgres
@pytest.mark.slow
def test_wrong_key_and_another_vaults_database_refused(pair: Pair, tmp_path: Path) -> None:
    from pacsvault import config
    from pacsvault.crypto.keys import MasterKey
    from pacsvault.index.db import IndexOpenError
    from pacsvault.index.postgres import open_postgres
    from pacsvault.index.sealing import sealer_for
    from pacsvault.vaultfile import read

    pg_vault = pair.postgres.vault
    # another vault's key file: refused before the database is touched
    res = pv("status", "--data", pg_vault.data, "--key-file", pair.embedded.vault.key,
             check=False)
    assert res.returncode != 0
    assert "does not open this vault" in res.stderr
    # the right vault id with another master key: the owner row does not verify
    vault_id = str(read(pg_vault.data / "vault.json")["vault_id"])
    settings = config.load(pg_vault.data).index
    with pytest.raises(IndexOpenError, match="does not open with this key"):
        open_postgres(settings, sealer_for(MasterKey.generate(), vault_id), vault_id)
    # a password file others can read is refused before any connection
    exposed = tmp_path / "pw"
    exposed.write_text(pair.pg.password() + "\n")
    exposed.chmod(0o644)
    with pytest.raises(IndexOpenError, match="readable by other users") as refused:
        open_postgres(settings.model_copy(update={"password_file": str(exposed)}),
                      sealer_for(MasterKey.generate(), vault_id), vault_id)
    assert pair.pg.password() not in str(refused.value)
    # another vault pointed at this database
    other = tmp_path / "other"
    shutil.copytree(pair.embedded.vault.data, other / "data",
                    ignore=shutil.ignore_patterns("serve.*", "*.lock", "*.sock"))
    (other / "data" / "pacsvault.toml").write_text(
        (pg_vault.data / "pacsvault.toml").read_text())
    res = pv("status", "--data", other / "data", "--key-file", pair.embedded.vault.key,
             check=False)
    assert res.returncode == 2
    assert "belongs to another vault" in res.stderr
    assert pair.pg.password() not in res.stderr + res.stdout


@pytest.mark.postgres
@pytest.mark.slow
def test_init_refuses_a_database_that_holds_an_index(pair: Pair, tmp_path: Path) -> None:
    res = pv("init", "--data", tmp_path / "data", "--key-file", tmp_path / "k.key",
             "--index-url", pair.pg.url_for(pair.database),
             "--index-password-file", pair.pg.password_file, check=False)
    assert res.returncode == 2
    assert "already holds a pacsvault index" in res.stderr
    assert not (tmp_path / "data" / "vault.json").exists()
    assert not (tmp_path / "k.key").exists()


def test_index_url_with_a_password_is_refused(tmp_path: Path) -> None:
    for url in ("postgresql://pv:hunter2secret@127.0.0.1:5432/pv",
                "postgresql://pv@127.0.0.1/pv?sslmode=verify-full&password=hunter2secret"):
        res = pv("init", "--data", tmp_path / "data", "--key-file", tmp_path / "k.key",
                 "--index-url", url, check=False)
        assert res.returncode == 2, res.stderr
        assert "contains a password" in res.stderr
        assert "hunter2secret" not in res.stderr + res.stdout
        assert not (tmp_path / "data").exists() and not (tmp_path / "k.key").exists()


def test_index_url_with_a_password_is_refused_in_the_settings(tmp_path: Path) -> None:
    vault = make_vault(tmp_path / "v")
    vault.set_toml("index", "url", '"postgresql://pv:hunter2secret@127.0.0.1/pv"')
    res = vault.cli("status", check=False)
    assert res.returncode == 2
    assert "contains a password" in res.stderr
    assert "hunter2secret" not in res.stderr + res.stdout


# --- the same SOP Instance UID at two instances at once ---------------------------------


def _part10(path: Path, description: str | None = None) -> bytes:
    import io

    ds = dcmread(path)
    if description is not None:
        ds.SeriesDescription = description
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _race(*stores: tuple[Any, bytes]) -> list[Any]:
    """Each (archive, object) stored from its own thread, released at the same moment;
    the statuses (or the exceptions) in order."""
    barrier = threading.Barrier(len(stores))
    results: list[Any] = [None] * len(stores)

    def store(i: int, archive: Any, raw: bytes) -> None:
        barrier.wait(10)
        try:
            results[i] = archive.store(raw, source_ae=MODALITY).status
        except Exception as exc:  # recorded: the caller's assertion names it
            results[i] = exc

    threads = [threading.Thread(target=store, args=(i, archive, raw))
               for i, (archive, raw) in enumerate(stores)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


@pytest.mark.postgres
@pytest.mark.slow
def test_same_sop_uid_at_two_instances_at_once(tmp_path: Path,
                                               postgres_server: PostgresServer) -> None:
    """Two ``Vault`` objects over one database (two instances' archives, each with its own
    in-process locks): the same object at both at once is stored once, the other answer a
    duplicate; a different object under the same UID is a conflict (B006 at the caller),
    never a failure; rows: exactly one instance each."""
    from pacsvault.storage.archive import StoreStatus

    db = create_database(postgres_server)
    try:
        vault = make_pg_vault(tmp_path / "v", postgres_server, db.url)
        files = corpus.synthetic_ct_series(tmp_path / "ct", 6, size=32)
        a, b = vault.open(), vault.open()
        try:
            for round_, path in enumerate(files):
                first = _part10(path)
                second = first if round_ % 2 == 0 else _part10(path, f"other {round_}")
                results = _race((a.archive, first), (b.archive, second))
                got = sorted(str(r) for r in results)
                other = StoreStatus.DUPLICATE if second is first else StoreStatus.CONFLICT
                assert got == sorted([str(StoreStatus.STORED), str(other)]), results
            a.archive.settle()
            b.archive.settle()
            assert a.archive.counts()["instances"] == len(files)
            for path in files:
                uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
                assert len(list(b.archive.locate(sop_uid=uid))) == 1
        finally:
            a.close()
            b.close()
    finally:
        drop_database(db)


@contextlib.contextmanager
def _association(port: int) -> Iterator[Callable[[list[Path]], list[int]]]:
    """One association; yields a function that C-STOREs files and returns the statuses."""
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

    ae = ClientAE(ae_title=MODALITY)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title=AE)
    assert assoc.is_established
    try:
        yield lambda paths: [int(assoc.send_c_store(dcmread(p)).Status) for p in paths]
    finally:
        assoc.release()


@pytest.mark.postgres
@pytest.mark.slow
def test_postgresql_restarted_during_ingest(tmp_path: Path) -> None:
    """PostgreSQL stopped in the middle of an association: the C-STOREs it cannot commit
    get a failure status (never a success); once it is back the same association and
    server store again (stale pooled connections replaced), and every image acknowledged
    is there, byte for byte."""
    from tests.harness.postgres import running_postgres

    with running_postgres() as pg:
        db = create_database(pg)
        vault = make_pg_vault(tmp_path / "v", pg, db.url)
        vault.add_node(MODALITY, "--roles", "store")
        files = corpus.synthetic_ct_series(tmp_path / "ct", 6, size=32)
        server = start_server(vault)
        try:
            with _association(server.port) as send:
                assert send(files[:2]) == [0, 0]
                pg.stop()
                # "Refused: Out of Resources": nothing committed, the modality retries
                assert send(files[2:4]) == [0xA700, 0xA700]
                pg = pg.start()
                assert send(files[4:]) == [0, 0]
            with _association(server.port) as send:
                assert send(files[2:4]) == [0, 0]
            assert server.alive()
        finally:
            server.stop()
        v = vault.open()
        try:
            assert v.archive.counts()["instances"] == len(files)
            for path in files:
                uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
                assert len(list(v.archive.locate(sop_uid=uid))) == 1
        finally:
            v.close()


def test_tls_weakness_is_named_for_remote_servers_only() -> None:
    from pacsvault import config
    from pacsvault.index.postgres import engine_url, tls_weakness

    def weakness(url: str) -> str | None:
        return tls_weakness(engine_url(config.IndexSettings(url=url)))

    assert weakness("postgresql://pv@db.example.net/pv?sslmode=verify-full&sslrootcert=/ca")\
        is None
    assert weakness("postgresql://pv@127.0.0.1:5432/pv") is None
    assert weakness("postgresql://pv@/pv?host=/run/postgresql") is None
    for url, mode in (("postgresql://pv@db.example.net/pv", "prefer"),
                      ("postgresql://pv@10.0.0.5/pv?sslmode=require", "require")):
        found = weakness(url)
        assert found is not None and f"sslmode={mode}" in found and "verify-full" in found


@pytest.mark.postgres
@pytest.mark.slow
def test_init_with_a_wrong_password_creates_nothing(tmp_path: Path,
                                                    postgres_db: PostgresDatabase) -> None:
    wrong = tmp_path / "pw"
    wrong.write_text("not-the-password\n")
    wrong.chmod(0o600)
    res = pv("init", "--data", tmp_path / "data", "--key-file", tmp_path / "k.key",
             "--index-url", postgres_db.url, "--index-password-file", wrong, check=False)
    assert res.returncode == 2, res.stderr
    line = res.stderr.strip().splitlines()[-1]
    assert line.startswith("pacsvault: error: ") and "password authentication failed" in line
    assert "not-the-password" not in res.stderr + res.stdout
    assert not (tmp_path / "data").exists() and not (tmp_path / "k.key").exists()
    with postgres_db.connect() as conn:  # the database was left untouched
        assert conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")\
            .fetchone() == (0,)
