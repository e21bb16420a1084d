"""The PROXY protocol (v1 text and v2 binary, as HAProxy and nginx ``stream`` send it).

Why: behind a TCP load balancer every connection comes from the balancer's address, and
every rule that depends on the source address (trusted networks, a node's registered host,
per-source admission and sign-in throttling, the audit trail's addresses) would then
refuse everyone or trust everyone. The balancer prepends one header naming the real
client; the listeners read it, *only* from the addresses in ``[dicom]
proxy_protocol_from`` (from any other source the same bytes are what they are: a malformed
PDU, a failed TLS handshake), and use its address in place of the peer's.

Written here rather than taken from PyPI: the one library (``proxy-protocol``) is an asyncio
server framework with little use, and the format is small. Strict bounds: a v1 line is at
most 107 bytes, a v2 header at most 232 (16 + 216 of addresses and TLVs; TLVs are skipped);
never a byte past the header is read, so the PDU or TLS record that follows is intact.
Specification: https://www.haproxy.org/download/2.6/doc/proxy-protocol.txt
"""

from __future__ import annotations

import ipaddress
import socket
import time
from dataclasses import dataclass

V1_MAX = 107
V2_MAX = 232
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V1_PREFIX = b"PROXY "
_V1_MIN = len(b"PROXY UNKNOWN\r\n")  # no valid line is shorter: reading this far is safe
_V2_FIXED = 16
# v2 address block lengths (PS: family/transport byte)
_TCP4, _TCP6, _UNSPEC = 0x11, 0x21, 0x00


class ProxyHeaderError(ValueError):
    """Not a valid PROXY header (the message names the part, never echoes the bytes)."""


class ProxyHeaderMissing(ProxyHeaderError):
    """The connection closed before sending a byte (a balancer's plain TCP health check)."""


@dataclass(frozen=True)
class ProxyHeader:
    """What a header says. ``source`` None: a LOCAL/UNKNOWN header (the balancer's own
    connection, e.g. a health check): the connection's real address stands."""

    version: int
    length: int  # bytes the header took
    source: tuple[str, int] | None = None
    destination: tuple[str, int] | None = None


def parse(data: bytes) -> ProxyHeader | None:
    """The header at the start of ``data``; None while more bytes are needed.

    Raises ``ProxyHeaderError`` as soon as the bytes cannot be a header (a wrong first
    byte is enough), or when one would exceed its bound."""
    if not data:
        return None
    if data[0] == V2_SIGNATURE[0]:
        return _parse_v2(data)
    if data[0] == _V1_PREFIX[0]:
        return _parse_v1(data)
    raise ProxyHeaderError("no PROXY header")


def wanted(data: bytes) -> int:
    """How many bytes may be read next without reading past the header (at least 1)."""
    if not data:
        return 1
    if data[0] == V2_SIGNATURE[0]:
        if len(data) < _V2_FIXED:
            return _V2_FIXED - len(data)
        return max(1, _V2_FIXED + int.from_bytes(data[14:16], "big") - len(data))
    return max(1, _V1_MIN - len(data))


def _parse_v2(data: bytes) -> ProxyHeader | None:
    head = data[:_V2_FIXED]
    if not V2_SIGNATURE.startswith(head[:12]):
        raise ProxyHeaderError("bad v2 signature")
    if len(head) < _V2_FIXED:
        return None
    version, command = head[12] >> 4, head[12] & 0x0F
    if version != 2 or command not in (0, 1):
        raise ProxyHeaderError("bad v2 version or command")
    family = head[13]
    length = int.from_bytes(head[14:16], "big")
    total = _V2_FIXED + length
    if total > V2_MAX:
        raise ProxyHeaderError("v2 header too long")
    if len(data) < total:
        return None
    block = data[_V2_FIXED:total]
    if command == 0 or family == _UNSPEC:  # LOCAL, or PROXY with no address to give
        return ProxyHeader(2, total)
    if family == _TCP4:
        size, width = 12, 4
    elif family == _TCP6:
        size, width = 36, 16
    else:  # UDP, UNIX sockets: not what a DICOM or HTTPS listener is sent
        raise ProxyHeaderError("v2 address family not TCP")
    if length < size:
        raise ProxyHeaderError("v2 address block too short")
    src = ipaddress.ip_address(block[:width])
    dst = ipaddress.ip_address(block[width:2 * width])
    sport = int.from_bytes(block[2 * width:2 * width + 2], "big")
    dport = int.from_bytes(block[2 * width + 2:2 * width + 4], "big")
    return ProxyHeader(2, total, (str(src), sport), (str(dst), dport))


def _parse_v1(data: bytes) -> ProxyHeader | None:
    if not _V1_PREFIX.startswith(data[:len(_V1_PREFIX)]):
        raise ProxyHeaderError("bad v1 prefix")
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX or b"\n" in data[:V1_MAX] or b"\0" in data:
            raise ProxyHeaderError("v1 line too long or not terminated by CRLF")
        return None
    try:
        line = data[:end].decode("ascii")
    except UnicodeDecodeError:
        raise ProxyHeaderError("v1 line not ASCII") from None
    if "%" in line:  # an IPv6 zone means nothing on the far side of a balancer
        raise ProxyHeaderError("v1 address malformed")
    parts = line.split(" ")
    if len(parts) >= 2 and parts[1] == "UNKNOWN":  # the rest of the line is ignored
        return ProxyHeader(1, end + 2)
    if len(parts) != 6 or parts[1] not in ("TCP4", "TCP6"):
        raise ProxyHeaderError("v1 line malformed")
    kind = ipaddress.IPv4Address if parts[1] == "TCP4" else ipaddress.IPv6Address
    try:
        src, dst = kind(parts[2]), kind(parts[3])
    except ValueError:
        raise ProxyHeaderError("v1 address malformed") from None
    return ProxyHeader(1, end + 2, (str(src), _port(parts[4])), (str(dst), _port(parts[5])))


def _port(text: str) -> int:
    if not text.isdigit() or not text.isascii() or len(text) > 5 or (
            len(text) > 1 and text[0] == "0"):
        raise ProxyHeaderError("v1 port malformed")
    value = int(text)
    if value > 65535:
        raise ProxyHeaderError("v1 port out of range")
    return value


def read_header(sock: socket.socket, timeout: float) -> ProxyHeader:
    """Read exactly one header from a blocking socket within ``timeout`` seconds (the
    connection's first-byte budget); the socket's own timeout is left changed."""
    deadline = time.monotonic() + timeout
    data = b""
    while True:
        header = parse(data)
        if header is not None:
            return header
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ProxyHeaderError("deadline")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(wanted(data))
        except TimeoutError:
            raise ProxyHeaderError("deadline") from None
        except OSError as exc:
            raise ProxyHeaderError(type(exc).__name__) from None
        if not chunk:
            if not data:
                raise ProxyHeaderMissing("closed before a byte")
            raise ProxyHeaderError("closed mid-header")
        data += chunk
