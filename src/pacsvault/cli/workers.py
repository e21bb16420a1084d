"""``serve --workers N``: one machine, all cores (issue 16, part 4).

One Python interpreter serialises the work of every association (parsing, encryption,
TLS) on its one lock; N processes do not. The parent ``serve`` keeps what must happen
once per vault: the single-instance lock, the start-up recovery (sealed journals merged,
staged objects settled, the trail's torn tail repaired) and the listening sockets (plain
DICOM, DICOM TLS, HTTPS), bound once. It then *spawns* (a fresh interpreter, never a fork
of a process that has threads) N workers, each handed those sockets as inherited file
descriptors: every worker accepts on the same sockets and the kernel gives each
connection to one of them. Once that start is done the parent replaces its image with the
lean supervisor (``cli/supervise``: same pid, the lock and sockets kept, ~16 MB instead
of the ~180 MB the server's import costs), which runs ``Supervisor`` below: so this module
imports the standard library only. Nothing else passes between the parent and the workers
(between workers: on the embedded index, worker 0 commits the others' stores,
``storage.commit_link``): everything a request depends
on is in the index (sessions, sign-in state, the registry, duplicates: "Several
instances: what is shared"), objects are files named by random ids (each process stages
into spares of its own, never shared), and the one audit trail is appended under its file
lock by whichever process records (each append re-reads the tail another process moved).

Worker 0 alone runs what must run once: the background jobs (backups, retention, the
bucket's sweep and scrub), the trail watcher and checkpoints, the retention purge and the
control socket (so ``keys rotate``/``unseal``/erasures talk to one process). A worker that
dies is started again (after 1 s, doubling up to 30 s while it keeps dying young); a
worker whose parent died stops by itself. SIGTERM/SIGINT to the parent stops the workers
(each as one ``serve`` stops: its associations aborted, its commits done) and then
releases the lock.

The master key's passphrase, when one was asked, goes to each worker through a pipe (never
argv or the environment); ``--passphrase-file`` and the key file are read again by each.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Standard library only at import time: the supervisor (``cli/supervise``) runs this
# module in an interpreter that never imports the server stack.

log = logging.getLogger("pacsvault.workers")

AUTO = "auto"
# ``auto`` on a shared index (PostgreSQL) = the cores, at most this many: each worker holds
# ~200 MB and the service unit's MemoryMax is 4G. On the embedded index ``auto`` = 1: one
# SQLite file has one writer, so a second process only adds cross-process hand-offs of the
# writer and the trail, and its memory. Measured on a quiet 2-core machine (issue 17,
# ``bench.compare.embedded_ab``, 3 rounds, 2026-12-05): one process vs two, images/s of
# Orthanc's - one association 0.75-0.93 vs 0.83-0.91 (plain), 0.78-0.89 vs 0.69-0.87
# (TLS), less CPU per image (4.8 vs 5.2 ms); four associations 0.42-0.58 vs 0.45-0.67,
# one-instance studies 0.30-0.36 vs 0.37-0.43; peak RSS 214 vs 408 MB (1 association),
# 314 vs 501 MB (4; Orthanc 341 / 323). A practice's modalities rarely send at once:
# one process serves the usual load as fast, in half the memory.
AUTO_MAX = 8
READY_TIMEOUT = 90.0  # a worker opens the vault and starts its listeners (slow CI: margin)
# SIGTERM to the workers, then SIGKILL for what is left: within the unit's TimeoutStopSec
# (60 s), so the parent still releases the lock and removes serve.json itself.
STOP_TIMEOUT = 45.0
RESTART_FIRST = 1.0
RESTART_MAX = 30.0
YOUNG = 30.0  # a worker that dies sooner than this after its start backs off further
KINDS = ("plain", "tls", "https")
PAUSE = signal.SIGUSR1  # worker 0 -> parent: stop the other workers (a key rotation)
RESUME = signal.SIGUSR2  # worker 0 -> parent: start them again


def count(value: str | int | None, *, shared_index: bool = True) -> int:
    """``--workers``: a positive number, or ``auto`` = the machine's cores (at most
    ``AUTO_MAX``) on a ``shared_index`` (PostgreSQL), one process on the embedded one."""
    if value is None or value == AUTO:
        if not shared_index:
            return 1
        return max(1, min(AUTO_MAX, os.cpu_count() or 1))
    from pacsvault.cli.common import CommandError

    try:
        n = int(value)
    except ValueError:
        raise CommandError(f"--workers must be a number or '{AUTO}', not {value!r}") from None
    if n < 1:
        raise CommandError("--workers must be at least 1")
    return n


class StartFailed(Exception):
    """A worker did not start: one user-facing line (``pacsvault: error: ...``, exit 2)."""


@dataclass
class Role:
    """What a worker process is told by its parent (hidden ``serve`` options)."""

    index: int
    total: int
    sockets: dict[str, list[socket.socket]]  # by kind: one per address (``bind``)
    ready_fd: int | None
    parent: int

    @property
    def primary(self) -> bool:
        """Worker 0 runs the jobs, the watcher, the purge and the control socket."""
        return self.index == 0

    def ready(self) -> None:
        """Tell the parent the listeners are up (it writes ``serve.json`` after all)."""
        if self.ready_fd is not None:
            try:
                os.write(self.ready_fd, b"R")
            finally:
                os.close(self.ready_fd)
                self.ready_fd = None

    def watch_parent(self, stop: threading.Event) -> None:
        """Stop when the parent is gone (kill -9 of it): no orphan keeps the sockets."""

        def run() -> None:
            while not stop.wait(0.5):
                if os.getppid() != self.parent:
                    log.warning("the serve parent is gone: this worker stops")
                    stop.set()

        threading.Thread(target=run, name="parent-watch", daemon=True).start()


def role_of(args: argparse.Namespace) -> Role:
    """The worker's role from ``--worker-index``/``--worker-fds``/``--ready-fd``."""
    sockets: dict[str, list[socket.socket]] = {}
    for item in filter(None, str(args.worker_fds or "").split(",")):
        kind, _, fd = item.partition(":")
        sockets.setdefault(kind, []).append(socket.socket(fileno=int(fd)))
    return Role(index=int(args.worker_index), total=int(args.workers), sockets=sockets,
                ready_fd=args.ready_fd, parent=os.getppid())


def passphrase_from(args: argparse.Namespace) -> Callable[[], str | None] | None:
    """The passphrase the parent piped (read once, the pipe closed), or None."""
    fd = getattr(args, "passphrase_fd", None)
    if fd is None:
        return None
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    os.close(fd)
    value = b"".join(chunks).decode("utf-8")
    return lambda: value


def log_as_worker(index: int) -> None:
    """Every log line names the worker and its pid (which process did what)."""
    from pacsvault.logsafe import OneLineFormatter

    fmt = OneLineFormatter(
        f"%(asctime)s %(levelname)s w{index}[%(process)d] %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.setFormatter(fmt)


def rotation_alone(role: Role, state: Path,
                   rotate: Callable[[dict[str, Any]], dict[str, Any]]
                   ) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """The control socket's "rotate" with several workers: run alone, still online.

    Rotation re-keys the SQLCipher index and replaces the key file under the process that
    runs it (its index gate drains and reopens); another worker would keep the old key
    open: a half-rotation. So worker 0 asks the parent (``PAUSE``) to stop the other
    workers as a shutdown stops them, waits until ``serve.json`` says they are gone, rotates
    while it alone keeps serving the shared sockets, and then asks for them back
    (``RESUME``): they open the vault with the new key file.
    """
    from pacsvault.service.control import ControlError

    def handle(args: dict[str, Any]) -> dict[str, Any]:
        os.kill(role.parent, PAUSE)
        try:
            if not _paused(state, role.total - 1, time.monotonic() + STOP_TIMEOUT + 30):
                raise ControlError(
                    "the other worker processes did not stop in time, nothing was rotated: "
                    "retry, or stop the server and run 'pacsvault keys rotate' offline")
            return rotate(args)
        finally:
            os.kill(role.parent, RESUME)

    return handle


def _paused(state: Path, others: int, deadline: float) -> bool:
    while time.monotonic() < deadline:
        try:
            if int(json.loads(state.read_text("utf-8")).get("paused", 0)) >= others:
                return True
        except (OSError, ValueError):
            pass
        time.sleep(0.1)
    return False


def bind_listeners(bind: str, ports: tuple[int | None, int | None, int | None]
                   ) -> tuple[dict[str, list[socket.socket]], dict[str, int]]:
    """The listening sockets, bound once by the parent: (sockets by kind, one per address
    of ``bind``; ports bound)."""
    from pacsvault.web.server import listening_sockets

    sockets: dict[str, list[socket.socket]] = {}
    bound: dict[str, int] = {}
    names = {"plain": "dicom_port", "tls": "dicom_tls_port", "https": "https_port"}
    try:
        for kind, port in zip(KINDS, ports, strict=True):
            if port is None:
                continue
            socks = listening_sockets(bind, port)
            for sock in socks:
                sock.set_inheritable(True)
            sockets[kind] = socks
            bound[names[kind]] = int(socks[0].getsockname()[1])
    except OSError:
        for socks in sockets.values():
            for sock in socks:
                sock.close()
        raise
    return sockets, bound


@dataclass
class _Worker:
    index: int
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    delay: float = RESTART_FIRST
    restart_at: float | None = None
    ready_fd: int | None = None
    paused: bool = False


@dataclass
class Supervisor:
    """The parent's side: spawn, watch, restart and stop the workers."""

    argv: list[str]  # ``serve`` with everything but the per-worker options
    total: int
    sockets: dict[str, list[socket.socket]]
    passphrase: str | None = None
    workers: list[_Worker] = field(default_factory=list)
    on_change: Callable[[Supervisor], None] = lambda _supervisor: None

    def spawn(self, worker: _Worker) -> None:
        fds = ",".join(f"{kind}:{sock.fileno()}" for kind, socks in self.sockets.items()
                       for sock in socks)
        ready_r, ready_w = os.pipe()
        keep = [sock.fileno() for socks in self.sockets.values() for sock in socks] + [ready_w]
        extra = ["--worker-index", str(worker.index), "--worker-fds", fds,
                 "--ready-fd", str(ready_w)]
        secret_r: int | None = None
        if self.passphrase is not None:
            secret_r, secret_w = os.pipe()
            data = self.passphrase.encode("utf-8")
            # A passphrase is far below a pipe's buffer: written whole before the child reads.
            os.write(secret_w, data)
            os.close(secret_w)
            keep.append(secret_r)
            extra += ["--passphrase-fd", str(secret_r)]
        try:
            worker.proc = subprocess.Popen([*self.argv, *extra], pass_fds=keep)
        finally:
            os.close(ready_w)
            if secret_r is not None:
                os.close(secret_r)
        if worker.ready_fd is not None:
            os.close(worker.ready_fd)
        worker.ready_fd = ready_r
        worker.started = time.monotonic()
        worker.restart_at = None
        log.info("worker %d started (pid %d)", worker.index, worker.proc.pid)

    def start(self) -> None:
        """All workers, then wait until each says its listeners are up."""
        self.workers = [_Worker(index) for index in range(self.total)]
        for worker in self.workers:
            self.spawn(worker)
        deadline = time.monotonic() + READY_TIMEOUT
        for worker in self.workers:
            if not self._wait_ready(worker, deadline):
                self.stop()
                raise StartFailed(f"worker {worker.index} of serve --workers {self.total} "
                                  "did not start (its log lines above say why)")
        self.on_change(self)

    def _wait_ready(self, worker: _Worker, deadline: float) -> bool:
        assert worker.ready_fd is not None and worker.proc is not None
        while time.monotonic() < deadline:
            readable, _, _ = select.select([worker.ready_fd], [], [], 0.2)
            if readable:
                got = os.read(worker.ready_fd, 1)
                os.close(worker.ready_fd)
                worker.ready_fd = None
                return got == b"R"
            if worker.proc.poll() is not None:
                return False
        return False

    def pids(self) -> list[int]:
        return [w.proc.pid for w in self.workers if w.proc is not None]

    def check(self) -> None:
        """One look at every worker (called every 0.5 s): restart the dead, when due."""
        now = time.monotonic()
        changed = False
        for worker in self.workers:
            if worker.ready_fd is not None:  # a restarted one's readiness: just consume
                readable, _, _ = select.select([worker.ready_fd], [], [], 0)
                if readable:
                    os.read(worker.ready_fd, 1)
                    os.close(worker.ready_fd)
                    worker.ready_fd = None
            proc = worker.proc
            if proc is not None and proc.poll() is not None:
                code = proc.returncode
                young = now - worker.started < YOUNG
                worker.delay = min(RESTART_MAX, worker.delay * 2) if young else RESTART_FIRST
                worker.restart_at = now + (worker.delay if young else RESTART_FIRST)
                worker.proc = None
                how = f"signal {-code}" if code < 0 else f"code {code}"
                log.warning("worker %d (pid %d) ended (%s); starting it again in %.0f s",
                            worker.index, proc.pid, how, worker.restart_at - now)
            if worker.proc is None and worker.restart_at is not None and now >= worker.restart_at:
                try:
                    self.spawn(worker)
                    changed = True
                except OSError as exc:
                    worker.restart_at = now + RESTART_MAX
                    log.error("worker %d could not be started (%s)", worker.index,
                              exc.strerror or type(exc).__name__)
            if worker.index == 0 and worker.proc is None and self.paused():
                self.resume()  # worker 0 died in a rotation: the others come back
        if changed:
            self.on_change(self)

    def paused(self) -> int:
        """How many workers are stopped for worker 0's key rotation."""
        return sum(1 for w in self.workers if w.paused)

    def pause(self) -> None:
        """Stop every worker but 0, as at a shutdown, and keep them stopped."""
        others = [w for w in self.workers if w.index != 0]
        _terminate([w.proc for w in others if w.proc is not None])
        for worker in others:
            worker.proc, worker.restart_at, worker.paused = None, None, True
        log.info("%d worker(s) stopped for a key rotation in worker 0", len(others))
        self.on_change(self)

    def resume(self) -> None:
        now = time.monotonic()
        for worker in self.workers:
            if worker.paused:
                worker.paused, worker.restart_at, worker.delay = False, now, RESTART_FIRST

    def stop(self) -> None:
        """SIGTERM to every worker, wait, SIGKILL what is left after ``STOP_TIMEOUT``."""
        _terminate([w.proc for w in self.workers if w.proc is not None])
        for worker in self.workers:
            worker.proc = None
            if worker.ready_fd is not None:
                os.close(worker.ready_fd)
                worker.ready_fd = None


def _terminate(running: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM to each, wait, SIGKILL what is left after ``STOP_TIMEOUT``."""
    for proc in running:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    for proc in running:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.error("worker pid %d did not stop in %.0f s: killed", proc.pid, STOP_TIMEOUT)
            proc.kill()
            proc.wait(10)


def worker_argv(args: argparse.Namespace, root: Path, bind: str, total: int) -> list[str]:
    """The command line each worker runs: ``serve`` on the same data and key, no secret
    (a passphrase the parent used goes through a pipe: ``Supervisor.spawn``)."""
    argv = [sys.executable, "-m", "pacsvault", "serve", "--data", str(root),
            "--bind", bind, "--workers", str(total)]
    if getattr(args, "key_file", None):
        argv += ["--key-file", str(args.key_file)]
    if args.verbose:
        argv.append("-v")
    if args.allow_root:
        argv.append("--allow-root")
    return argv
