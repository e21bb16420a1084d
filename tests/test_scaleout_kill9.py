"""kill -9 of one of two instances in the middle of a storescu batch (issue 16, "Tests that
must exist").

Two real ``serve`` processes (A and B, data directories made by ``instances add``) share
one PostgreSQL index and one SeaweedFS bucket. In each of three rounds dcmtk storescu sends
a batch of 200 small CT images to A, and A (its parent and every worker) gets SIGKILL
a few ms after a number of stores have been acknowledged (in the middle of the next
store: its object PUT, its row not committed); A is started again between rounds.
Then, from B, which ran all along:

- every acknowledged image (storescu printed a Success response for it) comes back by
  C-GET and is identical to what was sent: the durability rule (success only after the
  PUT is confirmed and the row committed) holds across a kill;
- C-FIND lists no instance that C-GET cannot deliver whole (nothing half-written is
  visible: a row never names a missing object);
- after A's restart the orphan sweep keeps an object no row names while it is younger
  than the grace, removes it after, and then every object of the bucket is one the index
  names.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE as ClientAE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
)

from pacsvault.storage import scrub
from tests import corpus
from tests.harness.postgres import PostgresDatabase
from tests.harness.seaweed import S3Bucket
from tests.helpers import (
    AE,
    Server,
    VaultDir,
    dcmtk,
    dcmtk_env,
    first_run_secrets,
    pv,
    start_server,
    storescu_stream,
)
from tests.test_s3_storage import PREFIX, bucket_objects, same_dataset, use_bucket

MODALITY, WS = "MODALITY", "WS"
SENDING = "I: Sending file: "
STORED = "I: Received Store Response (Success)"
BATCH = 200
# Per round: stores acknowledged, then how long after that acknowledgement A dies. One
# small store takes ~16 ms on A here (parse, PUT, commit): the delays put the kill at
# different points of the next store, so that the object PUT without its row happens.
ROUNDS = ((25, 0.0), (50, 0.006), (75, 0.012))  # acknowledged stores before the kill, per round


@dataclass
class Pair:
    a: VaultDir
    b: VaultDir


@pytest.fixture
def pair(tmp_path: Path, postgres_db: PostgresDatabase, s3_bucket: S3Bucket) -> Iterator[Pair]:
    """A made by ``init`` on the PostgreSQL index and the bucket, B by ``instances add``."""
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
        va.nodes.add(MODALITY, "127.0.0.1", roles=("store", "query"))
        va.nodes.add(WS, "127.0.0.1", roles=("store", "query", "retrieve"))
    finally:
        va.close()
    pv("instances", "add", "b", "--to", tmp_path / "b" / "data", "--host", "127.0.0.1",
       "--data", a.data, "--key-file", key)
    yield Pair(a, VaultDir(tmp_path / "b", key, a.recovery_code))


def _pids(server: Server) -> list[int]:
    """A's processes: its workers (from serve.json) and the parent."""
    import json

    state = json.loads((server.vault.data / "serve.json").read_text())
    return [int(p) for p in state.get("worker_pids") or []] + [server.proc.pid]


def _kill9(server: Server) -> None:
    """SIGKILL to every process of A at once (not its process group: that is pytest's)."""
    pids = _pids(server)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    server.proc.wait(10)
    for pid in pids[:-1]:  # the workers are not our children: wait until they are gone
        for _ in range(100):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            raise AssertionError(f"worker {pid} survived SIGKILL")


def _push_and_kill(server: Server, files: list[Path], kill_after: int,
                   delay: float) -> list[Path]:
    """One storescu batch to A, killed ``delay`` s after ``kill_after`` stores are
    acknowledged; the files storescu saw a Success response for."""
    proc, lines = storescu_stream(server.port, files, calling=MODALITY)
    acked: list[Path] = []
    sending: Path | None = None
    killer = threading.Timer(delay, _kill9, (server,))
    try:
        for line in lines:
            line = line.strip()
            if line.startswith(SENDING):
                sending = Path(line[len(SENDING):])
            elif line.startswith(STORED) and sending is not None:
                acked.append(sending)
                sending = None
                if len(acked) == kill_after:
                    killer.start()
        code = proc.wait(60)
        killer.join(30)
    finally:
        killer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code != 0 and kill_after <= len(acked) < len(files), (code, len(acked))
    return acked


def _sop_uid(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def _c_find_images(port: int, study_uid: str) -> set[str]:
    """SOP Instance UIDs C-FIND lists for a study (IMAGE level), asked of ``port``."""
    client = ClientAE(ae_title=MODALITY)
    client.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = client.associate("127.0.0.1", port, ae_title=AE)
    assert assoc.is_established
    query = Dataset()
    query.QueryRetrieveLevel, query.StudyInstanceUID = "IMAGE", study_uid
    query.SeriesInstanceUID = query.SOPInstanceUID = ""
    try:
        found = {str(ds.SOPInstanceUID) for status, ds in assoc.send_c_find(
            query, StudyRootQueryRetrieveInformationModelFind)
            if status and status.Status in (0xFF00, 0xFF01) and ds is not None}
    finally:
        assoc.release()
    return found


def _c_get(port: int, study_uid: str, out: Path) -> dict[str, Path]:
    """C-GET of a whole study from ``port`` (dcmtk getscu): SOP UID -> file received."""
    out.mkdir(parents=True)
    res = subprocess.run(
        [dcmtk("getscu"), "-S", "-aet", WS, "-aec", AE, "-od", str(out),
         "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}",
         "127.0.0.1", str(port)], capture_output=True, text=True, env=dcmtk_env(), timeout=90)
    assert res.returncode == 0, res.stdout + res.stderr
    return {_sop_uid(p): p for p in out.iterdir()}


@pytest.mark.postgres
@pytest.mark.s3
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_kill9_of_instance_a_mid_batch(pair: Pair, tmp_path: Path,
                                       s3_bucket: S3Bucket) -> None:
    rounds = [corpus.synthetic_ct_series(tmp_path / f"ct{r}", BATCH, seed=r, size=32)
              for r in range(len(ROUNDS))]
    server_b = start_server(pair.b)
    try:
        acked: list[list[Path]] = []
        for files, (kill_after, delay) in zip(rounds, ROUNDS, strict=True):
            server_a = start_server(pair.a)
            acked.append(_push_and_kill(server_a, files, kill_after, delay))
        # A again after the last kill: its start-up recovery runs; B served all along.
        server_a = start_server(pair.a)
        assert server_b.alive()
        for r, (files, got) in enumerate(zip(rounds, acked, strict=True)):
            study = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
            sent = {_sop_uid(f): f for f in files}
            listed = _c_find_images(server_b.port, study)
            received = _c_get(server_b.port, study, tmp_path / f"get{r}")
            # every acknowledged image is there, read from B
            missing = {_sop_uid(f) for f in got} - set(received)
            assert not missing, f"round {r}: {len(missing)} acknowledged image(s) lost"
            # what B lists, B delivers, whole and identical to what was sent (a store
            # cut by the kill before its answer may be there or not, never half of it)
            assert listed == set(received), f"round {r}: listed {len(listed)}, " \
                f"delivered {len(received)}"
            assert set(received) <= set(sent)
            for uid, path in received.items():
                back = dcmread(path)
                same_dataset(sent[uid], back)
                assert back.PixelData == dcmread(sent[uid]).PixelData
        assert server_a.alive() and server_b.alive()
    finally:
        server_b.stop()
        if "server_a" in locals():
            server_a.stop()

    # Recovery: an object PUT by A whose row the kill never committed stays while it is
    # younger than the grace (it could be a store in flight on another instance), then
    # the sweep removes it; afterwards the bucket holds exactly the indexed objects.
    va = pair.a.open()
    try:
        indexed = {i.object_id for i in va.archive.locate()}
        stored = {str(o["Key"]).rsplit("/", 1)[1].removesuffix(".pvo")
                  for o in bucket_objects(s3_bucket) if str(o["Key"]).startswith(PREFIX)}
        assert indexed <= stored  # no row without its object
        orphans = stored - indexed
        assert len(orphans) <= len(ROUNDS) * 4  # at most what was in flight per kill
        kept = scrub.sweep(va)
        assert kept is not None and kept.removed == () and kept.young == len(orphans)
        done = scrub.sweep(va, grace=0.001)
        assert done is not None and set(done.removed) == orphans
        after = {str(o["Key"]).rsplit("/", 1)[1].removesuffix(".pvo")
                 for o in bucket_objects(s3_bucket)}
        assert after == indexed
        for item in va.archive.locate():  # every indexed object still reads
            assert va.archive.read(item)
    finally:
        va.close()
