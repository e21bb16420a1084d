"""The parent of ``serve --workers N`` is lean once started (issue 17: peak RSS during
ingest): after the once-per-vault start it replaces its image with ``cli/supervise``,
which holds the lock and the listening sockets but none of the server stack.

Robust checks instead of timings: which shared objects and file descriptors the parent
still has (``/proc/PID/maps``, ``/proc/PID/fd``), its RSS against a generous bound, and
which modules the supervisor's import pulls in (``-X importtime``, as
``test_cli_imports``). A start that fails before the workers (here the storage recovery)
stops with one line and frees the lock.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from bench.cli_startup import imports

from pacsvault.service import lock as instance_lock
from tests.helpers import Server, VaultDir, echoscu, make_vault, pv, start_server, wait_until

CALLING = "MODALITY"
# The server stack's native parts: SQLCipher/SQLite, cryptography, pydantic, numpy, pyrage.
HEAVY_OBJECTS = ("sqlcipher", "_sqlite3", "_cffi_backend", "_rust.abi3", "_pydantic_core",
                 "_multiarray_umath", "pyrage")
HEAVY_MODULES = {"sqlalchemy", "pydicom", "pynetdicom", "cryptography", "fastapi", "uvicorn",
                 "starlette", "pydantic", "numpy", "pyrage", "sqlcipher3"}
RSS_LIMIT_KB = 80 * 1024  # the lean parent is ~16 MB, a server image ~180 MB


def test_the_supervisor_imports_no_server_stack() -> None:
    done = subprocess.run([sys.executable, "-X", "importtime", "-c",
                           "import pacsvault.cli.supervise"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    _, names = imports(done.stderr)
    assert names, "no -X importtime output"
    loaded = {name.split(".")[0] for name in names}
    assert not loaded & HEAVY_MODULES, sorted(loaded & HEAVY_MODULES)
    assert not {n for n in names if n.startswith("pacsvault.")} - {
        "pacsvault.cli", "pacsvault.cli.workers", "pacsvault.cli.supervise"}, names


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[VaultDir, Server]]:
    vault = make_vault(tmp_path_factory.mktemp("lean") / "vault")
    vault.add_node(CALLING)
    server = start_server(vault, args=("--workers", "2"), timeout=90)
    try:
        yield vault, server
    finally:
        server.stop()


def _status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {key} for pid {pid}")


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_the_parent_keeps_the_lock_and_sockets_but_not_the_server(
        served: tuple[VaultDir, Server]) -> None:
    vault, server = served
    pid = server.proc.pid
    state = json.loads((vault.data / "serve.json").read_text())
    assert state["pid"] == pid  # the same process: lock holder, systemd's main pid
    assert len(state["worker_pids"]) == 2
    cmdline = Path(f"/proc/{pid}/cmdline").read_text().split("\0")
    assert "pacsvault.cli.supervise" in cmdline, cmdline
    maps = Path(f"/proc/{pid}/maps").read_text()
    assert not [name for name in HEAVY_OBJECTS if name in maps], [
        line.split()[-1] for line in maps.splitlines() if any(n in line for n in HEAVY_OBJECTS)]
    rss = _status_kb(pid, "VmRSS")
    assert rss < RSS_LIMIT_KB, f"parent RSS {rss} kB"
    # its descriptors: the standard three, the vault's lock and the listening sockets only
    links = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")
             if int(fd) > 2}
    assert str(vault.data / instance_lock.LOCK_NAME) in links
    others = {link for link in links if not link.startswith("socket:")} - {
        str(vault.data / instance_lock.LOCK_NAME)}
    assert not others, others
    assert len(links) == 1 + 3  # plain DICOM, DICOM TLS, HTTPS on 127.0.0.1
    # the workers it spawned serve, and the lock is still held by the parent
    assert echoscu(server.port, calling=CALLING).returncode == 0
    with pytest.raises(instance_lock.AlreadyRunning) as held:
        instance_lock.acquire(vault.data)
    assert held.value.pid == pid
    workers = [int(p) for p in state["worker_pids"]]
    assert server.stop() == 0
    assert wait_until(lambda: not any(Path(f"/proc/{w}").exists() for w in workers), 20)
    assert not (vault.data / "serve.json").exists()
    instance_lock.acquire(vault.data).release()  # freed at the end
    assert "Traceback" not in server.log()


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_a_failing_recovery_stops_the_start_with_one_line(tmp_path: Path) -> None:
    vault = make_vault(tmp_path / "vault")
    # a folder where the recovery expects a leftover file: it cannot settle it
    (vault.data / "objects" / ".tmp" / "in-the-way").mkdir(parents=True)
    proc = pv("serve", "--data", vault.data, "--key-file", vault.key, "--bind", "127.0.0.1",
              "--dicom-port", "0", "--dicom-tls-port", "0", "--https-port", "0",
              "--workers", "2", check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "pacsvault: error:" in proc.stderr and "in-the-way" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "worker 0 started" not in proc.stderr  # nothing was spawned
    assert not (vault.data / "serve.json").exists()
    instance_lock.acquire(vault.data).release()
