"""Strict checks of what a node is registered with: its host and its AE title.

One place for the command line (``node add|set``), the admin page (``/admin/nodes``) and
the registry itself, because a host the association policy can never match (``ct
scanner``, ``192.168.1.300``, ``http://…``) used to be accepted and the modality was then
refused with a misleading "Calling AE Title Not Recognized" (issue 12, defect 5).

* host: an IPv4/IPv6 address of one device, or an RFC 1123 host name. The policy compares
  one address (``dicom.policy._host_matches``): networks (CIDR) are refused with a clear
  message rather than silently never matching.
* a plain (non-TLS) node must be on the practice network: plain DICOM carries patient
  data in clear, so a public address is refused with the reason and the way out (TLS).
* AE title: PS3.5 AE value representation: at most 16 characters of the default
  repertoire, no backslash nor control character, not only spaces (leading and trailing
  spaces are not significant).

Each refusal is a ``HostError`` with a ``code`` (the page translates by code) and an
English one-line message (the command line prints it).
"""

from __future__ import annotations

import ipaddress
import re

_LABEL = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
_AE = re.compile(r"^[ -~]+$")


class HostError(ValueError):
    """A refused host or AE title: ``code`` names the rule, the text explains it."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def check_ae_title(text: str) -> str:
    """The AE title without its non-significant spaces, or ``HostError``."""
    ae = text.strip(" ")
    if not ae:
        raise HostError("ae-empty", "an AE title cannot be empty or only spaces")
    if not _AE.match(ae) or "\\" in ae:
        raise HostError("ae-chars", f"AE title {ae!r}: only printable ASCII characters, no "
                        "backslash and no control character")
    if len(ae) > 16:
        raise HostError("ae-long", f"AE title {ae!r} has {len(ae)} characters: an AE title "
                        "is 1 to 16 characters")
    return ae


# A practice network: RFC 1918, loopback, link-local, IPv6 unique-local. Spelled out
# because ``ipaddress.is_private`` also counts documentation and other special ranges.
_PRACTICE = tuple(ipaddress.ip_network(n) for n in (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "127.0.0.0/8", "169.254.0.0/16",
    "::1/128", "fc00::/7", "fe80::/10"))


def _is_practice(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return any(ip.version == net.version and ip in net for net in _PRACTICE)


def check_host(text: str, *, tls: bool) -> str:
    """The host to register (an address in canonical form, or a host name), or ``HostError``.

    ``tls``: whether the node is TLS only; a plain node must have a practice-network
    address (private, loopback or link-local). A host name cannot be judged without DNS,
    which may change later: it is accepted, and the trusted-networks gate still applies.
    """
    host = text.strip()
    if not host:
        raise HostError("host-empty", "a node needs a host: its IP address or host name")
    if "://" in host:
        raise HostError("host-url", f"host {host!r} is a URL: give only the address or host "
                        "name (such as 192.168.1.20), without 'http://' or a path")
    if "/" in host:
        raise HostError("host-network", f"host {host!r} is a network or a path: a node is one "
                        "device, give its own address (networks are not supported)")
    try:
        ip = ipaddress.ip_address(host.removeprefix("[").removesuffix("]"))
    except ValueError:
        ip = None
    if ip is not None:
        if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id:
            raise HostError("host-invalid", f"host {host!r}: an IPv6 zone (%…) is not "
                            "supported; give a global or unique-local address")
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if ip.is_unspecified or ip.is_multicast or ip == ipaddress.IPv4Address(
                "255.255.255.255"):
            raise HostError("host-not-device", f"host {host!r} is not the address of one "
                            "device")
        if not tls and not _is_practice(ip):
            raise HostError("host-public", f"host {ip} is a public internet address: plain "
                            "DICOM is for the practice network; use --tls (with "
                            "--client-cert) for a node outside it")
        return str(ip)
    if " " in host and re.fullmatch(r"[A-Za-z0-9. -]+", host):
        raise HostError("host-space", f"host {host!r} contains a space: give the device's "
                        "IP address or host name, not its description")
    labels = host.removesuffix(".").split(".")
    if all(label.isdigit() for label in labels):
        raise HostError("host-bad-ip", f"host {host!r} is not a valid IP address (four "
                        "numbers from 0 to 255, such as 192.168.1.20)")
    if (len(host) > 253 or not all(_LABEL.match(label) for label in labels)
            or labels[-1].isdigit()):
        raise HostError("host-invalid", f"host {host!r} is neither an IP address nor a valid "
                        "host name (letters, digits and hyphens, separated by dots)")
    return host
