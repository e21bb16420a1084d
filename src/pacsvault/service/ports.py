"""Check the listening ports before anything starts, and say which one is busy.

A busy port used to surface as a raw ``OSError: [Errno 98]`` traceback halfway through
start-up (issue 12). ``serve`` now tries every configured port first (same options as the
real listeners) and, if one is taken, names the port, the flag and setting that chose it
and, when the system lets us see it, the process holding it.
"""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass


@dataclass(frozen=True)
class Listener:
    """A port ``serve`` will listen on and where that number came from."""

    name: str  # "DICOM TLS"
    port: int
    flag: str  # "--dicom-tls-port"
    setting: str  # "[dicom] tls_port"


class PortError(Exception):
    """A listening port cannot be used (message is user-facing, one line)."""


def check_free(bind: str, listeners: list[Listener]) -> None:
    """Raise ``PortError`` for the first listener whose port cannot be bound now (on every
    address of ``bind``: ``service.bind.addresses``)."""
    from pacsvault.service.bind import addresses

    seen: dict[int, Listener] = {}
    for item in listeners:
        if item.port == 0:  # any free port: nothing to check
            continue
        if item.port in seen:
            other = seen[item.port]
            raise PortError(
                f"port {item.port} is chosen for both {other.name} ({other.flag} / "
                f"{other.setting}) and {item.name} ({item.flag} / {item.setting}); give "
                "each its own port. Nothing was started."
            )
        seen[item.port] = item
        for address in addresses(bind):
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    probe.bind((address, item.port))
                    probe.listen(1)
                except OSError as exc:
                    raise PortError(describe(address, item, exc)) from None


def describe(bind: str, item: Listener, exc: OSError) -> str:
    """One line for a failed bind: what, where from, why, and what to do."""
    what = (f"{item.name} port {item.port} on {bind} (set by {item.flag} or {item.setting} "
            "in pacsvault.toml)")
    if exc.errno == errno.EADDRINUSE:
        return (f"{what} is already in use by {holder(item.port)}: stop that process or "
                f"choose another port with {item.flag}. Nothing was started.")
    if exc.errno == errno.EACCES:
        return (f"{what} needs privileges this user does not have (ports below 1024): "
                f"choose a port above 1023 with {item.flag}. Nothing was started.")
    if exc.errno == errno.EADDRNOTAVAIL:
        return (f"{what}: {bind} is not an address of this machine (--bind or [server] "
                "bind). Nothing was started.")
    return f"{what} cannot be used: {exc.strerror or exc}. Nothing was started."


def holder(port: int) -> str:
    """``pid N (name)`` of the process listening on ``port``, when visible to us."""
    import psutil

    try:
        conns = psutil.net_connections(kind="inet")
    except (psutil.Error, OSError):
        return "another process"
    for conn in conns:
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
            if conn.pid is None:
                return "a process of another user"
            try:
                return f"pid {conn.pid} ({psutil.Process(conn.pid).name()})"
            except psutil.Error:
                return f"pid {conn.pid}"
    return "another process"
