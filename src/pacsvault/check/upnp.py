"""Read the internet box's port mappings through UPnP IGD, read-only.

Why: a practice's PACS is usually exposed by a port mapping on the internet box (added by
hand, or silently by a program through UPnP) rather than by pacsvault itself; the
sanctioned practices never knew. The box answers the same questions to anyone on the LAN,
so the nightly check asks them: SSDP discovery, the device description, then
``GetGenericPortMappingEntry`` by index until the box answers 713
(SpecifiedArrayIndexInvalid). Only that action and nothing else: never ``Add`` or
``DeletePortMapping``; changing the box is the practice's decision.

Why our own small client rather than a library: miniupnpc and upnpclient discover by
multicast only (no way to address a gateway by unicast, which the tests need: they must
never multicast), async-upnp-client brings an asyncio stack for three HTTP requests.
This client is bounded everywhere (answers, sizes, indexes, time) and parses XML with
``defusedxml`` (the box's answers are untrusted input: no entities, no DTD).

The description's URL must be on the address that answered the discovery (a forged
answer cannot make the check fetch an address elsewhere).
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import time
import urllib.parse
from dataclasses import dataclass
from xml.etree.ElementTree import Element  # type only: parsing goes through defusedxml

import defusedxml.ElementTree as SafeET

SSDP_MULTICAST = ("239.255.255.250", 1900)
SEARCH_TARGETS = ("urn:schemas-upnp-org:device:InternetGatewayDevice:1",
                  "urn:schemas-upnp-org:device:InternetGatewayDevice:2")
CONNECTION_SERVICES = ("urn:schemas-upnp-org:service:WANIPConnection:",
                       "urn:schemas-upnp-org:service:WANPPPConnection:")
MAX_ANSWERS = 16
MAX_BODY = 256 * 1024
MAX_ENTRIES = 512  # a box holds a few dozen; bounded whatever it says
END_OF_ARRAY = ("713", "714")  # SpecifiedArrayIndexInvalid; NoSuchEntryInArray (some boxes)


class UpnpError(Exception):
    """The gateway answered something this client cannot use (the reason, one line)."""


@dataclass(frozen=True)
class PortMapping:
    """One entry of the box's table, as ``GetGenericPortMappingEntry`` returns it."""

    remote_host: str  # "" = any source on the Internet
    external_port: int
    protocol: str  # "TCP" / "UDP"
    internal_port: int
    internal_client: str
    enabled: bool
    description: str
    lease_seconds: int

    def as_json(self) -> dict[str, object]:
        return {"remote_host": self.remote_host, "external_port": self.external_port,
                "protocol": self.protocol, "internal_port": self.internal_port,
                "internal_client": self.internal_client, "enabled": self.enabled,
                "description": self.description[:80], "lease_seconds": self.lease_seconds}


@dataclass(frozen=True)
class Gateway:
    location: str  # the device description's URL
    service_type: str
    control_url: str
    mappings: tuple[PortMapping, ...]
    error: str = ""  # why the table could not be read to its end


def search_message(target: str, mx: int = 2) -> bytes:
    return (f"M-SEARCH * HTTP/1.1\r\nHOST: {SSDP_MULTICAST[0]}:{SSDP_MULTICAST[1]}\r\n"
            f'MAN: "ssdp:discover"\r\nMX: {mx}\r\nST: {target}\r\n\r\n').encode("ascii")


def _headers(datagram: bytes) -> dict[str, str]:
    lines = datagram.decode("latin-1", "replace").split("\r\n")
    if not lines or not lines[0].startswith("HTTP/1.1 200"):
        return {}
    found: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            found[name.strip().lower()] = value.strip()
    return found


def discover(address: tuple[str, int], timeout: float) -> list[str]:
    """Description URLs of the gateways answering an M-SEARCH sent to ``address``
    (the SSDP multicast group in production, a unicast address in tests)."""
    locations: list[str] = []
    multicast = ipaddress.ip_address(address[0]).is_multicast
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        if multicast:  # stay on the LAN: UPnP's own TTL
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 2)
        try:
            for target in SEARCH_TARGETS:
                sock.sendto(search_message(target), address)
        except OSError:  # no route to the LAN (no interface up): no gateway to ask
            return []
        deadline = time.monotonic() + timeout
        answers = 0
        while answers < MAX_ANSWERS:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            sock.settimeout(left)
            try:
                datagram, source = sock.recvfrom(4096)
            except OSError:  # the timeout, or an ICMP unreachable for a unicast search
                break
            answers += 1
            location = _headers(datagram).get("location", "")
            parsed = urllib.parse.urlsplit(location)
            # only a description on the answering host, over plain HTTP (UPnP's own)
            if parsed.scheme == "http" and parsed.hostname == source[0] \
                    and location not in locations:
                locations.append(location)
    return locations


def _fetch(url: str, timeout: float, *, body: bytes | None = None,
           headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme != "http" or not parsed.hostname:
        raise UpnpError(f"not an http URL: {url[:80]}")
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port or 80, timeout=timeout)
    try:
        path = parsed.path or "/"
        if parsed.query:
            path += "?" + parsed.query
        conn.request("POST" if body is not None else "GET", path, body=body,
                     headers=headers or {})
        res = conn.getresponse()
        data = res.read(MAX_BODY + 1)
        if len(data) > MAX_BODY:
            raise UpnpError("answer too large")
        return res.status, data
    finally:
        conn.close()


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _child_text(element: Element, name: str) -> str:
    for child in element:
        if _local(child.tag) == name:
            return (child.text or "").strip()
    return ""


def connection_service(location: str, description: bytes) -> tuple[str, str] | None:
    """(service type, absolute control URL) of the first WANIPConnection or
    WANPPPConnection service of a device description, None if it has none."""
    root = SafeET.fromstring(description)
    base = _child_text(root, "URLBase") or location
    for element in root.iter():
        if _local(element.tag) != "service":
            continue
        service_type = _child_text(element, "serviceType")
        control = _child_text(element, "controlURL")
        if control and service_type.startswith(CONNECTION_SERVICES):
            url = urllib.parse.urljoin(base, control)
            if urllib.parse.urlsplit(url).hostname != urllib.parse.urlsplit(location).hostname:
                continue  # the control must be on the described device itself
            return service_type, url
    return None


def _entry_request(service_type: str, index: int) -> tuple[bytes, dict[str, str]]:
    body = ('<?xml version="1.0"?>\r\n'
            '<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/" '
            's:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/"><s:Body>'
            f'<u:GetGenericPortMappingEntry xmlns:u="{service_type}">'
            f"<NewPortMappingIndex>{index}</NewPortMappingIndex>"
            "</u:GetGenericPortMappingEntry></s:Body></s:Envelope>").encode("ascii")
    headers = {"Content-Type": 'text/xml; charset="utf-8"',
               "SOAPAction": f'"{service_type}#GetGenericPortMappingEntry"'}
    return body, headers


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        return 0


def parse_entry(answer: bytes) -> PortMapping:
    root = SafeET.fromstring(answer)
    values: dict[str, str] = {}
    for element in root.iter():
        name = _local(element.tag)
        if name.startswith("New"):
            values[name] = (element.text or "").strip()
    if "NewExternalPort" not in values or "NewInternalClient" not in values:
        raise UpnpError("port mapping entry without its ports")
    return PortMapping(
        remote_host=values.get("NewRemoteHost", ""),
        external_port=_int(values["NewExternalPort"]),
        protocol=values.get("NewProtocol", "").upper(),
        internal_port=_int(values.get("NewInternalPort", "")),
        internal_client=values["NewInternalClient"],
        enabled=values.get("NewEnabled", "1") not in ("0", "false"),
        description=values.get("NewPortMappingDescription", ""),
        lease_seconds=_int(values.get("NewLeaseDuration", "")))


def soap_error_code(answer: bytes) -> str:
    try:
        root = SafeET.fromstring(answer)
    except (SafeET.ParseError, ValueError):
        return ""
    for element in root.iter():
        if _local(element.tag) == "errorCode":
            return (element.text or "").strip()
    return ""


def mappings(service_type: str, control_url: str,
             timeout: float) -> tuple[list[PortMapping], str]:
    """Every entry of the table by index, until 713; (entries, error if cut short)."""
    found: list[PortMapping] = []
    for index in range(MAX_ENTRIES):
        body, headers = _entry_request(service_type, index)
        status, answer = _fetch(control_url, timeout, body=body, headers=headers)
        if status == 200:
            found.append(parse_entry(answer))
            continue
        code = soap_error_code(answer)
        if code in END_OF_ARRAY:
            return found, ""
        return found, f"HTTP {status}, UPnP error {code or 'none'} at index {index}"
    return found, f"more than {MAX_ENTRIES} entries"


def read_gateways(address: tuple[str, int], timeout: float) -> list[Gateway]:
    """Discover, describe and list the mappings of every answering gateway. A gateway
    that fails half-way is returned with its error (the check reports it)."""
    gateways: list[Gateway] = []
    for location in discover(address, timeout):
        try:
            status, description = _fetch(location, timeout)
            if status != 200:
                raise UpnpError(f"description: HTTP {status}")
            service = connection_service(location, description)
            if service is None:
                gateways.append(Gateway(location, "", "", (), "no WAN connection service"))
                continue
            entries, error = mappings(service[0], service[1], timeout)
            gateways.append(Gateway(location, service[0], service[1], tuple(entries), error))
        except (OSError, ValueError, UpnpError, SafeET.ParseError,
                http.client.HTTPException) as exc:  # DefusedXmlException is a ValueError
            gateways.append(Gateway(location, "", "", (), f"{type(exc).__name__}: {exc}"[:200]))
    return gateways
