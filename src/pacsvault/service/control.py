"""A local control channel from the CLI to the running server.

Some admin actions must happen *inside* ``serve``, because it holds the vault's lock, the
index connections and the keys in memory: unsealing (the master key arrives while the
server runs), online key rotation. The CLI reaches it through a Unix socket in the data
directory (``DATA/control.sock``, 0600 in a 0700 directory); the server also checks the
peer's uid (``SO_PEERCRED``: root or the server's own user), so only whoever may already
read the vault's files can ask. One JSON line in, one JSON line out. Nothing here carries
patient data; a passphrase sent to ``unseal`` travels only over this socket.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger("pacsvault.control")

SOCKET_NAME = "control.sock"
_MAX_REQUEST = 64 * 1024
_UNIX_PATH_MAX = 100

Handler = Callable[[dict[str, Any]], dict[str, Any]]


class ControlUnavailable(Exception):
    """No server is listening on this vault's control socket (it is not running)."""


class ControlError(Exception):
    """The server refused or failed the request (message is user-facing)."""


@contextlib.contextmanager
def short_path(path: Path) -> Iterator[str]:
    """A Unix socket path is limited to ~108 bytes; a deep data dir is reached through
    ``/proc/self/fd/N/`` of an open directory descriptor instead."""
    if len(os.fsencode(path)) <= _UNIX_PATH_MAX:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


def listen_private(path: Path, backlog: int) -> socket.socket:
    """A Unix socket listening at ``path``, 0600 from its creation (a stale one of a
    killed process replaced): only the vault's user (or root) may connect."""
    path.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        with short_path(path) as where:
            sock.bind(where)
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(backlog)
    return sock


class ControlServer:
    """Serves registered commands, one connection at a time per thread."""

    def __init__(self, root: Path) -> None:
        self._path = root / SOCKET_NAME
        self._handlers: dict[str, Handler] = {}
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def register(self, command: str, handler: Handler) -> None:
        self._handlers[command] = handler

    def start(self) -> None:
        sock = listen_private(self._path, 8)
        sock.settimeout(0.5)
        self._sock = sock
        self._thread = threading.Thread(target=self._serve, name="pacsvault-control",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self._sock is not None:
            self._sock.close()
        self._path.unlink(missing_ok=True)

    def _serve(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True,
                             name="pacsvault-control-conn").start()

    def _allowed(self, conn: socket.socket) -> bool:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", creds)
        return uid in (0, os.geteuid())

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(30)
            try:
                if not self._allowed(conn):
                    _send(conn, {"ok": False, "error": "not allowed"})
                    return
                request = _receive(conn)
                handler = self._handlers.get(str(request.get("command")))
                if handler is None:
                    _send(conn, {"ok": False, "error": "this server does not know "
                                 f"{request.get('command')!r}"})
                    return
                conn.settimeout(None)  # a rotation may take minutes
                args = request.get("args")
                result = handler(args if isinstance(args, dict) else {})
                _send(conn, {"ok": True, "result": result})
            except ControlError as exc:
                with contextlib.suppress(OSError):
                    _send(conn, {"ok": False, "error": str(exc)})
            except Exception as exc:  # one line, no traceback with values in it
                log.error("control command failed: %s", type(exc).__name__)
                with contextlib.suppress(OSError):
                    _send(conn, {"ok": False, "error": f"the server failed: "
                                 f"{type(exc).__name__}"})


def _send(conn: socket.socket, value: dict[str, Any]) -> None:
    conn.sendall(json.dumps(value).encode("utf-8") + b"\n")


def _receive(conn: socket.socket) -> dict[str, Any]:
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk
        if len(data) > _MAX_REQUEST:
            raise ControlError("request too large")
    value = json.loads(data or b"{}")
    if not isinstance(value, dict):
        raise ControlError("malformed request")
    return value


def call(root: Path, command: str, args: dict[str, Any] | None = None,
         timeout: float | None = 600.0) -> dict[str, Any]:
    """Ask the server running on ``root`` to do ``command``; its result dict."""
    path = root / SOCKET_NAME
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        with short_path(path) as where:
            sock.connect(where)
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        raise ControlUnavailable("no server is running on this vault") from None
    with sock:
        _send(sock, {"command": command, "args": args or {}})
        reply = _receive(sock)
    if not reply.get("ok"):
        raise ControlError(str(reply.get("error", "refused")))
    result = reply.get("result")
    return result if isinstance(result, dict) else {}
