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

import argparse
import ipaddress
import socket
from collections.abc import Iterable, Mapping
from typing import Any

PRIVATE = "private"
# The one host name older settings files used; it means the IPv4 loopback address.
LOCALHOST = "localhost"

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


def normalize(value: str) -> str:
    """A ``bind`` value as the rest of the code compares it: the keywords in any case
    (``Private``, ``LOCALHOST``: people type them so, and ``--bind Private`` must not be
    taken for an address, e.g. a public one by the exposure guard), else an IP address.
    Anything else is refused now rather than by a failed bind at start (a host name may
    resolve to a public address). One function for ``[server] bind`` and ``--bind``."""
    text = value.strip()
    word = text.lower()
    if word == PRIVATE:
        return PRIVATE
    if word == LOCALHOST:
        return "127.0.0.1"
    try:
        ipaddress.ip_address(text.split("%")[0])
    except ValueError:
        raise ValueError(f'bind must be "private" or an IP address, not {value!r}'
                         ) from None
    return text


def argument(value: str) -> str:
    """``normalize`` as an argparse ``type``: its message, not argparse's "invalid value"."""
    try:
        return normalize(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


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
