"""Issue 12, defects 1 and 3: one server per vault, and a busy port is a message.

Defect 1: a second ``serve`` on the same vault ran the storage clean-up before trying the
ports, deleted the running server's staged/spare files, then died with a traceback; the
running server then refused every image (A700) with a false "disk full" alert. Now the
second ``serve`` takes the vault's lock before touching anything and is refused with the
running server's pid.

Defect 3: a port in use was a raw ``OSError`` traceback. Now it is one line naming the
port, the flag and the process holding it, exit code 2, and nothing left half-started.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.corpus import synthetic_ct_series
from tests.helpers import VaultDir, events, free_port, start_server, storescu

pytestmark = pytest.mark.slow


def _files_of(data: Path) -> dict[str, int]:
    """Every file under objects/ (published, staged, spare) with its size."""
    return {str(p.relative_to(data)): p.stat().st_size
            for p in (data / "objects").rglob("*") if p.is_file()}


def _settled_files_of(data: Path, timeout: float = 20.0) -> dict[str, int]:
    """``_files_of`` once every acknowledged object is published: the rename out of
    ``.spare`` runs after the acknowledgement, off the response's path (storage.archive),
    so a snapshot taken right after storescu returns can still see one staged."""
    deadline = time.monotonic() + timeout
    while True:
        files = _files_of(data)
        staged = [name for name, size in files.items()
                  if name.startswith("objects/.spare/") and size > 0]
        if not staged or time.monotonic() > deadline:
            return files
        time.sleep(0.05)


def _serve(vault: VaultDir, *ports: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pacsvault", "serve", "--data", str(vault.data),
         "--key-file", str(vault.key), "--bind", "127.0.0.1", *ports],
        capture_output=True, text=True, timeout=timeout,
    )


def test_second_serve_is_refused_and_the_first_keeps_storing(vault: VaultDir,
                                                             tmp_path: Path) -> None:
    vault.add_node("MODALITY")
    images = synthetic_ct_series(tmp_path / "ct", 6, size=64)
    server = start_server(vault)
    try:
        sent = storescu(server.port, images[:3], calling="MODALITY")
        assert sent.returncode == 0, sent.stderr
        spares = list((vault.data / "objects" / ".spare").glob("*"))
        assert spares, "the running server keeps spare files for the next images"
        before = _settled_files_of(vault.data)

        second = _serve(vault, "--dicom-port", "0", "--dicom-tls-port", "0",
                        "--https-port", "0")
        assert second.returncode == 1, second.stderr
        assert f"already running (pid {server.proc.pid}, since " in second.stderr
        assert "stop it with" in second.stderr
        assert "Traceback" not in second.stderr
        assert len(second.stderr.strip().splitlines()) <= 2, second.stderr
        # Nothing of the running server was touched.
        assert _files_of(vault.data) == before
        assert server.alive()

        sent = storescu(server.port, images[3:], calling="MODALITY")
        assert sent.returncode == 0, sent.stderr
        assert "A700" not in sent.stderr and "Refused" not in sent.stderr
    finally:
        assert server.stop() == 0
    stored = events(vault, "dicom.store.committed")
    assert len({sop for e in stored for sop in e["sop_uids"]}) == 6  # type: ignore[attr-defined]
    failed = events(vault, "dicom.store.failed")
    assert failed == []
    alerts = [e for e in events(vault) if str(e["action"]).startswith("alert.")]
    assert not [a for a in alerts if a.get("rule") == "disk-full"], alerts


@pytest.mark.parametrize("flag", ["--dicom-port", "--dicom-tls-port", "--https-port"])
def test_busy_port_is_one_line_with_port_flag_and_holder(vault: VaultDir, flag: str) -> None:
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    busy = holder.getsockname()[1]
    try:
        ports = {"--dicom-port": "0", "--dicom-tls-port": "0", "--https-port": "0"}
        ports[flag] = str(busy)
        before = _files_of(vault.data)
        proc = _serve(vault, *[x for kv in ports.items() for x in kv])
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr
        lines = [ln for ln in proc.stderr.splitlines() if "error" in ln]
        assert len(lines) == 1, proc.stderr
        assert str(busy) in lines[0] and flag in lines[0], lines[0]
        assert f"pid {os.getpid()}" in lines[0], lines[0]
        assert not (vault.data / "serve.json").exists()
        assert _files_of(vault.data) == before
    finally:
        holder.close()
    if flag == "--https-port":  # the last listener: the others would have started first
        # The lock was released and nothing is left listening: a normal start works.
        server = start_server(vault)
        assert server.stop() == 0


def test_busy_configured_port_names_the_setting(vault: VaultDir) -> None:
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    port = free_port()
    holder.bind(("127.0.0.1", port))
    holder.listen(1)
    try:
        vault.set_toml("web", "https_port", str(port))
        proc = _serve(vault, "--dicom-port", "0", "--dicom-tls-port", "0")
        assert proc.returncode == 2, proc.stderr
        assert "[web] https_port" in proc.stderr and str(port) in proc.stderr
        assert "Traceback" not in proc.stderr
    finally:
        holder.close()


def test_port_taken_after_the_check_leaves_nothing_started(
        vault: VaultDir, monkeypatch: pytest.MonkeyPatch) -> None:
    """The race: the port is free at the check, taken before the HTTPS listener binds.
    The DICOM listeners that did start are stopped, the lock released, one message."""
    import threading

    import pacsvault.cli.serve as serve_cli
    from pacsvault.cli.common import CommandError
    from pacsvault.cli.main import build_parser
    from pacsvault.service import lock
    from pacsvault.service.ports import Listener

    real = serve_cli.check_free  # type: ignore[attr-defined]
    calls: list[int] = []

    def first_passes(bind: str, listeners: list[Listener]) -> None:
        calls.append(1)
        if len(calls) > 1:
            real(bind, listeners)

    monkeypatch.setattr(serve_cli, "check_free", first_passes)
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    busy = holder.getsockname()[1]
    before = set(threading.enumerate())
    # cmd_serve installs signal handlers and configures logging: put them back after.
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    root_logger = logging.getLogger()
    saved_handlers, saved_level = list(root_logger.handlers), root_logger.level
    args = build_parser("serve").parse_args(
        ["serve", "--data", str(vault.data), "--key-file", str(vault.key), "--bind",
         "127.0.0.1", "--dicom-port", "0", "--dicom-tls-port", "0", "--https-port",
         str(busy)])
    try:
        with pytest.raises(CommandError) as refused:
            serve_cli.cmd_serve(args)
    finally:
        holder.close()
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        root_logger.handlers[:] = saved_handlers
        root_logger.setLevel(saved_level)
    assert "--https-port" in str(refused.value) and str(busy) in str(refused.value)
    assert len(calls) == 2
    lock.acquire(vault.data).release()  # released
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        left = [t for t in set(threading.enumerate()) - before
                if t.is_alive() and not t.daemon]
        if not left:
            break
        time.sleep(0.1)
    assert not left, left
    dicom = [t for t in threading.enumerate() if t.name.startswith("dicom-") and t.is_alive()]
    assert not dicom, dicom
