"""Processes: start/stop servers by PID, RSS and PSS sampling, tools, sizes, ports.

dcmtk, its environment (``DCMTK_ENV``: Debian's dcmtk and Orthanc, built on it, only disable
Nagle when asked) and free ports come from the harness the tests use (tests/harness/peers.py,
through bench/ingest.py)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from bench.ingest import DCMTK_ENV, dcmtk, free_port

__all__ = ["DCMTK_ENV", "RssSampler", "Service", "dcmtk", "dir_size", "free_port",
           "pss_bytes", "wait_port"]


def wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited rc {proc.returncode}; log {log}:\n"
                               + log.read_text(errors="replace")[-3000:])
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port} after {timeout:.0f}s ({log})")


class Service:
    """A server process in its own session, stopped by its PID (SIGTERM, then SIGKILL)."""

    def __init__(self, cmd: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.log = log
        with log.open("ab") as fh:
            self.proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env,
                                         stdin=subprocess.DEVNULL, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, timeout: float = 30) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def pss_bytes(pid: int) -> int | None:
    """Proportional set size of ``pid`` (``/proc/PID/smaps_rollup``, Linux 4.14+): its
    private pages plus its share of every page it maps together with other processes
    (a library's code mapped by 3 processes counts a third in each). Summed over a process
    tree, shared pages count once: what the tree really costs the machine, where RSS
    counts them once per process. None when the kernel does not say."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as fh:
            text = fh.read()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(b"Pss:"):
            return int(line.split()[1]) * 1024
    return None


class RssSampler:
    """Peak resident memory of a process and its children, sampled every ``period`` s:
    ``peak``, the sum of their RSS (the issue's metric, as ``bench compare`` always
    reported it), and ``pss_peak``, the sum of their PSS (0 when the kernel has no
    ``smaps_rollup``): the two peaks are each the largest sum seen in one sample."""

    def __init__(self, pid: int, period: float = 0.05) -> None:
        self.pid, self.period, self.peak, self.pss_peak = pid, period, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> tuple[int, int]:
        try:
            proc = psutil.Process(self.pid)
            procs = [proc, *proc.children(recursive=True)]
        except psutil.Error:
            return 0, 0
        rss = pss = 0
        for p in procs:
            with contextlib.suppress(psutil.Error):
                rss += p.memory_info().rss
                pss += pss_bytes(p.pid) or 0
        return int(rss), pss

    def _update(self) -> None:
        rss, pss = self._sample()
        self.peak, self.pss_peak = max(self.peak, rss), max(self.pss_peak, pss)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._update()
            self._stop.wait(self.period)

    def __enter__(self) -> RssSampler:
        self._update()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._update()


def dir_size(path: Path) -> tuple[int, int]:
    """(apparent bytes, allocated bytes) of every regular file under ``path``."""
    apparent = allocated = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                st = os.lstat(os.path.join(dirpath, name))
                apparent += st.st_size
                allocated += st.st_blocks * 512
    return apparent, allocated


def rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def tree_child(src: str | Path, module: str, args: list[str]) -> Any:
    """An in-process A/B's child: ``python -m module --child ARGS`` with the tree ``src``
    first on ``PYTHONPATH`` (the benchmark's own code after it); the JSON of its last
    output line (``filler_cpu``, ``publish_cpu``)."""
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(src).resolve()), str(root)])}
    proc = subprocess.run([sys.executable, "-m", module, "--child", *args], env=env, cwd=root,
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])
