"""The lean parent of ``serve --workers N`` (issue 17: peak RSS during ingest).

The parent ``serve`` does the once-per-vault start with the whole server imported (the
lock, the first run, the key, the exposure guard, sealed journals merged, recovery, the
trail's tail repaired, the listening sockets bound): that import alone is ~180 MB, as
much as a worker, and a parent that then only supervises kept all of it. So once that
start is done the parent *replaces its image* (``execv``, the same pid: the lock holder,
``serve.json``'s pid, systemd's main pid and the workers' parent stay what they were)
with this module, which imports the standard library and ``cli/workers`` only.

What passes across the ``execv``: the lock's and the sockets' file descriptors (made
inheritable for it; every other descriptor is close-on-exec, so nothing else of the
server survives) and one pipe holding the plan as JSON (the state file, the bind, the
ports bound, the workers' command line and the passphrase that was asked, if any: a
secret never goes on argv or in the environment). SIGTERM/SIGINT and the workers'
PAUSE/RESUME are blocked across the ``execv`` (a blocked signal stays pending across it)
and unblocked once their handlers are installed here, so none is lost or fatal in between.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

from pacsvault.cli import workers

log = logging.getLogger("pacsvault.serve")

MODULE = "pacsvault.cli.supervise"
SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, workers.PAUSE, workers.RESUME})
HANDOFF_MAX = 60_000  # below a pipe's buffer: written whole before the execv


@dataclass
class Plan:
    """What the supervisor needs from the start (JSON across the ``execv``)."""

    state: str  # serve.json
    bind: str
    addresses: list[str]
    bound: dict[str, int]
    total: int
    argv: list[str]  # the workers' command line (``workers.worker_argv``)
    verbose: bool = False
    fds: dict[str, list[int]] = field(default_factory=dict)  # filled by ``become``


def stop_on_signals() -> threading.Event:
    """SIGTERM and SIGINT set the returned event (as ``serving.stop_on_signals``)."""
    stop = threading.Event()

    def _stop(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    return stop


def become(plan: Plan, sockets: dict[str, list[socket.socket]], lock_fd: int,
           passphrase: str | None) -> NoReturn:
    """Replace this process with the lean supervisor (the caller blocked ``SIGNALS``).

    Raises ``OSError`` only if the ``execv`` itself failed (the caller then supervises in
    this process, as before)."""
    plan.fds = {kind: [sock.fileno() for sock in socks] for kind, socks in sockets.items()}
    payload = json.dumps({"plan": asdict(plan), "lock_fd": lock_fd,
                          "passphrase": passphrase}).encode("utf-8")
    if len(payload) > HANDOFF_MAX:
        raise OSError("the supervisor's plan does not fit in a pipe")
    read_fd, write_fd = os.pipe()
    try:
        view = memoryview(payload)
        while view:
            view = view[os.write(write_fd, view):]
    finally:
        os.close(write_fd)
    keep = [read_fd, lock_fd, *(fd for fds in plan.fds.values() for fd in fds)]
    for fd in keep:
        os.set_inheritable(fd, True)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        # this interpreter on this package's module: no shell, no user input
        os.execv(sys.executable, [sys.executable, "-m", MODULE,  # noqa: S606
                                  "--handoff-fd", str(read_fd), "serve", "--workers",
                                  str(plan.total)])
    except OSError:
        os.close(read_fd)
        for fd in keep[1:]:
            os.set_inheritable(fd, False)
        raise


def run(plan: Plan, sockets: dict[str, list[socket.socket]], passphrase: str | None,
        stop: threading.Event) -> int:
    """Spawn the workers and watch them until ``stop`` (SIGTERM/SIGINT); ``serve.json``
    written when they are up and at every change. Raises ``workers.StartFailed``."""
    state = Path(plan.state)

    def announce(supervisor: workers.Supervisor) -> None:
        data = {"pid": os.getpid(), "bind": plan.bind, "addresses": plan.addresses,
                "workers": plan.total, "worker_pids": supervisor.pids(),
                "paused": supervisor.paused(), **plan.bound}
        tmp = state.with_suffix(".tmp")
        tmp.write_text(json.dumps(data), "utf-8")
        os.replace(tmp, state)

    supervisor = workers.Supervisor(plan.argv, plan.total, sockets, passphrase,
                                    on_change=announce)
    # Worker 0 asks for the others to be stopped around a key rotation (rotation_alone).
    pause, resume = threading.Event(), threading.Event()
    signal.signal(workers.PAUSE, lambda _signum, _frame: pause.set())
    signal.signal(workers.RESUME, lambda _signum, _frame: resume.set())
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)  # handlers in place: deliver
    log.info("%d worker processes share the listeners %s", plan.total, plan.bound)
    try:
        if stop.is_set():
            return 0
        supervisor.start()
        while not stop.wait(0.5):
            if pause.is_set():
                pause.clear()
                supervisor.pause()
            if resume.is_set():
                resume.clear()
                supervisor.resume()
            supervisor.check()
    finally:
        supervisor.stop()
        state.unlink(missing_ok=True)
        for socks in sockets.values():
            for sock in socks:
                sock.close()
    return 0


def _setup_logging(verbose: bool) -> None:
    """As ``cli.common.setup_logging`` (which imports the vault): one line per entry."""
    from pacsvault.logsafe import OneLineFormatter

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        handlers=[handler], force=True)


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks)


def main(argv: list[str]) -> int:
    """The image ``become`` execs: the plan read, the workers supervised, the lock
    released last (by closing its descriptor, as ``InstanceLock.release``)."""
    handoff: dict[str, Any] = json.loads(_read_all(int(argv[argv.index("--handoff-fd") + 1])))
    plan = Plan(**handoff["plan"])
    lock_fd = int(handoff["lock_fd"])
    try:
        _setup_logging(plan.verbose)
        sockets = {kind: [socket.socket(fileno=fd) for fd in fds]
                   for kind, fds in plan.fds.items()}
        stop = stop_on_signals()
        try:
            return run(plan, sockets, handoff.get("passphrase"), stop)
        except workers.StartFailed as exc:
            print(f"pacsvault: error: {exc}", file=sys.stderr)
            return 2
        except OSError as exc:  # serve.json or a spawn: one line, as the CLI's handler
            where = f"{exc.filename}: " if isinstance(exc.filename, str) else ""
            print(f"pacsvault: error: {where}{exc.strerror or exc}", file=sys.stderr)
            return 2
    finally:
        os.close(lock_fd)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
