"""Test harness: run the real CLI and server as subprocesses, and the real dcmtk peers.

Everything talks to 127.0.0.1 only. dcmtk binaries are called by absolute path because
pynetdicom installs Python scripts with the same names (storescu, echoscu …) that may come
first on PATH.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

# dcmtk, its environment and ports are shared with the benchmarks (tests/harness/peers.py);
# re-exported here, where every test module has always taken them.
from tests.harness.peers import dcmtk as dcmtk
from tests.harness.peers import dcmtk_env as dcmtk_env
from tests.harness.peers import free_port as free_port

if TYPE_CHECKING:
    import pytest

    from pacsvault.vault import Vault

AE = "PACSVAULT"

# The one escape hatch for the suite: CI and this harness run as root, and ``serve``
# refuses root unless told it is development (issue 12). Every subprocess inherits it;
# tests/test_service.py removes it to show the refusal.
os.environ.setdefault("PACSVAULT_ALLOW_ROOT", "1")
# ``serve`` runs one worker per core by default (issue 16, part 4): the suite's servers run
# one process unless a test asks for more (``--workers``, tests/test_serve_workers.py).
os.environ.setdefault("PACSVAULT_WORKERS", "1")
# ``pacsvault check`` asks the LAN's gateway for its port mappings (SSDP multicast, NAT-PMP
# to the default route): tests never do; tests/test_check_network.py points it at a fake
# gateway on loopback instead (issue 18).
os.environ.setdefault("PACSVAULT_CHECK_GATEWAY", "off")


def pv(*args: str | Path, check: bool = True, input: str | None = None,
       env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run the pacsvault CLI exactly as a user would."""
    proc = subprocess.run(
        [sys.executable, "-m", "pacsvault", *map(str, args)],
        capture_output=True, text=True, input=input, env=env, timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"pacsvault {' '.join(map(str, args))} failed ({proc.returncode}):\n"
            f"{proc.stdout}\n{proc.stderr}"
        )
    return proc


@dataclass
class VaultDir:
    """A vault created in a test's temporary directory, key file beside it."""

    root: Path
    key: Path
    recovery_code: str
    admin_password: str = ""  # the first admin's, from the one-time secrets file
    admin_name: str = "admin"  # chosen with ``init --admin`` (see make_vault)

    @property
    def data(self) -> Path:
        return self.root / "data"

    def cli(self, *args: str | Path, **kw: object) -> subprocess.CompletedProcess[str]:
        return pv(*args, "--data", self.data, "--key-file", self.key, **kw)  # type: ignore[arg-type]

    def add_node(self, ae: str, *flags: str, host: str = "127.0.0.1") -> None:
        self.cli("node", "add", ae, "--host", host, *flags)

    def open(self) -> Vault:
        from pacsvault.vault import Vault

        return Vault.open(self.data, self.key)

    def set_toml(self, section: str, key: str, value: str) -> None:
        """Replace one setting line in the generated toml (keeps the comments)."""
        path = self.data / "pacsvault.toml"
        lines = path.read_text().splitlines()
        out, current, done = [], "", False
        skip_array = False
        for line in lines:
            stripped = line.strip()
            if skip_array:
                if stripped.startswith("]"):
                    skip_array = False
                continue
            if stripped.startswith("[") and stripped.endswith("]"):
                current = stripped[1:-1]
            if current == section and stripped.startswith(f"{key} ="):
                out.append(f"{key} = {value}")
                skip_array = stripped.endswith("[")
                done = True
                continue
            out.append(line)
        assert done, f"{section}.{key} not in toml"
        path.write_text("\n".join(out) + "\n")


@dataclass(frozen=True)
class FirstRunSecrets:
    """What ``init`` (or the first ``serve``) wrote to its one-time secrets file."""

    path: Path
    recovery_code: str
    admin_name: str
    admin_password: str


def first_run_secrets(stdout: str) -> FirstRunSecrets:
    """Read the one-time secrets of a vault just created with stdout not a terminal: stdout
    then names the 0600 file they were written to (last line), never the secrets."""
    path = Path(stdout.strip().splitlines()[-1].strip())
    fields: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if line.startswith("#") or ":" not in line:
            continue
        name, _, value = line.partition(":")
        fields[name.strip()] = value.strip()
    return FirstRunSecrets(path, fields["recovery code"], fields["administrator"],
                           fields["password"])


def make_vault(root: Path, ae_title: str = AE, admin: str = "admin") -> VaultDir:
    """A new vault. Its first administrator is named ``admin`` here, on purpose and
    explicitly (``init --admin``): many tests sign in as that user. Without the option,
    ``init`` picks an unpredictable name (tests/test_hardening_accounts.py)."""
    root.mkdir(parents=True, exist_ok=True)
    key = root / "keys" / "master.key"
    proc = pv("init", "--data", root / "data", "--key-file", key, "--ae-title", ae_title,
              "--admin", admin)
    found = first_run_secrets(proc.stdout)
    return VaultDir(root, key, found.recovery_code, found.admin_password, found.admin_name)


def new_vault(root: Path, ae_title: str = AE) -> VaultDir:
    """A new vault made in-process (``vault.create``: no CLI start-up, no first
    administrator), for tests that drive the Vault API directly."""
    from pacsvault.vault import create

    key = root / "keys" / "master.key"
    return VaultDir(root, key, create(root / "data", key_file=key, ae_title=ae_title))


@dataclass
class Server:
    vault: VaultDir
    proc: subprocess.Popen[bytes]
    log_path: Path
    tmpdir: Path
    ports: dict[str, int] = field(default_factory=dict)

    @property
    def port(self) -> int:
        return self.ports["dicom_port"]

    @property
    def tls_port(self) -> int:
        return self.ports["dicom_tls_port"]

    @property
    def https_port(self) -> int:
        return self.ports["https_port"]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)


def start_server(vault: VaultDir, *, log_name: str = "serve.log", timeout: float = 30,
                 args: tuple[str, ...] = ()) -> Server:
    """Start ``pacsvault serve`` on free loopback ports and wait until it listens."""
    state = vault.data / "serve.json"
    state.unlink(missing_ok=True)
    log_path = vault.root / log_name
    tmpdir = vault.root / "tmp"
    tmpdir.mkdir(exist_ok=True)
    env = {**os.environ, "TMPDIR": str(tmpdir)}
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pacsvault", "serve", "--data", str(vault.data),
             "--key-file", str(vault.key), "--bind", "127.0.0.1",
             "--dicom-port", "0", "--dicom-tls-port", "0", "--https-port", "0", *args],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )
    server = Server(vault, proc, log_path, tmpdir)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited ({proc.returncode}):\n{server.log()}")
        try:
            server.ports = {k: v for k, v in json.loads(state.read_text()).items()
                            if k.endswith("port")}
            return server
        except (FileNotFoundError, json.JSONDecodeError):
            time.sleep(0.05)
    server.stop()
    raise AssertionError(f"server did not start in {timeout}s:\n{server.log()}")


def events(vault: VaultDir, action: str | None = None) -> list[dict[str, object]]:
    """Events recorded in the audit trail (read in-process with the key)."""
    v = vault.open()
    try:
        return [
            {"action": r.action, "outcome": r.outcome, "code": r.code, "ae": r.actor_ae,
             "address": r.actor_address, "user": r.actor_user, "message": r.message,
             "time": r.time, "seq": r.seq,
             "study_uids": r.refs.get("study_uids", []),
             "sop_uids": r.refs.get("sop_uids", []),
             "patient_ids": r.refs.get("patient_ids", []),
             **r.detail}
            for r in v.audit.records()
            if action is None or r.action == action
        ]
    finally:
        v.close()


def wait_events(vault: VaultDir, action: str,
                match: Callable[[dict[str, object]], bool] = lambda e: True, *,
                count: int = 1, timeout: float = 10,
                period: float = 0.1) -> list[dict[str, object]]:
    """Events of ``action`` satisfying ``match``, once ``count`` of them are there or after
    ``timeout`` s (what there is then): the server commits them after answering, so
    polling. ``timeout=0`` reads once."""
    deadline = time.monotonic() + timeout
    while True:
        found = [e for e in events(vault, action) if match(e)]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(period)


def wait_until(check: Callable[[], object], timeout: float, period: float = 0.2) -> bool:
    """Whether ``check()`` became true within ``timeout`` s (polled every ``period`` s)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(period)
    return False


def storescu(port: int, files: list[Path], *, calling: str, called: str = AE,
             tls: tuple[str, ...] = (), extra: tuple[str, ...] = (),
             timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [dcmtk("storescu"), "-aet", calling, "-aec", called, *tls, *extra,
         "127.0.0.1", str(port), *map(str, files)],
        capture_output=True, text=True, env=dcmtk_env(), timeout=timeout,
    )


def storescu_stream(port: int, files: list[Path], *, calling: str,
                    called: str = AE) -> tuple[subprocess.Popen[bytes], Iterator[str]]:
    """storescu ``-v`` started on a batch, and its output line by line as it comes.

    For tests that act (kill, stop) after the N-th acknowledgement: storescu can be at
    most one 4 KiB pipe (some 17 files of ``-v`` output) ahead of the reader, whose
    unbuffered reads take nothing more than each line, and its output is line-buffered
    (``stdbuf -oL``). A slow or descheduled test process then holds storescu back too,
    instead of letting the batch run to its end before the action (CI, 2026-12-05 and
    2026-12-07)."""
    line_buffered = ["stdbuf", "-oL"] if shutil.which("stdbuf") else []
    proc = subprocess.Popen(
        [*line_buffered, dcmtk("storescu"), "-v", "-aet", calling, "-aec", called,
         "127.0.0.1", str(port), *map(str, files)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=0, env=dcmtk_env(),
    )
    assert proc.stdout is not None
    fcntl.fcntl(proc.stdout.fileno(), fcntl.F_SETPIPE_SZ, 4096)
    lines = (raw.decode(errors="replace") for raw in iter(proc.stdout.readline, b""))
    return proc, lines


def echoscu(port: int, *, calling: str, called: str = AE, tls: tuple[str, ...] = (),
            timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [dcmtk("echoscu"), "-aet", calling, "-aec", called, *tls, "127.0.0.1", str(port)],
        capture_output=True, text=True, env=dcmtk_env(), timeout=timeout,
    )


def count_fsyncs(monkeypatch: pytest.MonkeyPatch, fail: OSError | None = None, *,
                 of: Path | None = None) -> list[int]:
    """Every ``os.fsync`` from now on, by descriptor (the list is filled as they happen);
    with ``fail``, each one raises it instead of syncing; with ``of``, only those of that
    file are listed."""
    calls: list[int] = []
    real = os.fsync

    def counted(fd: int) -> None:
        if of is None or _names(fd, of):
            calls.append(fd)
        if fail is not None:
            raise fail
        real(fd)

    monkeypatch.setattr(os, "fsync", counted)
    return calls


def _names(fd: int, path: Path) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == str(path)
    except OSError:
        return False


@contextlib.contextmanager
def slow_reader(sock: socket.socket, size: int) -> Iterator[bytearray]:
    """A thread reading ``size`` bytes from ``sock`` slowly (the sender's buffer fills, its
    writes have to wait), joined on exit; yields what it got so far (whole after exit)."""
    got = bytearray()

    def read() -> None:
        while len(got) < size:
            time.sleep(0.001)
            chunk = sock.recv(65536)
            if not chunk:
                return
            got.extend(chunk)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        yield got
    finally:
        reader.join(timeout=60)
