"""Ask the default gateway for its public address over NAT-PMP (RFC 6886) and whether it
speaks PCP (RFC 6887, its successor on the same port), read-only.

Why: a box answering NAT-PMP lets any program on the LAN open a port to this host without
anyone's knowledge (the way a PACS ends up on the Internet without a hand-made rule).
NAT-PMP cannot list the existing mappings; what the check learns is that the gateway
accepts such requests and which public address it would expose. Only opcode 0 (public
address request) is ever sent, and for PCP only ANNOUNCE (opcode 0): neither creates
anything on the gateway.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

NATPMP_PORT = 5351
RESULT_TEXT = {0: "success", 1: "unsupported version", 2: "not authorized / refused",
               3: "network failure", 4: "out of resources", 5: "unsupported opcode"}


PCP_VERSION = 2
PCP_ANNOUNCE = 0


@dataclass(frozen=True)
class PublicAddress:
    gateway: str
    result: int  # 0 = success
    epoch: int
    address: str  # "" unless result == 0 (NAT-PMP); always "" for PCP
    protocol: str = "NAT-PMP"  # or "PCP"


def default_gateway(route: Path = Path("/proc/net/route")) -> str | None:
    """The IPv4 default route's gateway, from the kernel's routing table."""
    try:
        lines = route.read_text().splitlines()[1:]
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) > 3 and fields[1] == "00000000" and int(fields[3], 16) & 0x2:
            return str(ipaddress.IPv4Address(struct.pack("<I", int(fields[2], 16))))
    return None


def parse_answer(gateway: str, datagram: bytes) -> PublicAddress | None:
    """A public address response (version 0, opcode 128), None for anything else."""
    if len(datagram) < 8:
        return None
    version, opcode, result, epoch = struct.unpack("!BBHI", datagram[:8])
    if version != 0 or opcode != 128:
        return None
    address = ""
    if result == 0:
        if len(datagram) < 12:
            return None
        address = str(ipaddress.IPv4Address(datagram[8:12]))
    return PublicAddress(gateway, result, epoch, address)


def announce_request(client: str) -> bytes:
    """RFC 6887 14.1: ANNOUNCE, lifetime 0, our address as an IPv4-mapped IPv6 address."""
    mapped = ipaddress.IPv6Address(f"::ffff:{client}").packed
    return struct.pack("!BBHI", PCP_VERSION, PCP_ANNOUNCE, 0, 0) + mapped


def parse_pcp(gateway: str, datagram: bytes) -> PublicAddress | None:
    """An ANNOUNCE response (version 2, R bit set, opcode 0), None for anything else."""
    if len(datagram) < 24:
        return None
    version, opcode, _reserved, result, _lifetime, epoch = struct.unpack(
        "!BBBBII", datagram[:12])
    if version != PCP_VERSION or opcode != 0x80 | PCP_ANNOUNCE:
        return None
    return PublicAddress(gateway, result, epoch, "", "PCP")


def public_address(gateway: tuple[str, int], timeout: float) -> PublicAddress | None:
    """NAT-PMP first, then PCP: None when the gateway answers neither."""
    half = timeout / 2
    found = _ask(gateway, b"\x00\x00", parse_answer, half)
    if found is not None and found.result == 0:
        return found
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(gateway)  # no packet: only which of our addresses faces it
            client = str(probe.getsockname()[0])
    except OSError:
        return found
    return _ask(gateway, announce_request(client), parse_pcp, half) or found


def _ask(gateway: tuple[str, int], request: bytes,
         parse: Callable[[str, bytes], PublicAddress | None],
         timeout: float) -> PublicAddress | None:
    """RFC 6886 3.1 / RFC 6887 8.1.1: the request, retried with doubling waits from
    250 ms, within ``timeout``; None when the gateway does not answer."""
    deadline = time.monotonic() + timeout
    wait = 0.25
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        while time.monotonic() < deadline:
            try:
                sock.sendto(request, gateway)
            except OSError:  # no route to it
                return None
            until = min(deadline, time.monotonic() + wait)
            while (left := until - time.monotonic()) > 0:
                sock.settimeout(left)
                try:
                    datagram, source = sock.recvfrom(64)
                except TimeoutError:
                    break
                except OSError:  # ICMP port unreachable: nobody listens
                    return None
                if source[0] != gateway[0]:
                    continue  # RFC 6886 3.1: only the gateway's answers count
                found = parse(gateway[0], datagram)
                if found is not None:
                    return found
            wait *= 2
    return None
