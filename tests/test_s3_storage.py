"""Objects in an S3 bucket (issue 16, part 2) against a real SeaweedFS (tests/harness/seaweed.py).

A vault with the embedded SQLCipher index and ``[storage] url = "s3://..."``: dcmtk storescu
stores, WADO-RS and C-GET read back identical images; a full listing and download of the
bucket (keys, bodies, headers, tags) shows no patient marker; S3 down during ingest gives
failure statuses and ingest resumes once it is back; an object PUT without its row is
removed by the orphan sweep after the grace period (and not before); the scrubber finds a deleted
and a corrupted object. The unit tests at the end need no endpoint.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread
from pydicom.dataset import Dataset

from pacsvault.storage import scrub
from tests import corpus
from tests.harness.seaweed import S3Bucket, create_bucket, running_seaweed
from tests.helpers import (
    AE,
    Server,
    VaultDir,
    dcmtk,
    dcmtk_env,
    first_run_secrets,
    make_vault,
    new_vault,
    pv,
    start_server,
    storescu,
    wait_events,
    wait_until,
)

MODALITY, WS = "MODALITY", "WS"
PHYSICIAN, PHYSICIAN_PW = "drs3", "quiet-harbour-lantern-47-violet-orchard"
TRAILING_PADDING = 0xFFFCFFFC
PREFIX = "pv/site1"


def use_bucket(vault: VaultDir, bucket: S3Bucket, **extra: str) -> None:
    """Point a vault's ``[storage]`` at ``bucket`` (its setting lines replaced)."""
    server = bucket.server
    values = {"url": f'"{bucket.url}/{PREFIX}"', "endpoint": f'"{server.endpoint}"',
              "region": f'"{server.region}"',
              "credentials_file": f'"{server.credentials_file}"',
              "ca_file": f'"{server.ca_file}"', "path_style": "true", **extra}
    for name, value in values.items():
        vault.set_toml("storage", name, value)


def bucket_objects(bucket: S3Bucket) -> list[dict[str, Any]]:
    client = bucket.client()
    found: list[dict[str, Any]] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket.name):
        found.extend(page.get("Contents", []))
    return found


def same_dataset(original_path: Path, back: Dataset) -> None:
    """Identical to what was sent, but for the trailing padding storescu drops."""
    original = dcmread(original_path)
    if TRAILING_PADDING in original:
        del original[TRAILING_PADDING]
    name = original_path.name
    assert [e.tag for e in back] == [e.tag for e in original], name
    for elem in original:
        assert back[elem.tag].value == elem.value, f"{name} {elem.tag}"


def init_args(bucket: S3Bucket, url: str = "") -> list[str | Path]:
    server = bucket.server
    return ["--storage-url", url or f"{bucket.url}/{PREFIX}",
            "--storage-endpoint", server.endpoint, "--storage-region", server.region,
            "--storage-credentials-file", server.credentials_file,
            "--storage-ca-file", server.ca_file, "--storage-path-style"]


def init_with_bucket(root: Path, bucket: S3Bucket) -> VaultDir:
    """``pacsvault init --storage-url ...``: a new vault whose objects go to ``bucket``."""
    root.mkdir(parents=True, exist_ok=True)
    key = root / "keys" / "master.key"
    proc = pv("init", "--data", root / "data", "--key-file", key, "--admin", "admin",
              *init_args(bucket))
    found = first_run_secrets(proc.stdout)
    return VaultDir(root, key, found.recovery_code, found.admin_password, found.admin_name)


# --- a loaded vault (module scope) -----------------------------------------------------------


@dataclass
class Env:
    vault: VaultDir
    server: Server
    bucket: S3Bucket
    files: list[corpus.CorpusFile]
    ct: list[Path]
    token: str
    root: Path


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, s3_server: Any) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("s3vault")
    bucket = create_bucket(s3_server)
    vault = init_with_bucket(root / "v", bucket)
    vault.add_node(MODALITY)
    vault.add_node(WS, "--roles", "store,query,retrieve")
    v = vault.open()
    try:
        v.accounts.add_user(PHYSICIAN, ["physician"], PHYSICIAN_PW)
        token = v.accounts.create_token(PHYSICIAN, "1d").token
    finally:
        v.close()
    files = corpus.build(root / "corpus")
    ct = corpus.synthetic_ct_series(root / "ct", 8, size=64)
    server = start_server(vault)
    try:
        for f in files:
            res = storescu(server.port, [f.path], calling=MODALITY, extra=f.proposal)
            assert res.returncode == 0, f"{f.path.name}: {res.stdout}{res.stderr}"
        res = storescu(server.port, ct, calling=MODALITY)
        assert res.returncode == 0, res.stdout + res.stderr
        yield Env(vault, server, bucket, files, ct, token, root)
    finally:
        server.stop()


@pytest.mark.s3
@pytest.mark.slow
def test_objects_are_in_the_bucket_and_nowhere_else(env: Env) -> None:
    objects = bucket_objects(env.bucket)
    assert len(objects) == len(env.files) + len(env.ct)
    for item in objects:
        assert str(item["Key"]).startswith(PREFIX + "/") and str(item["Key"]).endswith(".pvo")
    local = [p for p in (env.vault.data / "objects").rglob("*.pvo")]
    assert local == []  # the local object directory holds nothing


@pytest.mark.s3
@pytest.mark.slow
def test_wado_rs_reads_every_image_back_identical(env: Env) -> None:
    session = requests.Session()
    session.trust_env = False
    session.verify = str(env.vault.data / "tls" / "ca.crt")
    session.headers["Authorization"] = f"Bearer {env.token}"
    try:
        client = DICOMwebClient(url=f"https://127.0.0.1:{env.server.https_port}/dicom-web",
                                session=session)
        for path in [f.path for f in env.files] + env.ct:
            ds = dcmread(path, stop_before_pixels=True)
            back = client.retrieve_instance(
                str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID),
                media_types=(("application/dicom", "*"),))
            same_dataset(path, back)
    finally:
        session.close()


@pytest.mark.s3
@pytest.mark.slow
def test_c_get_reads_a_study_back_identical(env: Env) -> None:
    out = env.root / "get"
    out.mkdir()
    study = str(dcmread(env.ct[0], stop_before_pixels=True).StudyInstanceUID)
    res = subprocess.run(
        [dcmtk("getscu"), "-S", "-aet", WS, "-aec", AE, "-od", str(out),
         "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}",
         "127.0.0.1", str(env.server.port)],
        capture_output=True, text=True, env=dcmtk_env(), timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    received = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p
                for p in out.iterdir()}
    assert len(received) == len(env.ct)
    for path in env.ct:
        back = dcmread(received[str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)])
        same_dataset(path, back)
        assert back.PixelData == dcmread(path).PixelData


@pytest.mark.s3
@pytest.mark.slow
def test_bucket_listing_and_download_reveal_no_patient(env: Env) -> None:
    secrets = [*corpus.secrets_of(env.files), "Batch^Crash", "PVBATCH01", "19500505"]
    needles = [s.encode() for s in secrets] + [s.encode("utf-16-le") for s in secrets]
    for f in env.files:
        needles += [f.sop_uid.encode(), f.study_uid.encode()]
    for path in env.ct:
        ds = dcmread(path, stop_before_pixels=True)
        needles += [str(ds.SOPInstanceUID).encode(), str(ds.SeriesInstanceUID).encode(),
                    str(ds.StudyInstanceUID).encode()]
    client = env.bucket.client()
    objects = bucket_objects(env.bucket)
    assert objects
    listing = repr(objects).encode()
    for item in objects:
        key = str(item["Key"])
        answer = client.get_object(Bucket=env.bucket.name, Key=key)
        body = answer["Body"].read()
        headers = answer["ResponseMetadata"]["HTTPHeaders"]
        assert body[:16] == b"pacsvault-obj/1\n"
        assert not answer.get("Metadata"), key  # no x-amz-meta-*
        assert not any(h.lower().startswith("x-amz-meta-") for h in headers), headers
        assert "content-disposition" not in {h.lower() for h in headers}, headers
        assert not answer.get("ContentDisposition")
        assert client.get_object_tagging(Bucket=env.bucket.name, Key=key)["TagSet"] == []
        blob = body + key.encode() + repr(headers).encode()
        for needle in needles:
            assert needle not in blob, f"{needle!r} readable in {key}"
    for needle in needles:
        assert needle not in listing


@pytest.mark.s3
@pytest.mark.slow
def test_init_refuses_a_bucket_it_cannot_reach(tmp_path: Path, s3_bucket: S3Bucket) -> None:
    data = tmp_path / "data"
    res = pv("init", "--data", data, "--key-file", tmp_path / "k" / "master.key",
             *init_args(s3_bucket, url="s3://no-such-bucket-pv/x"), check=False)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "cannot be reached" in res.stderr
    assert not data.exists() and not (tmp_path / "k" / "master.key").exists()


# --- in-process vaults: recovery and scrubbing ----------------------------------------------


def s3_vault(tmp_path: Path, bucket: S3Bucket, **extra: str) -> VaultDir:
    vault = new_vault(tmp_path)
    use_bucket(vault, bucket, **extra)
    return vault


@pytest.mark.s3
@pytest.mark.slow
def test_object_without_row_is_removed_after_the_grace_only(tmp_path: Path,
                                                          s3_bucket: S3Bucket) -> None:
    vault = s3_vault(tmp_path, s3_bucket, orphan_grace_seconds="3")
    files = corpus.synthetic_ct_series(tmp_path / "ct", 3, size=16)
    v = vault.open()
    try:
        for f in files:
            v.archive.store(f.read_bytes())
        indexed = {i.object_id for i in v.archive.locate()}
        # a crash between the PUT and the commit: an object no row names
        client = s3_bucket.client()
        orphan = os.urandom(16).hex()
        key = f"{PREFIX}/{orphan[:2]}/{orphan[2:4]}/{orphan}.pvo"
        client.put_object(Bucket=s3_bucket.name, Key=key, Body=b"pacsvault-obj/1\n" + b"x" * 99)
        # a foreign key under the prefix is never ours to delete
        client.put_object(Bucket=s3_bucket.name, Key=f"{PREFIX}/README.txt", Body=b"hello")
        assert v.archive.recover().discarded == 0  # the start is not delayed by a listing
        done = scrub.sweep(v)
        assert done is not None and done.removed == () and done.young == 1  # maybe in flight
        assert done.foreign == 1 and v.store.exists(orphan)
        time.sleep(3.5)
        done = scrub.sweep(v)
        assert done is not None and done.removed == (orphan,)
        assert not v.store.exists(orphan)
        # serve's job does the same (and records it)
        another = os.urandom(16).hex()
        client.put_object(Bucket=s3_bucket.name,
                          Key=f"{PREFIX}/{another[:2]}/{another[2:4]}/{another}.pvo", Body=b"y")
        time.sleep(3.5)
        scrub.sweep_tick(v)
        assert not v.store.exists(another)
        assert [r.detail["removed"] for r in v.audit.records()
                if r.action == "storage.orphans"] == [1, 1]
        keys = {str(o["Key"]) for o in bucket_objects(s3_bucket)}
        assert f"{PREFIX}/README.txt" in keys
        assert {k.rsplit("/", 1)[1].removesuffix(".pvo") for k in keys
                if k.endswith(".pvo")} == indexed
        for item in v.archive.locate():  # every indexed object still reads
            assert v.archive.read(item)
    finally:
        v.close()


@pytest.mark.s3
@pytest.mark.slow
def test_too_many_orphans_are_not_deleted(tmp_path: Path, s3_bucket: S3Bucket) -> None:
    """An index that does not go with the bucket (restored from an older backup onto the
    same bucket): far more unindexed objects than a crash leaves, so none is deleted."""
    vault = s3_vault(tmp_path, s3_bucket, orphan_grace_seconds="1", orphan_limit="2")
    client = s3_bucket.client()
    planted = [os.urandom(16).hex() for _ in range(3)]
    for object_id in planted:
        client.put_object(Bucket=s3_bucket.name, Body=b"z",
                          Key=f"{PREFIX}/{object_id[:2]}/{object_id[2:4]}/{object_id}.pvo")
    time.sleep(1.5)
    v = vault.open()
    try:
        assert v.archive.recover().discarded == 0
        done = scrub.sweep(v)
        assert done is not None and done.refused == 3 and done.removed == ()
        assert all(v.store.exists(object_id) for object_id in planted)
        refused = [r for r in v.audit.records() if r.action == "storage.orphans"]
        assert refused and refused[-1].detail["refused"] == 3
    finally:
        v.close()


@pytest.mark.s3
@pytest.mark.slow
def test_scrub_finds_a_deleted_and_a_corrupted_object(tmp_path: Path,
                                                      s3_bucket: S3Bucket) -> None:
    vault = s3_vault(tmp_path, s3_bucket)
    files = corpus.synthetic_ct_series(tmp_path / "ct", 4, size=16)
    v = vault.open()
    try:
        for f in files:
            v.archive.store(f.read_bytes())
        items = list(v.archive.locate())
    finally:
        v.close()
    ok = vault.cli("storage", "scrub")
    assert "checked: 4 " in ok.stdout
    gone, damaged = items[0].object_id, items[1].object_id
    client = s3_bucket.client()
    client.delete_object(Bucket=s3_bucket.name, Key=f"{PREFIX}/{gone[:2]}/{gone[2:4]}/{gone}.pvo")
    key = f"{PREFIX}/{damaged[:2]}/{damaged[2:4]}/{damaged}.pvo"
    blob = bytearray(client.get_object(Bucket=s3_bucket.name, Key=key)["Body"].read())
    blob[-20] ^= 0x01
    client.put_object(Bucket=s3_bucket.name, Key=key, Body=bytes(blob))
    res = vault.cli("storage", "scrub", check=False)
    assert res.returncode == 1, res.stdout + res.stderr
    assert f"missing: {gone}" in res.stdout
    assert f"corrupt: {damaged}" in res.stdout
    assert "checked: 4 " in res.stdout
    v = vault.open()
    try:
        scrubs = [r for r in v.audit.records() if r.action == "storage.scrub"]
    finally:
        v.close()
    assert scrubs[-1].detail["missing"] == 1 and scrubs[-1].detail["corrupt"] == 1
    assert scrubs[-1].outcome != scrubs[0].outcome
    # serve's job: one slice covers these four rows, and records the damage at once
    v = vault.open()
    try:
        scrub.tick(v)
        found = [r for r in v.audit.records() if r.action == "storage.scrub"][len(scrubs):]
    finally:
        v.close()
    assert found and found[0].detail["missing"] == 1 and found[0].detail["corrupt"] == 1
    assert gone in str(found[0].detail["missing_ids"])


@pytest.mark.s3
@pytest.mark.slow
def test_deleting_an_instance_deletes_its_object_from_the_bucket(
        tmp_path: Path, s3_bucket: S3Bucket) -> None:
    from pacsvault.storage.removal import Remover

    vault = s3_vault(tmp_path, s3_bucket)
    files = corpus.synthetic_ct_series(tmp_path / "ct", 2, size=16)
    v = vault.open()
    try:
        for f in files:
            v.archive.store(f.read_bytes())
        first, second = sorted(v.archive.locate(), key=lambda i: i.object_id)
        Remover(v.engine, v.store, v.recorder, v.archive).delete(
            "instance", first.sop_uid, "test: wrong patient", actor="local-admin")
        assert not v.store.exists(first.object_id)
        assert v.store.exists(second.object_id)
        keys = [str(o["Key"]) for o in bucket_objects(s3_bucket)]
        assert len(keys) == 1 and second.object_id in keys[0]
    finally:
        v.close()


@pytest.mark.s3
def test_tls_is_verified(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    """Without the endpoint's CA the certificate does not verify: no request goes through
    (there is no setting to turn verification off)."""
    from pacsvault.config import StorageSettings
    from pacsvault.storage.backends import open_s3
    from pacsvault.storage.objects import StorageUnavailable

    server = s3_bucket.server
    settings = StorageSettings(url=f"{s3_bucket.url}/{PREFIX}", endpoint=server.endpoint,
                               region=server.region,
                               credentials_file=str(server.credentials_file), path_style=True)
    with pytest.raises(StorageUnavailable):
        open_s3(settings).stage_spare([b"pacsvault-obj/1\n"])
    trusted = open_s3(settings.model_copy(update={"ca_file": str(server.ca_file)}))
    object_id = trusted.stage_spare([b"pacsvault-obj/1\n"])
    assert trusted.read(object_id) == b"pacsvault-obj/1\n"
    trusted.remove([object_id])
    with pytest.raises(FileNotFoundError):
        trusted.read(object_id)


# --- S3 endpoint down during ingest ----------------------------------------------------------


def _statuses(res: subprocess.CompletedProcess[str]) -> str:
    return res.stdout + res.stderr


@pytest.mark.s3
@pytest.mark.slow
def test_endpoint_down_fails_stores_then_ingest_resumes(tmp_path: Path) -> None:
    with running_seaweed() as s3:
        bucket = create_bucket(s3)
        vault = make_vault(tmp_path / "v")
        use_bucket(vault, bucket)
        vault.add_node(MODALITY)
        first = corpus.synthetic_ct_series(tmp_path / "a", 2, size=32, seed=1)
        during = corpus.synthetic_ct_series(tmp_path / "b", 2, size=32, seed=2)
        server = start_server(vault)
        try:
            res = storescu(server.port, first, calling=MODALITY)
            assert res.returncode == 0, _statuses(res)
            s3.stop()
            res = storescu(server.port, during, calling=MODALITY, extra=("-nh", "-v"),
                           timeout=180)
            responses = [line for line in _statuses(res).splitlines()
                         if "Received Store Response" in line]
            assert len(responses) == len(during), _statuses(res)
            assert all("Success" not in line and "OutOfResources" in line
                       for line in responses), responses
            failed = wait_events(vault, "dicom.store.failed", count=len(during), timeout=60)
            assert len(failed) >= len(during)
            assert all("StorageUnavailable" in str(e["message"]) for e in failed), failed
            s3.start()
            assert wait_until(lambda: storescu(server.port, during,
                                               calling=MODALITY).returncode == 0, 120, 2), \
                server.log()[-3000:]
        finally:
            server.stop()
        v = vault.open()
        try:
            stored = {i.sop_uid for i in v.archive.locate()}
            for path in first + during:
                sop = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
                assert sop in stored
            for item in v.archive.locate():
                assert v.archive.read(item)
        finally:
            v.close()


@pytest.mark.s3
@pytest.mark.slow
def test_sealed_start_stores_into_the_bucket_and_unseals(tmp_path: Path,
                                                         s3_bucket: S3Bucket) -> None:
    """Without its master key the server still receives (sealed mode): the objects go to
    the bucket, and the unseal indexes them, readable and identical."""
    vault = make_vault(tmp_path / "v")
    use_bucket(vault, s3_bucket)
    vault.add_node(MODALITY)  # also makes the sealed-mode material
    files = corpus.synthetic_ct_series(tmp_path / "ct", 3, size=32)
    away = vault.root / "away.key"
    vault.key.rename(away)
    server = start_server(vault)
    try:
        res = storescu(server.port, files, calling=MODALITY)
        assert res.returncode == 0, _statuses(res)
        assert len(bucket_objects(s3_bucket)) == 3
        away.rename(vault.key)
        out = pv("unseal", "--data", vault.data, "--key-file", vault.key).stdout
        assert "3 object(s)" in out, out
    finally:
        server.stop()
    v = vault.open()
    try:
        assert v.archive.counts()["instances"] == 3
        stored = {i.sop_uid: i for i in v.archive.locate()}
        for path in files:
            item = stored[str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)]
            same_dataset(path, dcmread(io.BytesIO(v.archive.read(item))))
    finally:
        v.close()
    assert len(bucket_objects(s3_bucket)) == 3
    assert not [p for p in (vault.data / "objects").rglob("*") if p.is_file()
                and p.stat().st_size]


# --- no endpoint needed ----------------------------------------------------------------------


def test_storage_url_credentials_and_endpoint_checks(tmp_path: Path) -> None:
    from pacsvault.config import StorageSettings
    from pacsvault.storage.backends import (
        StorageConfigError,
        parse_url,
        read_credentials,
        s3_client,
    )

    assert parse_url("s3://my-bucket/pacsvault/site1/") == ("my-bucket", "pacsvault/site1")
    assert parse_url("s3://my-bucket") == ("my-bucket", "")
    for bad in ("s3://My_Bucket/x", "https://b/x", "s3://b"):
        with pytest.raises(StorageConfigError):
            parse_url(bad)
    creds = tmp_path / "s3.credentials"
    creds.write_text("# keys\naccess_key_id = AKIAEXAMPLE\nsecret_access_key = s3cr3t\n")
    creds.chmod(0o644)
    with pytest.raises(StorageConfigError, match="chmod 600"):
        read_credentials(creds)
    creds.chmod(0o600)
    assert read_credentials(creds) == {"access_key_id": "AKIAEXAMPLE",
                                       "secret_access_key": "s3cr3t"}
    aws = tmp_path / "aws"
    aws.write_text("[default]\naws_access_key_id = A\naws_secret_access_key = B\n")
    aws.chmod(0o600)
    assert read_credentials(aws)["secret_access_key"] == "B"
    # plain http only to this machine; TLS is always verified (no switch exists)
    with pytest.raises(StorageConfigError, match="https"):
        s3_client(StorageSettings(url="s3://b-1/x", endpoint="http://s3.example.net",
                                  credentials_file=str(creds)))
    client = s3_client(StorageSettings(url="s3://b-1/x", endpoint="http://127.0.0.1:9",
                                       credentials_file=str(creds)))
    assert client.meta.endpoint_url == "http://127.0.0.1:9"
    with pytest.raises(ValueError):
        StorageSettings(url="s3://b/../x")


def test_object_storage_alerts() -> None:
    """A scrub that found damage, and stores refused because the endpoint is down, raise
    ``object-storage`` (not ``disk-full``: there is no disk to free)."""
    from pacsvault.audit.alerts.findings import Severity
    from pacsvault.audit.events import EventCode, Outcome
    from tests.test_alerts import MONDAY_10, detector, ev

    det, _ = detector()
    scrubbed = ev("storage.scrub", MONDAY_10, code=EventCode.APPLICATION_ACTIVITY,
                  outcome=Outcome.SERIOUS_FAILURE, message="Object scrub: ...",
                  detail={"checked": 4, "missing": 1, "corrupt": 1})
    alerts = det.observe(scrubbed)
    assert [a.rule for a in alerts] == ["object-storage"]
    assert alerts[0].severity is Severity.CRITICAL and "1 missing and 1 corrupt" in alerts[0].text
    refused = ev("dicom.store.failed", MONDAY_10, code=EventCode.INSTANCES_TRANSFERRED,
                 outcome=Outcome.SERIOUS_FAILURE, actor_ae="MODALITY",
                 actor_address="192.168.1.10",
                 message="status A700: storage error StorageUnavailable")
    alerts = det.observe(refused)
    assert [a.rule for a in alerts] == ["object-storage"]
    assert "unreachable" in alerts[0].title
    assert det.observe(ev("storage.scrub", MONDAY_10, code=EventCode.APPLICATION_ACTIVITY,
                          detail={"checked": 4, "missing": 0, "corrupt": 0})) == []


@pytest.mark.slow
def test_bad_storage_settings_are_one_line_errors(tmp_path: Path) -> None:
    """A credentials file readable by others, checked when the vault opens: every command
    says so in one line (and boto3 is not imported by a command that reads no object)."""
    vault = new_vault(tmp_path)
    creds = tmp_path / "s3.credentials"
    creds.write_text("access_key_id = A\nsecret_access_key = B\n")
    creds.chmod(0o644)
    for name, value in (("url", '"s3://pv-bucket/x"'), ("endpoint", '"https://127.0.0.1:9"'),
                        ("credentials_file", f'"{creds}"')):
        vault.set_toml("storage", name, value)
    res = vault.cli("node", "list", check=False)
    assert res.returncode == 2, res.stdout + res.stderr
    assert res.stderr.strip().splitlines() == [
        f"pacsvault: error: the S3 credentials file {creds} must be private (chmod 600): "
        "it holds a secret key"]
    creds.chmod(0o600)
    res = vault.cli("node", "list", check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    probe = ("import sys; from pacsvault.vault import Vault; "
             f"v = Vault.open(__import__('pathlib').Path({str(vault.data)!r}), "
             f"__import__('pathlib').Path({str(vault.key)!r})); "
             "print(v.store.kind, 'boto3' in sys.modules); v.close()")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.split() == ["s3", "False"], out.stdout + out.stderr
