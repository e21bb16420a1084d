"""RFC 5424 records, RFC 5425 framing, and the ``SyslogSink`` that delivers the queue.

Why apart from the queue: this is the only part that talks to the collector (TLS, TCP
acknowledgement checks, the sender lock); the package docstring gives the delivery
guarantee it keeps.
"""

from __future__ import annotations

import array
import errno
import fcntl
import logging
import os
import select
import socket
import ssl
import termios
import threading
import time
from pathlib import Path

from pacsvault.audit.atna import AuditMessageBuilder, event_datetime, severity
from pacsvault.audit.events import AuditEvent, EventCode, Outcome
from pacsvault.audit.syslog.queue import SyslogQueue
from pacsvault.config.syslog import SyslogConfigError, SyslogSettings
from pacsvault.crypto import objects

log = logging.getLogger("pacsvault.audit.syslog")

FACILITY_SECURITY = 10  # RFC 5424 "security/authorization messages"; ITI-20 requires it
APP_NAME = "pacsvault"
MSGID = "IHE+RFC-3881"  # ITI-20 3.20.4.1.2: "shall be set to IHE+RFC-3881"
BOM = b"\xef\xbb\xbf"
_TCP_ESTABLISHED = 1
_TCP_CLOSE_WAIT = 8


# --- RFC 5424 / 5425 -------------------------------------------------------------------


def _header_field(value: str, limit: int) -> str:
    """PRINTUSASCII (33..126), at most ``limit`` characters, NILVALUE when empty."""
    clean = "".join(c for c in value if 33 <= ord(c) <= 126)[:limit]
    return clean or "-"


def format_record(
    xml: bytes, event: AuditEvent, *, hostname: str, procid: str | None = None
) -> bytes:
    """One RFC 5424 SYSLOG-MSG: header, no structured data, MSG = BOM + XML."""
    pri = FACILITY_SECURITY * 8 + severity(event.outcome)
    header = " ".join((
        f"<{pri}>1",
        event_datetime(event.time),  # RFC 5424 allows up to 6 fraction digits and "Z"
        _header_field(hostname, 255),
        _header_field(APP_NAME, 48),
        _header_field(procid if procid is not None else str(os.getpid()), 128),
        _header_field(MSGID, 32),
        "-",
    ))
    return header.encode("ascii") + b" " + BOM + xml


def frame(record: bytes) -> bytes:
    """RFC 5425 octet counting: ``MSG-LEN SP SYSLOG-MSG``."""
    return str(len(record)).encode("ascii") + b" " + record


# --- the sink --------------------------------------------------------------------------


class DeliveryError(Exception):
    """The collector did not confirm a batch (message names no patient data)."""


def _tls_context(settings: SyslogSettings) -> ssl.SSLContext:
    """Client context: TLS 1.2+, collector verified against ``ca_file`` and by name."""
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=settings.ca_file)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if settings.client_cert and settings.client_key:
            context.load_cert_chain(settings.client_cert, settings.client_key)
    except (OSError, ssl.SSLError) as exc:
        raise SyslogConfigError(f"audit syslog export: cannot load the TLS files: {exc}") \
            from None
    return context


def _unacked_bytes(sock: socket.socket) -> int | None:
    """Bytes written but not yet acknowledged by the peer's TCP stack (Linux SIOCOUTQ)."""
    buf = array.array("i", [0])
    try:
        fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, buf, True)
    except OSError:
        return None
    return int(buf[0])


def _tcp_state(sock: socket.socket) -> int | None:
    option = getattr(socket, "TCP_INFO", None)
    if option is None:
        return None
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, option, 8)[0]
    except OSError:
        return None


class SyslogSink:
    """Recorder sink: queue each event as an ATNA syslog record; a thread delivers them.

    ``write`` touches only the local disk (encrypt, fsync) and never the network.
    ``deliver=False`` makes an enqueue-only sink, for short-lived commands while the
    server (which delivers) runs; their records wait for the next sender either way.
    """

    def __init__(
        self,
        settings: SyslogSettings,
        queue_dir: Path,
        key: bytes,
        *,
        archive_ae: str,
        hostname: str | None = None,
        deliver: bool = True,
        batch_size: int = 64,
        connect_timeout: float = 10.0,
        ack_timeout: float = 15.0,
        min_backoff: float = 0.5,
        max_backoff: float = 60.0,
        idle_poll: float = 2.0,
    ) -> None:
        if not settings.enabled or not settings.host:
            raise SyslogConfigError("the audit syslog export is not enabled")
        self.settings = settings
        self.builder = AuditMessageBuilder(
            archive_ae, source_id=settings.source_id, hostname=hostname,
            site_id=settings.site_id,
        )
        self._context = _tls_context(settings)
        self.queue = SyslogQueue(queue_dir, key)
        self._limit = settings.queue_limit
        self._approx_count = len(self.queue)
        self._not_exported = 0
        self._write_lock = threading.Lock()
        self._batch = batch_size
        self._connect_timeout = connect_timeout
        self._ack_timeout = ack_timeout
        self._min_backoff, self._max_backoff = min_backoff, max_backoff
        self._idle_poll = idle_poll
        self._sock: ssl.SSLSocket | None = None
        self._sender_fd: int | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self.delivered = 0
        self.last_error = ""
        self._closed = False
        self._thread: threading.Thread | None = None
        if deliver:
            self._thread = threading.Thread(
                target=self._run, name="pacsvault-syslog-export", daemon=True)
            self._thread.start()

    @property
    def target(self) -> str:
        return f"{self.settings.host}:{self.settings.port}"

    # --- producer side -------------------------------------------------------------

    def write(self, event: AuditEvent) -> None:
        """Queue the event (disk only, never the network)."""
        with self._write_lock:
            if self._closed:
                raise RuntimeError("the audit syslog sink is closed")
            if self._approx_count >= self._limit:
                self._approx_count = len(self.queue)
            if self._approx_count >= self._limit:
                if not self._not_exported:
                    log.error("audit export queue full (%d records): new events are kept in "
                              "the audit trail but not sent to %s until it drains",
                              self._limit, self.target)
                self._not_exported += 1
                return
            if self._not_exported:
                self._put(self._gap_event(self._not_exported))
                self._not_exported = 0
            self._put(event)
        self._wake.set()

    def _put(self, event: AuditEvent) -> None:
        hostname = self.builder.hostname
        room = self.settings.max_message_size - len(format_record(b"", event, hostname=hostname))
        for xml in self.builder.documents(event, room):
            self.queue.put(format_record(xml, event, hostname=hostname))
            self._approx_count += 1

    def _gap_event(self, count: int) -> AuditEvent:
        return AuditEvent(
            action="audit.export.overflow", outcome=Outcome.MINOR_FAILURE,
            code=EventCode.SECURITY_ALERT,
            message="export queue was full: events missing here are in the audit trail",
            detail={"not_exported": count},
        )

    def pending(self) -> int:
        """Records waiting for the collector (all processes' records, read from disk)."""
        return len(self.queue)

    def flush(self, timeout: float) -> bool:
        """Wait until every queued record is delivered; False on timeout."""
        deadline = time.monotonic() + timeout
        self._wake.set()
        while self.pending():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True

    def close(self, timeout: float = 5.0) -> None:
        """Stop the sender; undelivered records stay queued for the next start."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._write_lock:
            if not self._closed:
                self._closed = True
                self.queue.close()
        if self._thread is not None and self._thread.is_alive():
            return  # still in a network call; it stops by itself, the files stay queued
        self._disconnect()
        if self._sender_fd is not None:
            os.close(self._sender_fd)  # releases the flock
            self._sender_fd = None

    # --- sender side ---------------------------------------------------------------

    def _is_sender(self) -> bool:
        """Hold ``sender.lock``: one delivering process per queue."""
        if self._sender_fd is None:
            self._sender_fd = os.open(self.queue.root / "sender.lock",
                                      os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(self._sender_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(self._sender_fd)
                self._sender_fd = None
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                return False
        return True

    def _run(self) -> None:
        backoff = self._min_backoff
        failing = False
        while not self._stop.is_set():
            try:
                if not self._is_sender():
                    self._stop.wait(self._idle_poll)
                    continue
                self._wake.clear()
                batch = self.queue.entries()[: self._batch]
                if not batch:
                    with self._write_lock:
                        self._approx_count = 0 if self._closed else len(self.queue)
                    self._wake.wait(self._idle_poll)
                    continue
                sent = self._deliver(batch)
                self.delivered += sent
                if failing:
                    log.info("audit collector %s reachable again; delivering the queue",
                             self.target)
                failing, backoff = False, self._min_backoff
            except (OSError, ssl.SSLError, DeliveryError) as exc:
                self._disconnect()
                self.last_error = f"{type(exc).__name__}: {exc}"
                if not failing:
                    log.warning("audit collector %s unreachable (%s); events stay queued "
                                "and will be sent in order", self.target, self.last_error)
                failing = True
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self._max_backoff)
            except Exception as exc:  # the sender must survive anything and retry
                self._disconnect()
                self.last_error = type(exc).__name__
                log.error("audit syslog sender error: %s", type(exc).__name__)
                self._stop.wait(self._max_backoff)

    def _connect(self) -> ssl.SSLSocket:
        if self._sock is not None and not self._peer_closed(self._sock):
            return self._sock
        self._disconnect()
        host = str(self.settings.host)
        raw = socket.create_connection((host, self.settings.port),
                                       timeout=self._connect_timeout)
        try:
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            tls = self._context.wrap_socket(
                raw, server_hostname=self.settings.server_name or host)
        except BaseException:
            raw.close()
            raise
        tls.settimeout(self._ack_timeout)
        self._sock = tls
        log.info("audit collector %s connected (%s)", self.target, tls.version())
        return tls

    @staticmethod
    def _peer_closed(sock: ssl.SSLSocket) -> bool:
        """Did the collector close or reset the connection? (It never sends data.)"""
        try:
            readable, _, _ = select.select([sock], [], [], 0)
        except (OSError, ValueError):
            return True
        if not readable and not sock.pending():
            return False
        timeout = sock.gettimeout()
        sock.setblocking(False)
        try:
            return sock.recv(4096) == b""  # data would be odd but harmless
        except ssl.SSLWantReadError:
            return False  # only TLS housekeeping (e.g. TLS 1.3 session tickets)
        except (OSError, ssl.SSLError):
            return True
        finally:
            sock.settimeout(timeout)

    def _disconnect(self) -> None:
        sock, self._sock = self._sock, None
        if sock is None:
            return
        try:
            sock.settimeout(1.0)
            sock.unwrap()  # close_notify: an orderly end, not a truncation, for the collector
        except (OSError, ValueError, ssl.SSLError):
            pass
        finally:
            sock.close()

    def _deliver(self, batch: list[tuple[int, Path]]) -> int:
        """Send the batch in order; delete its files only once the collector has it."""
        records: list[bytes] = []
        paths: list[Path] = []
        for seq, path in batch:
            try:
                records.append(self.queue.read(seq, path))
                paths.append(path)
            except FileNotFoundError:
                continue  # delivered meanwhile by a previous sender
            except objects.ObjectFormatError:
                log.error("audit export: queued record %s fails authentication (damaged, "
                          "moved or another key); set aside in rejected/", path.name)
                self.queue.reject(path)
        if not records:
            return 0
        sock = self._connect()
        sock.sendall(b"".join(frame(record) for record in records))
        self._await_ack(sock)
        self.queue.remove(paths)
        with self._write_lock:
            self._approx_count = max(0, self._approx_count - len(paths))
        return len(paths)

    def _await_ack(self, sock: ssl.SSLSocket) -> None:
        """Wait until the collector's TCP stack acknowledged every byte we wrote."""
        deadline = time.monotonic() + self._ack_timeout
        pause = 0.001
        while True:
            state = _tcp_state(sock)
            unacked = _unacked_bytes(sock)
            if state is None or unacked is None:
                return  # not Linux: a clean sendall is all we can know
            if state not in (_TCP_ESTABLISHED, _TCP_CLOSE_WAIT):
                raise DeliveryError("the connection closed before the collector acknowledged")
            if unacked == 0:
                return
            if time.monotonic() >= deadline:
                raise DeliveryError(f"no acknowledgement within {self._ack_timeout:g} s")
            time.sleep(pause)
            pause = min(pause * 2, 0.05)


__all__ = [
    "APP_NAME", "BOM", "FACILITY_SECURITY", "MSGID", "DeliveryError", "SyslogSink",
    "format_record", "frame",
]
