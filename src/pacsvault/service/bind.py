"""Where the listeners bind: the ``[server] bind = "private"`` keyword (issue 19).

Why not ``0.0.0.0``: a wildcard listens on every address the machine has or will have,
public ones included (a box plugged straight into a fibre modem, a VPN that hands out a
routable address); the trusted-network rule then stands alone between the archive and the
internet. ``private`` listens only on the machine's loopback and practice-network addresses
(RFC 1918, IPv6 unique local), one listening socket per address, so a public address is
never listened on unless someone sets it explicitly (which the exposure guard records,
alerts and refuses without a tested alert channel).

IPv4 link-local (169.254/16, a machine with no DHCP answer) is used only when there is no
RFC 1918 / unique-local address: it is what a modality cabled directly to the server gets.
IPv6 link-local (fe80::/10) is never used: it needs a scope id and modalities don't use it.

The addresses are read once, at start: an address the machine gets later (DHCP) is not
served until a restart.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable, Mapping
from typing import Any

PRIVATE = "private"

_LOOPBACK = tuple(ipaddress.ip_network(n) for n in ("127.0.0.0/8", "::1/128"))
_PRIVATE = tuple(ipaddress.ip_network(n) for n in (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"))
_LINK_LOCAL = ipaddress.ip_network("169.254.0.0/16")


def _inside(ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
            nets: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    return any(ip.version == net.version and ip in net for net in nets)


def private_addresses(interfaces: Mapping[str, Iterable[Any]] | None = None) -> list[str]:
    """This machine's loopback and private addresses, loopback first (``interfaces``:
    what ``psutil.net_if_addrs()`` returns; read now when None)."""
    if interfaces is None:
        import psutil

        interfaces = psutil.net_if_addrs()
    loopback: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    private: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    link_local: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    for entries in interfaces.values():
        for entry in entries:
            if entry.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            try:
                ip = ipaddress.ip_address(str(entry.address).split("%")[0])
            except ValueError:
                continue
            if _inside(ip, _LOOPBACK):
                loopback.append(ip)
            elif _inside(ip, _PRIVATE):
                private.append(ip)
            elif ip.version == 4 and ip in _LINK_LOCAL:
                link_local.append(ip)
    chosen = private or link_local

    def order(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> tuple[int, int]:
        return ip.version, int(ip)

    out: list[str] = []
    for ip in sorted(set(loopback), key=order) + sorted(set(chosen), key=order):
        if str(ip) not in out:
            out.append(str(ip))
    return out or ["127.0.0.1"]


def addresses(bind: str, interfaces: Mapping[str, Iterable[Any]] | None = None) -> list[str]:
    """The addresses a ``bind`` setting listens on: one socket each."""
    if bind == PRIVATE:
        return private_addresses(interfaces)
    return [bind]


def notice(listening: list[str]) -> str:
    """The line ``serve`` logs and ``init`` prints (after "The server will be") for
    ``bind = "private"``."""
    return (f"listening on {', '.join(listening)} (private); a public address would "
            "need [server] bind = \"<address>\" in pacsvault.toml and is guarded (recorded, "
            "alerted, refused without a tested alert channel); an address this machine gets "
            "later is served after a restart")
