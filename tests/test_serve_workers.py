"""``serve --workers 2`` (issue 16, part 4): one parent holding the lock and the listening
sockets, two worker processes accepting on them, real storescu/echoscu and HTTPS clients.

What is shown: parallel associations are spread over both workers and every acknowledged
image is indexed and readable; the trail (one chain, appended by both) verifies; kill -9
of a worker mid-batch loses nothing acknowledged and the parent starts it again; SIGTERM
to the parent stops everything and frees the vault's lock, kill -9 of the parent takes the
workers down; a browser session made on one worker is honoured by the other (sessions
live in the index); an online key rotation stops worker 1, rotates in worker 0 while it
keeps serving, and worker 1 comes back on the new key. The server tests are slow (real
processes); the two first ones are not.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import ssl
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom import dcmread

from pacsvault.cli import workers
from pacsvault.cli.common import CommandError
from tests import corpus
from tests.helpers import (
    AE,
    Server,
    VaultDir,
    dcmtk,
    dcmtk_env,
    echoscu,
    events,
    make_vault,
    pv,
    start_server,
    storescu,
    storescu_stream,
    wait_until,
)
from tests.web_helpers import check_security_headers, sign_in

CALLING = "MODALITY"
WS = "WORKSTATION"
SENDING = "I: Sending file: "
STORED = "I: Received Store Response (Success)"


def test_worker_count_and_refusals(tmp_path: Path) -> None:
    assert workers.count("auto") == max(1, min(workers.AUTO_MAX, os.cpu_count() or 1))
    # issue 17: one process on the embedded index (one SQLite writer), whatever the cores
    assert workers.count("auto", shared_index=False) == 1
    assert workers.count("3", shared_index=False) == 3
    assert workers.count("3") == 3
    for bad in ("0", "-1", "many"):
        with pytest.raises(CommandError):
            workers.count(bad)
    proc = pv("serve", "--data", tmp_path / "none", "--workers", "0", check=False)
    assert proc.returncode == 2 and "--workers must be at least 1" in proc.stderr
    assert not (tmp_path / "none").exists()  # refused before anything was made
    # the workers' hidden options, typed by hand: no serving without the parent's lock
    vault = make_vault(tmp_path / "vault")
    proc = pv("serve", "--data", vault.data, "--key-file", vault.key, "--worker-index", "0",
              "--workers", "1", check=False)
    assert proc.returncode == 2 and "for its own workers" in proc.stderr, proc.stderr


def test_worker_command_line_carries_no_secret(tmp_path: Path) -> None:
    args = argparse.Namespace(key_file=tmp_path / "k", passphrase_file=tmp_path / "p",
                              verbose=False, allow_root=True)
    argv = workers.worker_argv(args, tmp_path / "data", "127.0.0.1", 2)
    assert "--passphrase-file" not in argv and str(tmp_path / "p") not in argv
    assert argv[argv.index("--workers") + 1] == "2"
    assert argv[argv.index("--key-file") + 1] == str(tmp_path / "k")


def _sop_uid(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def _c_get(port: int, study_uid: str, out: Path) -> dict[str, bytes]:
    """C-GET one study (dcmtk getscu): SOP UID -> pixel data received."""
    out.mkdir(parents=True)
    res = subprocess.run(
        [dcmtk("getscu"), "-S", "-aet", WS, "-aec", AE, "-od", str(out),
         "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}",
         "127.0.0.1", str(port)], capture_output=True, text=True, env=dcmtk_env(), timeout=90)
    assert res.returncode == 0, res.stdout + res.stderr
    return {str(ds.SOPInstanceUID): ds.PixelData for ds in map(dcmread, out.iterdir())}


def _state(vault: VaultDir) -> dict[str, object]:
    return json.loads((vault.data / "serve.json").read_text())  # type: ignore[no-any-return]


def _worker_pids(vault: VaultDir) -> list[int]:
    pids = _state(vault)["worker_pids"]
    assert isinstance(pids, list)
    return [int(p) for p in pids]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _exported(vault: VaultDir, out: Path) -> dict[str, bytes]:
    """Every instance, decrypted and read back through the CLI: SOP UID -> bytes."""
    vault.cli("export", "--all", "--out", out)
    return {p.stem: p.read_bytes() for p in out.rglob("*.dcm")}


def _workers_seen(vault: VaultDir) -> set[object]:
    return {e.get("worker") for e in events(vault, "dicom.association.accepted")}


@pytest.fixture
def vault(tmp_path: Path) -> VaultDir:
    made = make_vault(tmp_path / "vault")
    made.add_node(CALLING)
    made.add_node(WS, "--roles", "query,retrieve")
    return made


def _start(vault: VaultDir, log_name: str = "serve.log") -> Server:
    server = start_server(vault, log_name=log_name, args=("--workers", "2"), timeout=90)
    assert len(_worker_pids(vault)) == 2
    return server


@pytest.mark.timeout(120)
def test_auto_is_one_process_on_the_embedded_index(vault: VaultDir, tmp_path: Path) -> None:
    """Issue 17: ``--workers auto`` (the default) serves an embedded vault from one
    process: no worker processes, no lean supervisor, and it stores and answers."""
    import psutil

    server = start_server(vault, args=("--workers", "auto"), timeout=90)
    try:
        assert not _state(vault).get("worker_pids")
        assert psutil.Process(server.proc.pid).children(recursive=True) == []
        files = corpus.synthetic_ct_series(tmp_path / "ct", 2, size=64)
        res = storescu(server.port, files, calling=CALLING)
        assert res.returncode == 0, res.stdout + res.stderr
    finally:
        server.stop()
    assert {e.get("worker") for e in events(vault, "application.start")} <= {None}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_parallel_associations_spread_over_two_workers(vault: VaultDir,
                                                       tmp_path: Path) -> None:
    files = corpus.synthetic_ct_series(tmp_path / "ct", 40, size=128)
    server = _start(vault)
    try:
        chunks = [files[i::4] for i in range(4)]
        results: list[subprocess.CompletedProcess[str]] = []
        threads = [threading.Thread(target=lambda c=chunk: results.append(
            storescu(server.port, c, calling=CALLING, timeout=180))) for chunk in chunks]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(200)
        assert len(results) == 4
        for res in results:
            assert res.returncode == 0, res.stdout + res.stderr
        # The kernel hands each connection to one worker; parallel echoes until both have
        # served one (a bounded number of tries).
        for _ in range(10):
            if _workers_seen(vault) >= {0, 1}:
                break
            echoes = [threading.Thread(target=echoscu, args=(server.port,),
                                       kwargs={"calling": CALLING}) for _ in range(4)]
            for echo in echoes:
                echo.start()
            for echo in echoes:
                echo.join(60)
        assert _workers_seen(vault) >= {0, 1}
        starts = events(vault, "application.start")
        assert {e.get("worker") for e in starts} >= {0, 1}
        assert {e.get("pid") for e in starts} >= set(_worker_pids(vault))

        exported = _exported(vault, tmp_path / "export")
        assert set(exported) == {_sop_uid(f) for f in files}
        # read back over the network too: two C-GETs at once (either worker serves each)
        study = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        pixels = {_sop_uid(f): dcmread(f).PixelData for f in files}
        got: list[dict[str, bytes]] = []
        gets = [threading.Thread(target=lambda i=i: got.append(
            _c_get(server.port, study, tmp_path / f"get{i}"))) for i in range(2)]
        for get in gets:
            get.start()
        for get in gets:
            get.join(120)
        assert len(got) == 2 and all(g == pixels for g in got)
        proc = vault.cli("audit", "verify", check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        # one process, worker 0, runs the control socket (and the jobs)
        assert (vault.data / "control.sock").exists()
    finally:
        assert server.stop() == 0
    assert "Traceback" not in server.log()


def _push_and_kill(port: int, files: list[Path], kill_after: int,
                   kill: Callable[[], None]) -> tuple[list[Path], int]:
    """One storescu batch; ``kill()`` once ``kill_after`` stores are acknowledged.

    The kill must find the association still open, whatever the machine's load:
    storescu is held near the reader (``storescu_stream``) and stopped (SIGSTOP) from the
    ``kill_after``-th acknowledgement read until ``kill()`` returned. CI, 2026-12-05 and
    2026-12-07: a fast server, or a slow test process, had let the whole batch go and the
    association close before the kill ("no worker holds the association")."""
    proc, lines = storescu_stream(port, files, calling=CALLING)
    acked: list[Path] = []
    sending: Path | None = None
    try:
        for line in lines:
            line = line.strip()
            if line.startswith(SENDING):
                sending = Path(line[len(SENDING):])
            elif line.startswith(STORED) and sending is not None:
                acked.append(sending)
                sending = None
                if len(acked) == kill_after:
                    os.kill(proc.pid, signal.SIGSTOP)
                    try:
                        kill()
                    finally:
                        os.kill(proc.pid, signal.SIGCONT)
        code = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return acked, code


def _serving(port: int, pids: list[int]) -> int | None:
    """The worker holding an established connection to ``port`` (from /proc: the
    connection's socket inode, found among each worker's open files)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01":
                inodes.add(fields[9])
    for pid in pids:
        try:
            links = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
        except OSError:
            continue
        if {f"socket:[{inode}]" for inode in inodes} & links:
            return pid
    return None


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_kill9_of_a_worker_mid_batch(vault: VaultDir, tmp_path: Path) -> None:
    files = corpus.synthetic_ct_series(tmp_path / "ct", 90, size=256)
    server = _start(vault)
    try:
        acked: list[Path] = []
        killed: list[int] = []

        def kill_the_one_serving() -> None:
            pid = _serving(server.port, _worker_pids(vault))
            assert pid is not None, "no worker holds the association"
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

        # Two rounds: each time the worker serving the association dies after 8
        # acknowledged stores; the association is cut, the parent starts it again.
        for batch in (files[:45], files[45:]):
            got, code = _push_and_kill(server.port, batch, 8, kill_the_one_serving)
            acked += got
            assert code != 0 and 8 <= len(got) < len(batch)
            assert wait_until(lambda: not set(_worker_pids(vault)) & set(killed)
                              and all(_alive(p) for p in _worker_pids(vault)), 60)
        assert len(killed) == 2
        assert server.alive()
        assert "ended (signal 9); starting it again" in server.log()

        exported = _exported(vault, tmp_path / "export")
        sent = {_sop_uid(f): f for f in files}
        missing = {_sop_uid(f) for f in acked} - set(exported)
        assert not missing, f"{len(missing)} acknowledged instance(s) lost"
        assert set(exported) <= set(sent)
        for uid, data in exported.items():  # nothing half-written: each one is whole
            assert data[-4096:] == sent[uid].read_bytes()[-4096:]
        # the rest goes through the restarted workers (re-sent ones are duplicates)
        rest = [f for f in files if f not in set(acked)]
        res = storescu(server.port, rest, calling=CALLING, timeout=180)
        assert res.returncode == 0, res.stdout + res.stderr
        assert set(_exported(vault, tmp_path / "export2")) == set(sent)
        proc = vault.cli("audit", "verify", check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    finally:
        assert server.stop() == 0


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_online_key_rotation_stops_and_restarts_the_other_worker(vault: VaultDir,
                                                                 tmp_path: Path) -> None:
    files = corpus.synthetic_ct_series(tmp_path / "ct", 8, size=128)
    server = _start(vault)
    try:
        before = _worker_pids(vault)
        old_key = vault.key.read_bytes()
        served_by_1 = sum(1 for e in events(vault, "dicom.association.accepted")
                          if e.get("worker") == 1)
        proc = vault.cli("keys", "rotate", check=False, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "online" in proc.stderr
        assert vault.key.read_bytes() != old_key
        # worker 0 rotated while serving; worker 1 was stopped and started on the new key
        assert wait_until(lambda: (pids := _worker_pids(vault))[0] == before[0]
                          and len(pids) == 2 and pids[1] != before[1], 60)
        assert "stopped for a key rotation" in server.log()

        def worker_1_served() -> bool:
            echoes = [threading.Thread(target=echoscu, args=(server.port,),
                                       kwargs={"calling": CALLING}) for _ in range(4)]
            for echo in echoes:
                echo.start()
            for echo in echoes:
                echo.join(60)
            return sum(1 for e in events(vault, "dicom.association.accepted")
                       if e.get("worker") == 1) > served_by_1

        assert wait_until(worker_1_served, 90, period=0.5), server.log()
        # the HTTPS listener survived the stop of worker 1 (it shares it): 8 connections
        with _fresh_connections(server.https_port, vault.data / "tls" / "ca.crt") as browser:
            for _ in range(8):
                assert browser.get("/login").status_code == 200
        res = storescu(server.port, files, calling=CALLING, timeout=180)
        assert res.returncode == 0, res.stdout + res.stderr
        assert set(_exported(vault, tmp_path / "export")) == {_sop_uid(f) for f in files}
        proc = vault.cli("audit", "verify", check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    finally:
        assert server.stop() == 0
    assert "Traceback" not in server.log()


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_sigterm_stops_every_worker_and_frees_the_lock(vault: VaultDir) -> None:
    server = _start(vault)
    pids = _worker_pids(vault)
    assert all(_alive(p) for p in pids)
    assert echoscu(server.port, calling=CALLING).returncode == 0
    assert server.stop() == 0
    assert wait_until(lambda: not any(_alive(p) for p in pids), 10)
    assert not (vault.data / "serve.json").exists()
    stops = events(vault, "application.stop")
    assert len(stops) >= 2
    # the lock is free: a new server (one process) starts on the vault
    again = start_server(vault, log_name="serve-again.log", args=("--workers", "1"))
    assert again.stop() == 0


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_kill9_of_the_parent_takes_the_workers_down(vault: VaultDir) -> None:
    server = _start(vault)
    pids = _worker_pids(vault)
    server.kill9()
    assert wait_until(lambda: not any(_alive(p) for p in pids), 20), \
        "workers outlived their parent"


def _fresh_connections(port: int, ca: Path) -> httpx.Client:
    """A client that opens a new TCP connection per request: the kernel may hand each to
    either worker."""
    transport = httpx.HTTPTransport(verify=ssl.create_default_context(cafile=str(ca)),
                                    limits=httpx.Limits(max_keepalive_connections=0))
    return httpx.Client(base_url=f"https://127.0.0.1:{port}", transport=transport,
                        timeout=30, headers={"accept": "text/html"},
                        event_hooks={"response": [check_security_headers]})


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_a_session_made_on_one_worker_holds_on_the_other(vault: VaultDir) -> None:
    server = _start(vault)
    try:
        with _fresh_connections(server.https_port, vault.data / "tls" / "ca.crt") as browser:
            sign_in(browser, vault.admin_name, vault.admin_password)
            # 16 requests on 16 connections: with two workers both serve some of them
            for _ in range(16):
                page = browser.get("/account")
                assert page.status_code == 200, page.status_code
    finally:
        assert server.stop() == 0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_protected_key_reaches_restarted_workers_through_the_pipe(vault: VaultDir,
                                                                     tmp_path: Path) -> None:
    pp = tmp_path / "passphrase"
    pp.write_text("velo rouge sur le pont de Nantes a midi\n")
    pp.chmod(0o600)
    vault.cli("keys", "protect", "--passphrase", "--passphrase-file", pp)
    server = start_server(vault, args=("--workers", "2", "--passphrase-file", str(pp)),
                          timeout=90)
    try:
        before = _worker_pids(vault)
        pp.unlink()  # from now on only the parent has it
        os.kill(before[1], signal.SIGKILL)
        assert wait_until(lambda: len(pids := _worker_pids(vault)) == 2
                          and pids[1] != before[1] and _alive(pids[1]), 60)
        restarted = _worker_pids(vault)[1]
        # it opened the vault (its application.start line) and keeps running
        assert wait_until(lambda: f"w1[{restarted}] pacsvault.events: application.start"
                          in server.log(), 60), server.log()
        assert _alive(restarted)
        for _ in range(4):
            assert echoscu(server.port, calling=CALLING).returncode == 0
        assert "passphrase" not in " ".join(
            Path(f"/proc/{restarted}/cmdline").read_text().split("\0")).replace(
                "--passphrase-fd", "")
    finally:
        assert server.stop() == 0


def _holder(server_port: int, client_port: int, pids: list[int]) -> int | None:
    """The worker holding the server side of the connection from ``client_port``."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if (int(fields[1].rsplit(":", 1)[1], 16) == server_port
                        and int(fields[2].rsplit(":", 1)[1], 16) == client_port):
                    inodes.add(f"socket:[{fields[9]}]")
    for pid in pids:
        with contextlib.suppress(OSError):
            if inodes & {os.readlink(f"/proc/{pid}/fd/{fd}")
                         for fd in os.listdir(f"/proc/{pid}/fd")}:
                return pid
    return None


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_kill9_of_the_committing_worker_while_the_other_stores(vault: VaultDir,
                                                               tmp_path: Path) -> None:
    """Issue 17 (``storage.commit_link``): worker 0 commits the stores of worker 1. Killed
    between two stores of an association worker 1 holds, the next stores of that same
    association are still stored (worker 1 commits them itself until worker 0 is back),
    nothing acknowledged is lost, the trail verifies."""
    from pydicom.uid import CTImageStorage
    from pynetdicom import AE as ClientAE

    files = corpus.synthetic_ct_series(tmp_path / "ct", 36, size=64)
    server = _start(vault)
    held: list[Any] = []
    try:
        assert wait_until(lambda: (vault.data / "commit.sock").exists(), 30)
        pids = _worker_pids(vault)
        ae = ClientAE(ae_title=CALLING)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
        ae.add_requested_context(CTImageStorage)
        on_1 = None
        for _ in range(16):  # the kernel hands each connection to either worker
            assoc = ae.associate("127.0.0.1", server.port, ae_title=AE)
            assert assoc.is_established
            held.append(assoc)
            assert assoc.dul.socket is not None and assoc.dul.socket.socket is not None
            port = int(assoc.dul.socket.socket.getsockname()[1])

            def found(client: int = port) -> bool:
                return _holder(server.port, client, pids) is not None

            if wait_until(found, 10) and _holder(server.port, port, pids) == pids[1]:
                on_1 = assoc
                break
        assert on_1 is not None, "no association reached worker 1"
        statuses = [int(on_1.send_c_store(dcmread(f)).Status) for f in files[:12]]
        os.kill(pids[0], signal.SIGKILL)
        assert wait_until(lambda: not _alive(pids[0]), 10)
        statuses += [int(on_1.send_c_store(dcmread(f)).Status) for f in files[12:24]]
        assert statuses == [0] * 24, [hex(s) for s in statuses]
        on_1.release()
        assert wait_until(lambda: (now := _worker_pids(vault))[0] != pids[0]
                          and _alive(now[0]), 60)
        # worker 0 is back: the rest through either worker
        res = storescu(server.port, files[24:], calling=CALLING, timeout=180)
        assert res.returncode == 0, res.stdout + res.stderr
        assert set(_exported(vault, tmp_path / "export")) == {_sop_uid(f) for f in files}
        proc = vault.cli("audit", "verify", check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    finally:
        for assoc in held:
            if assoc.is_established:
                assoc.abort()
        assert server.stop() == 0
