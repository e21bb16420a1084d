"""Issue 16, part 5: ``pacsvault migrate`` copies an embedded vault (SQLCipher index, local
objects) to a real PostgreSQL and a real SeaweedFS bucket and back.

One corpus (tests/corpus.py: distinctive patients, twelve transfer syntaxes) is sent with
dcmtk's storescu to an embedded vault; the C-FIND, QIDO-RS and WADO-RS answers for every
instance are kept as the reference. Then: ``migrate`` is refused while the server runs; a
dry run changes nothing; a migration stopped after a few objects (the process ends as if
killed, ``--stop-after``) leaves a 0600 state file without patient data and the settings
untouched; the next run completes it; the vault served from PostgreSQL + S3 answers
exactly as before, every object in the bucket is the local ciphertext byte for byte,
``audit verify`` passes with a ``vault.migrated`` record. Finally the way back
(``--to-index embedded --to-storage local``) gives the same answers again.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import re
import ssl
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom.dataset import Dataset

from tests import corpus
from tests.harness.peers import c_find_json
from tests.harness.postgres import PostgresDatabase, PostgresServer, create_database
from tests.harness.seaweed import S3Bucket, S3Server, create_bucket
from tests.helpers import AE, Server, VaultDir, make_vault, start_server, storescu

MODALITY = "MIGMOD"
PHYSICIAN, PHYSICIAN_PW = "drmigrate", "amber-quarry-lantern-58-silent-heron"
PREFIX = "pv/migrated"

def backends(test: Any) -> Any:
    """The marks of a test that needs the real PostgreSQL and SeaweedFS."""
    return pytest.mark.postgres(pytest.mark.s3(pytest.mark.slow(test)))


# --- answers a server gives ---------------------------------------------------------------


def _identifier(level: str, **keys: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for name in ("PatientName", "PatientID", "PatientBirthDate", "StudyDate",
                 "AccessionNumber", "StudyDescription", "StudyInstanceUID"):
        setattr(ds, name, "")
    if level == "IMAGE":
        ds.SeriesInstanceUID, ds.Modality = "", ""
        ds.SOPInstanceUID, ds.SOPClassUID, ds.InstanceNumber = "", "", ""
    for name, value in keys.items():
        setattr(ds, name, value)
    return ds


def _c_find(port: int, identifier: Dataset) -> list[dict[str, Any]]:
    return c_find_json(port, identifier, calling=MODALITY, called=AE)


def _parts(res: httpx.Response) -> list[bytes]:
    assert res.status_code == 200, (res.status_code, res.text[:200])
    boundary = res.headers["content-type"].split("boundary=")[1].split(";")[0].strip('"')
    dash = b"--" + boundary.encode()
    return [chunk.partition(b"\r\n\r\n")[2].removesuffix(b"\r\n")
            for chunk in res.content.split(dash)[1:-1]]


def _same_server(answer: Any) -> Any:
    return json.loads(re.sub(r"https://127\.0\.0\.1:\d+", "https://server", json.dumps(answer)))


def answers(vault: VaultDir, token: str, files: list[corpus.CorpusFile],
            send: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Every instance's C-FIND (study and image level), QIDO-RS and WADO-RS answers from
    the vault served as it is configured now (after storing ``send``: new rows after
    the copied ones, so the keys' sequences must have been moved past them)."""
    server = start_server(vault)
    try:
        return answers_from(server, vault, token, files, send)
    finally:
        server.stop()


def answers_from(server: Server, vault: VaultDir, token: str,
                 files: list[corpus.CorpusFile], send: tuple[Path, ...] = ()) -> dict[str, Any]:
    """``answers`` from a server already running."""
    for new_file in send:
        res = storescu(server.port, [new_file], calling=MODALITY)
        assert res.returncode == 0, res.stdout + res.stderr
    out: dict[str, Any] = {}
    ctx = ssl.create_default_context(cafile=str(vault.data / "tls" / "ca.crt"))
    with httpx.Client(base_url=f"https://127.0.0.1:{server.https_port}/dicom-web",
                      verify=ctx, timeout=60, trust_env=False,
                      headers={"Authorization": f"Bearer {token}"}) as web:
        for f in files:
            study = _c_find(server.port, _identifier("STUDY", StudyInstanceUID=f.study_uid))
            image = _c_find(server.port, _identifier(
                "IMAGE", StudyInstanceUID=f.study_uid, SOPInstanceUID=f.sop_uid))
            assert len(study) == 1 and len(image) == 1, f.path.name
            qido = web.get("/studies", params={"StudyInstanceUID": f.study_uid,
                                               "includefield": "all"})
            assert qido.status_code == 200
            series = image[0]["0020000E"]["Value"][0]
            path = f"/studies/{f.study_uid}/series/{series}/instances/{f.sop_uid}"
            wado = _parts(web.get(path, headers={
                "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}))
            assert len(wado) == 1
            meta = web.get(f"{path}/metadata")
            assert meta.status_code == 200
            out[f.sop_uid] = {"study": study, "image": image,
                              "qido": _same_server(qido.json()), "wado": wado[0],
                              "meta": _same_server(meta.json())}
    return out



def run_here(vault: VaultDir, *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI run in this process (the same ``main`` a user's command runs; saves the
    interpreter start and the imports of a subprocess). The interrupted and resumed
    migrations run as real processes."""
    from pacsvault.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    argv = [*args, "--data", str(vault.data), "--key-file", str(vault.key)]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


# --- the vault and its targets ------------------------------------------------------------


@dataclass
class Env:
    vault: VaultDir
    files: list[corpus.CorpusFile]
    token: str
    reference: dict[str, Any]
    pg: PostgresServer
    db: PostgresDatabase
    bucket: S3Bucket
    refused: Any = None
    runs: list[Any] = field(default_factory=list)

    def to_scale_out(self) -> list[str]:
        s3: S3Server = self.bucket.server
        return ["migrate", "--to-index", self.db.url,
                "--index-password-file", str(self.pg.password_file),
                "--to-storage", f"{self.bucket.url}/{PREFIX}",
                "--storage-endpoint", s3.endpoint, "--storage-region", s3.region,
                "--storage-credentials-file", str(s3.credentials_file),
                "--storage-ca-file", str(s3.ca_file), "--storage-path-style"]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, postgres_server: PostgresServer,
        s3_server: S3Server) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("migrate")
    files = corpus.build(root / "corpus")
    vault = make_vault(root / "v")
    vault.add_node(MODALITY, "--roles", "store,query,retrieve")
    v = vault.open()
    try:
        v.accounts.add_user(PHYSICIAN, ["physician"], PHYSICIAN_PW)
        token = v.accounts.create_token(PHYSICIAN, "1d").token
        from pacsvault.dicom import forward

        forward.ensure_tables(v)  # side tables: through --restart (dropped) and back
    finally:
        v.close()
    db = create_database(postgres_server)
    bucket = create_bucket(s3_server)
    server = start_server(vault)
    try:
        for f in files:
            res = storescu(server.port, [f.path], calling=MODALITY, extra=f.proposal)
            assert res.returncode == 0, f"{f.path.name}: {res.stdout}{res.stderr}"
        env = Env(vault, files, token, {}, postgres_server, db, bucket)
        env.refused = run_here(vault, *env.to_scale_out())  # while it serves
        env.reference = answers_from(server, vault, token, files)
    finally:
        server.stop()
    yield env


def _markers(files: list[corpus.CorpusFile]) -> list[str]:
    found = set(corpus.secrets_of(files))
    for f in files:
        found.update({f.sop_uid, f.study_uid})
    return sorted(found)


def _local_objects(data: Path) -> dict[str, bytes]:
    return {p.stem: p.read_bytes() for p in (data / "objects").glob("??/??/*.pvo")}


@pytest.fixture(scope="module")
def migrated(env: Env) -> Env:
    """A dry run; a migration stopped after 4 objects, continued and stopped after 4 more;
    the vault changed (a node added: the old backends were used meanwhile), so the next
    run refuses to continue; ``--restart`` then completes it from the start."""
    toml = env.vault.data / "pacsvault.toml"
    state = env.vault.data / "migrate-state.json"
    before = toml.read_text()
    env.runs.append(run_here(env.vault, *env.to_scale_out(), "--dry-run"))
    assert toml.read_text() == before
    assert not state.exists()
    env.runs.append(env.vault.cli(*env.to_scale_out(), "--stop-after", "4", check=False))
    env.runs.append((state.read_bytes() if state.exists() else b"",
                     stat.S_IMODE(state.stat().st_mode) if state.exists() else 0,
                     toml.read_text() == before))
    env.runs.append(env.vault.cli(*env.to_scale_out(), "--stop-after", "4", check=False))
    env.runs.append(json.loads(state.read_bytes()) if state.exists() else {})
    run_here(env.vault, "node", "add", "LATECOMER", "--host", "127.0.0.1")
    env.runs.append(run_here(env.vault, *env.to_scale_out()))
    env.runs.append(env.vault.cli(*env.to_scale_out(), "--restart", check=False))
    return env


# --- tests ----------------------------------------------------------------------------------


@backends
def test_refused_while_the_server_runs(env: Env) -> None:
    assert env.refused.returncode == 2
    lines = env.refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "stop the server before migrating" in lines[0], lines


@backends
def test_dry_run_and_interrupted_runs(migrated: Env) -> None:
    dry, stopped, (state, mode, untouched), again, after_again, refused, _done = migrated.runs
    assert f"would copy {len(migrated.files)} object(s)" in dry.stderr
    assert "nothing was changed" in dry.stderr
    assert f"instances {len(migrated.files)}" in dry.stderr  # and the other tables' rows
    assert stopped.returncode == 75, stopped.stderr
    assert state and mode == 0o600 and untouched
    body = json.loads(state)
    assert body["phase"] == "objects" and body["objects_copied"] == 4
    for marker in _markers(migrated.files):
        assert marker.encode() not in state
        assert base64.b64encode(marker.encode())[4:-4] not in state
    assert migrated.db.url.encode() not in state
    # the second run continued where the first stopped
    assert again.returncode == 75, again.stderr
    assert after_again["objects_copied"] == 8
    assert after_again["last_instance_pk"] > body["last_instance_pk"]
    # the vault changed in between: refused in one line, --restart needed
    assert refused.returncode == 2
    lines = refused.stderr.strip().splitlines()
    assert "the vault changed since this migration started" in lines[-1]
    assert "--restart" in lines[-1]


@backends
def test_migrated_vault_answers_identically(migrated: Env) -> None:
    done = migrated.runs[-1]
    assert done.returncode == 0, done.stderr
    data = migrated.vault.data
    assert f"{len(migrated.files)} instance(s) verified identical" in done.stderr
    assert "note:" in done.stderr and "kept" in done.stderr
    assert migrated.pg.password() not in done.stderr + done.stdout
    assert not (data / "migrate-state.json").exists()
    toml = (data / "pacsvault.toml").read_text()
    assert f'url = "{migrated.db.url}"' in toml
    assert f'url = "{migrated.bucket.url}/{PREFIX}"' in toml
    assert not (data / "index.db").exists()
    assert list(data.glob("index.db.before-migrate-*"))  # the old index, kept
    # the ciphertext went as it is: every local object is in the bucket, byte for byte
    local = _local_objects(data)
    assert len(local) == len(migrated.files)
    client = migrated.bucket.client()
    for object_id, blob in local.items():
        key = f"{PREFIX}/{object_id[:2]}/{object_id[2:4]}/{object_id}.pvo"
        got = client.get_object(Bucket=migrated.bucket.name, Key=key)["Body"].read()
        assert got == blob
    verify = run_here(migrated.vault, "audit", "verify")
    assert "intact" in verify.stdout
    from tests.helpers import events

    moved = events(migrated.vault, "vault.migrated")
    assert len(moved) == 1
    assert moved[0]["to_index"] == "postgresql" and moved[0]["to_storage"] == "s3"
    assert moved[0]["from_index"] == "embedded" and moved[0]["from_storage"] == "local"
    assert migrated.db.url not in json.dumps(moved[0], default=str)
    extra = corpus.synthetic_ct_series(migrated.vault.root / "new", 2, size=32)
    assert answers(migrated.vault, migrated.token, migrated.files,
                   send=tuple(extra)) == migrated.reference
    v = migrated.vault.open()
    try:  # new rows in other tables too (users' sequence moved past the copied keys)
        v.accounts.add_user("drafter", ["physician"], PHYSICIAN_PW)
        assert v.archive.counts()["instances"] == len(migrated.files) + 2
    finally:
        v.close()
    dump = migrated.pg.dump(migrated.db.name)
    for marker in _markers(migrated.files):
        assert marker.encode() not in dump


@backends
def test_round_trip_back_to_embedded(migrated: Env) -> None:
    assert migrated.runs[-1].returncode == 0
    # in two steps: each part alone (the objects first, then the index)
    objects = run_here(migrated.vault, "migrate", "--to-storage", "local")
    assert objects.returncode == 0, objects.stderr
    assert "objects s3 -> local" in objects.stderr
    back = run_here(migrated.vault, "migrate", "--to-index", "embedded")
    assert back.returncode == 0, back.stderr
    assert "index postgresql -> embedded, objects local -> local" in back.stderr
    data = migrated.vault.data
    toml = (data / "pacsvault.toml").read_text()
    assert migrated.db.url not in toml.split("[index]")[1].split("[")[0]
    assert (data / "index.db").exists()
    assert "dropdb" in back.stderr  # the PostgreSQL index is kept, and how to remove it
    assert "intact" in run_here(migrated.vault, "audit", "verify").stdout
    assert answers(migrated.vault, migrated.token, migrated.files) == migrated.reference


# --- the parts without a backend ------------------------------------------------------------


class _Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


def test_progress_bar_at_a_terminal_and_plain_lines_elsewhere() -> None:
    from pacsvault.migrate.progress import Progress

    tty = _Stream(True)
    bar = Progress("objects", 40, stream=tty)
    for _ in range(40):
        bar.advance()
    bar.close()
    text = tty.getvalue()
    assert text.startswith("\robjects [") and text.endswith("\n")
    assert "40/40" in text and text.count("\n") == 1  # redrawn in place
    plain = _Stream(False)
    bar = Progress("objects", 40, done=8, stream=plain)
    for _ in range(32):
        bar.advance()
    bar.close()
    lines = plain.getvalue().splitlines()
    assert "\r" not in plain.getvalue() and lines[0].startswith("objects [")
    assert "8/40" in lines[0] and "40/40" in lines[-1] and 3 <= len(lines) <= 12


def test_settings_file_rewritten_keeping_everything_else(tmp_path: Path) -> None:
    from pacsvault import config
    from pacsvault.config import IndexSettings
    from pacsvault.migrate import switch

    (tmp_path / config.CONFIG_NAME).write_text(config.render("PV", None), "utf-8")
    before = (tmp_path / config.CONFIG_NAME).read_text()
    current = config.load(tmp_path)
    url = "postgresql://pv@db.example.net/pv?sslmode=verify-full"
    storage = current.storage.model_copy(update={
        "url": "s3://bucket-one/pv", "endpoint": "https://s3.example.net", "path_style": True})
    switch.write_settings(tmp_path, IndexSettings(url=url, password_file="/etc/pv.pw"), storage)
    after = config.load(tmp_path)
    assert after.index.url == url and after.index.password_file == "/etc/pv.pw"
    assert after.storage.url == "s3://bucket-one/pv" and after.storage.path_style
    assert after.server == current.server and after.dicom == current.dicom
    text = (tmp_path / config.CONFIG_NAME).read_text()
    kept = [line for line in before.splitlines() if line.lstrip().startswith("#")]
    assert all(line in text for line in kept)  # every comment still there
    switch.write_settings(tmp_path, IndexSettings(),
                          after.storage.model_copy(update={"url": ""}))
    back = config.load(tmp_path)
    assert back.index.url == "" and back.storage.url == ""


def test_state_file_is_private_and_round_trips(tmp_path: Path) -> None:
    from pacsvault.migrate import state

    found = state.MigrationState(target="ab" * 32, anchor_seq=7, anchor_digest="cd" * 32)
    found.table("patients").last = 12
    found.table("data_keys").last = "0f" * 16
    state.save(tmp_path, found)
    path = state.path_of(tmp_path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert state.load(tmp_path) == found
    path.write_text("{}")
    with pytest.raises(state.StateError, match="remove it"):
        state.load(tmp_path)
    state.remove(tmp_path)
    assert state.load(tmp_path) is None


def test_targets_refused_in_one_line_without_echoing_a_password() -> None:
    from pacsvault import config
    from pacsvault.migrate import TargetError, choose

    current = config.Settings(server=config.ServerSettings(ae_title="PV"))
    with pytest.raises(TargetError, match="say where"):
        choose(current, to_index=None, to_storage=None)
    with pytest.raises(TargetError, match="nothing to migrate"):
        choose(current, to_index="embedded", to_storage="local")
    with pytest.raises(TargetError) as refused:
        choose(current, to_index="postgresql://pv:hunter2secret@db/pv", to_storage=None)
    assert "hunter2secret" not in str(refused.value) and "password" in str(refused.value)
    with pytest.raises(TargetError, match="s3://"):
        choose(current, to_index=None, to_storage="s3://Bad_Bucket")
    target = choose(current, to_index="postgresql://pv@db/pv", to_storage=None)
    assert target.moves_index and not target.moves_storage
    assert target.index_kind == "postgresql" and target.storage_kind == "local"


def test_a_chunk_committed_before_its_progress_was_saved_is_not_copied_twice(
        tmp_path: Path) -> None:
    """The crash window of the row copy: a chunk committed in the target, the process
    gone before the state file said so. The next run starts from the saved key again and
    skips the rows already there (no duplicate-key failure, nothing lost)."""
    from sqlalchemy import Column, Integer, MetaData, String, Table, create_engine, insert

    from pacsvault.migrate import rows
    from pacsvault.migrate.state import TableProgress

    table = Table("things", MetaData(), Column("pk", Integer, primary_key=True),
                  Column("label", String(16)))
    source = create_engine(f"sqlite:///{tmp_path / 'a.db'}")
    target = create_engine(f"sqlite:///{tmp_path / 'b.db'}")
    table.metadata.create_all(source)
    table.metadata.create_all(target)
    with source.begin() as conn:
        conn.execute(insert(table), [{"pk": n * 3, "label": f"r{n}"}
                                     for n in range(1, rows.CHUNK * 2 + 40)])
    total = rows.count(source, table)

    class Gone(Exception):
        pass

    progress = TableProgress()
    saved: list[TableProgress] = []

    def crash_after_first_commit(_count: int) -> None:
        if not saved:  # what the state file holds: the progress before this chunk
            saved.append(TableProgress())
        raise Gone

    with pytest.raises(Gone):
        rows.copy_table(source, target, table, progress, crash_after_first_commit)
    assert rows.count(target, table) == rows.CHUNK  # committed, not recorded
    resumed = saved[0]
    rows.copy_table(source, target, table, resumed, lambda _count: None)
    assert rows.count(target, table) == total
    assert resumed.last == (rows.CHUNK * 2 + 39) * 3
    rows.reset_sequences(target, [table])  # nothing to do on SQLite


def test_a_table_the_migration_does_not_know_stops_it(tmp_path: Path) -> None:
    """A table in the index that is neither the layout's nor a side table handed in (a
    future table, or forward's queue without ``side_tables``) would be left behind at
    the switch: refused before anything is copied, naming the table (never a url)."""
    from sqlalchemy import Column, Integer, MetaData, Table

    from pacsvault import migrate
    from pacsvault.dicom import forward
    from pacsvault.vault import Vault
    from tests.helpers import new_vault

    vault = new_vault(tmp_path)
    url = "postgresql://pv@127.0.0.1:9/pv"  # never reached: refused before
    toml = (vault.data / "pacsvault.toml").read_text()
    v = vault.open()
    try:
        forward.ensure_tables(v)
        Table("plugin_notes", MetaData(), Column("pk", Integer, primary_key=True)).create(
            v.engine)
    finally:
        v.close()

    def target(opened: Vault) -> migrate.Target:
        return migrate.choose(opened.settings, to_index=url, to_storage=None)

    for side, named in (((), "forward_cursor, forward_queue, plugin_notes"),
                        (tuple(forward.metadata.sorted_tables), "(plugin_notes)")):
        with pytest.raises(migrate.MigrationError) as refused:
            migrate.migrate(vault.data, vault.key, None, target,
                            migrate.Options(side_tables=side))
        assert named in str(refused.value) and url not in str(refused.value)
        assert "nothing was changed" in str(refused.value)
    assert (vault.data / "pacsvault.toml").read_text() == toml
    assert not (vault.data / "migrate-state.json").exists()
