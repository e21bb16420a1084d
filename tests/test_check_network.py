"""Issue 18, security check, network section: against a real running server.

The internet box is a fake gateway on loopback (an SSDP responder addressed by unicast, an
HTTP server with the IGD description and the WANIPConnection SOAP control, a NAT-PMP
responder): nothing here multicasts or leaves 127.0.0.1. The outside host of the
exposure test lives in a network namespace the test creates.
"""

from __future__ import annotations

import datetime as dt
import http.server
import json
import shutil
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pacsvault.check import CheckContext, CheckResult, Severity, natpmp, network, run, upnp
from tests.harness.components import require
from tests.harness.served import Served, served_vault
from tests.helpers import make_vault

REPO = Path(__file__).resolve().parent.parent
WAN_IP = "urn:schemas-upnp-org:service:WANIPConnection:1"
DESCRIPTION = f"""<?xml version="1.0"?>
<root xmlns="urn:schemas-upnp-org:device-1-0">
 <specVersion><major>1</major><minor>0</minor></specVersion>
 <device>
  <deviceType>urn:schemas-upnp-org:device:InternetGatewayDevice:1</deviceType>
  <friendlyName>Fake box</friendlyName>
  <deviceList><device>
   <deviceType>urn:schemas-upnp-org:device:WANDevice:1</deviceType>
   <deviceList><device>
    <deviceType>urn:schemas-upnp-org:device:WANConnectionDevice:1</deviceType>
    <serviceList><service>
     <serviceType>{WAN_IP}</serviceType>
     <serviceId>urn:upnp-org:serviceId:WANIPConn1</serviceId>
     <controlURL>/ctl/IPConn</controlURL>
     <eventSubURL>/evt/IPConn</eventSubURL>
     <SCPDURL>/WANIPCn.xml</SCPDURL>
    </service></serviceList>
   </device></deviceList>
  </device></deviceList>
 </device>
</root>""".encode()
ENTRY = """<?xml version="1.0"?>
<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Body>
<u:GetGenericPortMappingEntryResponse xmlns:u="{service}">
<NewRemoteHost></NewRemoteHost><NewExternalPort>{external}</NewExternalPort>
<NewProtocol>TCP</NewProtocol><NewInternalPort>{internal}</NewInternalPort>
<NewInternalClient>{client}</NewInternalClient><NewEnabled>1</NewEnabled>
<NewPortMappingDescription>{description}</NewPortMappingDescription>
<NewLeaseDuration>0</NewLeaseDuration>
</u:GetGenericPortMappingEntryResponse></s:Body></s:Envelope>"""
FAULT = b"""<?xml version="1.0"?>
<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Body><s:Fault>
<faultcode>s:Client</faultcode><faultstring>UPnPError</faultstring><detail>
<UPnPError xmlns="urn:schemas-upnp-org:control-1-0"><errorCode>713</errorCode>
<errorDescription>SpecifiedArrayIndexInvalid</errorDescription></UPnPError>
</detail></s:Fault></s:Body></s:Envelope>"""
PUBLIC = "203.0.113.7"  # documentation range: the box's "public" address, never routed


class FakeBox:
    """SSDP + IGD (description, SOAP control) + NAT-PMP, all on 127.0.0.1 by unicast."""

    def __init__(self) -> None:
        self.mappings: list[tuple[int, int, str, str]] = []  # external, internal, client, desc
        self.searches: list[bytes] = []
        self.actions: list[str] = []
        self.natpmp_requests: list[bytes] = []
        self.pcp_only = False
        box = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass

            def _send(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", 'text/xml; charset="utf-8"')
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                self._send(200, DESCRIPTION) if self.path == "/desc.xml" else self._send(404, b"")

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                action = self.headers.get("SOAPAction", "").strip('"').rsplit("#", 1)[-1]
                box.actions.append(action)
                if self.path != "/ctl/IPConn" or action != "GetGenericPortMappingEntry":
                    self._send(500, FAULT.replace(b"713", b"401"))
                    return
                index = int(body.split(b"<NewPortMappingIndex>")[1].split(b"<")[0])
                if index >= len(box.mappings):
                    self._send(500, FAULT)
                    return
                external, internal, client, description = box.mappings[index]
                self._send(200, ENTRY.format(service=WAN_IP, external=external,
                                             internal=internal, client=client,
                                             description=description).encode())

        self.http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.ssdp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.ssdp.bind(("127.0.0.1", 0))
        self.pmp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.pmp.bind(("127.0.0.1", 0))
        self._threads = [threading.Thread(target=self.http.serve_forever, daemon=True),
                         threading.Thread(target=self._ssdp_loop, daemon=True),
                         threading.Thread(target=self._pmp_loop, daemon=True)]
        for thread in self._threads:
            thread.start()

    @property
    def options(self) -> dict[str, object]:
        return {"ssdp_address": self.ssdp.getsockname(), "natpmp_gateway": self.pmp.getsockname(),
                "gateway_timeout": 1.0}

    def _ssdp_loop(self) -> None:
        while True:
            try:
                datagram, source = self.ssdp.recvfrom(4096)
            except OSError:
                return
            self.searches.append(datagram)
            st = next((line.split(":", 1)[1].strip() for line in datagram.decode().split("\r\n")
                       if line.upper().startswith("ST:")), "")
            if not st.endswith("InternetGatewayDevice:1"):
                continue  # a real IGD:1 box answers only its own type
            port = self.http.server_address[1]
            self.ssdp.sendto((f"HTTP/1.1 200 OK\r\nCACHE-CONTROL: max-age=120\r\nST: {st}\r\n"
                              f"USN: uuid:fake::{st}\r\nEXT:\r\nSERVER: Fake UPnP/1.0\r\n"
                              f"LOCATION: http://127.0.0.1:{port}/desc.xml\r\n\r\n").encode(),
                             source)

    def _pmp_loop(self) -> None:
        while True:
            try:
                datagram, source = self.pmp.recvfrom(64)
            except OSError:
                return
            self.natpmp_requests.append(datagram)
            if datagram[:1] == b"\x02" and self.pcp_only:  # PCP ANNOUNCE: success
                answer = struct.pack("!BBBBII", 2, 0x80, 0, 0, 0, 77) + bytes(12)
            elif datagram[:1] == b"\x00" and not self.pcp_only:
                answer = struct.pack("!BBHI", 0, 128, 0, 4242) + socket.inet_aton(PUBLIC)
            else:
                continue  # not this box's protocol: silence
            self.pmp.sendto(answer, source)

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()
        self.ssdp.close()
        self.pmp.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with served_vault(tmp_path_factory.mktemp("checknet") / "v",
                      nodes=[("SCANNER", (), "127.0.0.1")]) as found:
        yield found


@pytest.fixture
def box() -> Iterator[FakeBox]:
    fake = FakeBox()
    try:
        yield fake
    finally:
        fake.close()


def network_check(served: Served, options: dict[str, object]) -> CheckResult:
    vault = served.vault.open()
    try:
        return run(CheckContext(vault, dt.datetime.now(dt.UTC), options=options), ("network",))
    finally:
        vault.close()


def test_box_mapping_of_the_dicom_port_is_critical_and_disappears_with_it(
        served: Served, box: FakeBox) -> None:
    box.mappings = [(104, served.server.port, "127.0.0.1", "pacs"),
                    (2222, 22, "127.0.0.1", "ssh")]
    result = network_check(served, box.options)
    assert not result.errors
    found = {f.id: f for f in result.findings}
    mapping = found["network.upnp-mapping"]
    assert mapping.severity is Severity.CRITICAL and result.exit_code == 2
    assert mapping.data["mappings"] == [{
        "remote_host": "", "external_port": 104, "protocol": "TCP",
        "internal_port": served.server.port, "internal_client": "127.0.0.1", "enabled": True,
        "description": "pacs", "lease_seconds": 0, "listener": "dicom",
        "gateway": f"http://127.0.0.1:{box.http.server_address[1]}/desc.xml"}]
    assert f"104/TCP → 127.0.0.1:{served.server.port}" in mapping.evidence.en
    assert found["network.upnp-mapping-other"].severity is Severity.WARNING
    assert found["network.upnp-enabled"].severity is Severity.INFO
    # read-only: only the listing action, by index until the box's 713
    assert set(box.actions) == {"GetGenericPortMappingEntry"} and len(box.actions) == 3
    assert all(s.startswith(b"M-SEARCH * HTTP/1.1\r\n") and b'"ssdp:discover"' in s
               for s in box.searches)

    box.mappings = []
    result = network_check(served, box.options)
    ids = result.ids()
    assert "network.upnp-mapping" not in ids and "network.upnp-mapping-other" not in ids
    assert "network.upnp-enabled" in ids
    assert result.exit_code == 1  # what remains: the plain-DICOM node (warning)


def test_natpmp_answer_and_plain_nodes(served: Served, box: FakeBox) -> None:
    result = network_check(served, box.options)
    found = {f.id: f for f in result.findings}
    pmp = found["network.natpmp-enabled"]
    assert pmp.data == {"gateway": "127.0.0.1", "protocol": "NAT-PMP", "result": 0,
                        "public_address": PUBLIC}
    assert box.natpmp_requests and set(box.natpmp_requests) == {b"\x00\x00"}  # opcode 0 only
    plain = found["network.plain-dicom-nodes"]
    assert plain.severity is Severity.WARNING
    assert plain.data["nodes"] == [{"ae_title": "SCANNER", "host": "127.0.0.1"}]
    assert "DICOM PS3.15" in plain.requirement and "GDPR art. 32" in plain.requirement
    # a loopback server: no public listener, no exposure, settings at their defaults
    assert not {"network.public-listener", "network.exposure-events",
                "network.remote-access-internet", "network.tls-from-anywhere"} & result.ids()


def test_pcp_only_gateway_is_asked_with_announce(served: Served, box: FakeBox) -> None:
    box.pcp_only = True
    options = {**box.options, "ssdp_address": "off", "gateway_timeout": 2.0}
    result = network_check(served, options)
    found = {f.id: f for f in result.findings}
    assert found["network.natpmp-enabled"].data == {
        "gateway": "127.0.0.1", "protocol": "PCP", "result": 0, "public_address": ""}
    assert "PCP ANNOUNCE answered" in found["network.natpmp-enabled"].evidence.en
    announce = [r for r in box.natpmp_requests if r[:1] == b"\x02"]
    # version 2, opcode 0 (ANNOUNCE, creates nothing), lifetime 0, our IPv4-mapped address
    assert announce and all(r == b"\x02\x00\x00\x00" + bytes(4) + bytes(10) + b"\xff\xff"
                            + bytes([127, 0, 0, 1]) for r in announce)
    assert not box.searches  # "off": no SSDP at all


def test_silent_gateway_gives_nothing_within_the_timeout(served: Served) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as closed:
        closed.bind(("127.0.0.1", 0))
        nobody = closed.getsockname()  # a port nobody answers on
    started = time.monotonic()
    result = network_check(served, {"ssdp_address": nobody, "natpmp_gateway": nobody,
                                    "gateway_timeout": 0.5})
    assert time.monotonic() - started < 15  # bounded (the in-process vault opens too)
    assert not result.errors
    assert not {i for i in result.ids() if "upnp" in i or "natpmp" in i or "gateway" in i}


def test_answers_pointing_elsewhere_are_not_followed() -> None:
    """A forged SSDP answer or description cannot send the check to another address."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as liar:
        liar.bind(("127.0.0.1", 0))

        def answer() -> None:
            _, source = liar.recvfrom(4096)
            liar.sendto(b"HTTP/1.1 200 OK\r\nST: x\r\n"
                        b"LOCATION: http://192.0.2.1:80/desc.xml\r\n\r\n", source)

        thread = threading.Thread(target=answer, daemon=True)
        thread.start()
        assert upnp.discover(liar.getsockname(), 0.5) == []
        thread.join(2)
    moved = DESCRIPTION.replace(b"<specVersion>",
                                b"<URLBase>http://192.0.2.1:5000/</URLBase><specVersion>")
    assert upnp.connection_service("http://127.0.0.1:1/desc.xml", moved) is None
    assert upnp.connection_service("http://127.0.0.1:1/desc.xml", DESCRIPTION) == (
        WAN_IP, "http://127.0.0.1:1/ctl/IPConn")


def test_natpmp_and_upnp_parsers_refuse_garbage() -> None:
    ok = natpmp.parse_answer("g", struct.pack("!BBHI", 0, 128, 0, 7) + bytes([198, 51, 100, 9]))
    assert ok is not None and ok.address == "198.51.100.9" and ok.epoch == 7
    refused = natpmp.parse_answer("g", struct.pack("!BBHI", 0, 128, 2, 7))
    assert refused is not None and refused.result == 2 and refused.address == ""
    assert natpmp.parse_answer("g", b"\x00\x80") is None
    assert natpmp.parse_answer("g", struct.pack("!BBHI", 0, 129, 0, 7) + bytes(4)) is None
    assert upnp.soap_error_code(FAULT) == "713"
    bomb = b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY a "aaaa">]><r>&a;</r>'
    with pytest.raises(ValueError):  # defusedxml: no entities from the network
        upnp.parse_entry(bomb)


def test_listening_sockets_from_proc(tmp_path: Path) -> None:
    header = "  sl  local_address rem_address   st\n"
    (tmp_path / "tcp").write_text(header + "   0: 0100007F:2B68 00000000:0000 0A\n"
                                  "   1: 00000000:0AD2 00000000:0000 0A\n"
                                  "   2: 0100007F:2B68 0100007F:D431 01\n")  # established
    # ::, and 2001:db8::1 as the kernel prints it (four little-endian 32-bit words)
    (tmp_path / "tcp6").write_text(header + "   0: 00000000000000000000000000000000:20FB "
                                   "00000000000000000000000000000000:0000 0A\n"
                                   "   1: B80D0120000000000000000001000000:0068 "
                                   "00000000000000000000000000000000:0000 0A\n")
    assert network.listening_sockets(tmp_path) == [
        network.Socket("127.0.0.1", 11112), network.Socket("0.0.0.0", 2770),
        network.Socket("::", 8443), network.Socket("2001:db8::1", 104)]


def test_default_gateway_from_the_routing_table(tmp_path: Path) -> None:
    route = tmp_path / "route"
    route.write_text("Iface\tDestination\tGateway\tFlags\tRefCnt\n"
                     "eth0\t0000A8C0\t00000000\t0001\t0\n"
                     "eth0\t00000000\t0101A8C0\t0003\t0\n")
    assert natpmp.default_gateway(route) == "192.168.1.1"
    assert natpmp.default_gateway(tmp_path / "none") is None


def test_settings_that_open_the_server(served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    vault = served.vault.open()
    try:
        settings = vault.settings
        monkeypatch.setattr(vault, "settings", settings.model_copy(update={
            "web": settings.web.model_copy(update={"remote_access": "internet"}),
            "dicom": settings.dicom.model_copy(update={"tls_from_anywhere": True}),
            "server": settings.server.model_copy(update={"bind": "8.8.8.8"})}))
        result = run(CheckContext(vault, dt.datetime.now(dt.UTC), probe=False), ("network",))
    finally:
        vault.close()
    found = {f.id: f for f in result.findings}
    assert found["network.remote-access-internet"].severity is Severity.WARNING
    assert "VPN" in found["network.remote-access-internet"].fix.en
    assert found["network.tls-from-anywhere"].severity is Severity.WARNING
    public = found["network.public-listener"]  # a public bind in the settings
    assert public.severity is Severity.CRITICAL
    assert public.data["listeners"][0]["bound"] == "8.8.8.8"
    assert "upnp" not in " ".join(found)  # probe=False: the gateway is not asked


def _netns_missing() -> str | None:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "unshare or ip (iproute2) not installed"
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True, text=True,
                           check=False)
    if probe.returncode != 0:
        return f"no network namespaces here: {probe.stderr.strip()[:120]}"
    return None


# Inside the namespace: a public address on this "machine" (it only exists there: nothing
# is ever sent to it), the server bound to every interface, and a host outside the
# trusted networks connecting to its DICOM port. The check runs there too (it reads that
# namespace's sockets and interfaces) and prints its finding ids and data.
PUBLIC_HERE = "1.2.3.4"
OUTSIDE_HOST = textwrap.dedent(f"""
    import datetime as dt, json, socket, subprocess, sys
    sys.path.insert(0, {str(REPO)!r})
    from pathlib import Path
    from pacsvault.check import CheckContext, run
    from tests.helpers import VaultDir, start_server, wait_events
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    for address in ("{PUBLIC}", "{PUBLIC_HERE}"):
        subprocess.run(["ip", "addr", "add", address + "/32", "dev", "lo"], check=True)
    root = Path(sys.argv[1])
    vault = VaultDir(root, root / "keys" / "master.key", "", "", "admin")
    server = start_server(vault, args=("--bind", "0.0.0.0"), timeout=90)
    try:
        with socket.socket() as outside:  # a host outside the trusted networks
            outside.bind(("{PUBLIC}", 0))
            outside.settimeout(5)
            outside.connect(("127.0.0.1", server.port))
            try:
                outside.recv(1)  # the server closes at once: refused before any DICOM byte
            except OSError:
                pass
        assert wait_events(vault, "exposure", lambda e: e["address"] == "{PUBLIC}", timeout=60)
        opened = vault.open()
        try:
            result = run(CheckContext(opened, dt.datetime.now(dt.UTC), probe=False),
                         ("network",))
        finally:
            opened.close()
        print(json.dumps({{f.id: [f.severity.value, f.data] for f in result.findings}}))
    finally:
        server.stop()
""")


@pytest.mark.slow
def test_untrusted_host_and_public_listener_in_a_network_namespace(tmp_path: Path) -> None:
    require(_netns_missing())  # CI installs iproute2 and runs as root: it must run there
    vault = make_vault(tmp_path / "v")
    inside = subprocess.run(["unshare", "-n", sys.executable, "-c", OUTSIDE_HOST,
                             str(vault.root)], check=False, timeout=240, cwd=REPO,
                            capture_output=True, text=True)
    assert inside.returncode == 0, inside.stderr[-3000:]
    seen = json.loads(inside.stdout.strip().splitlines()[-1])
    severity, data = seen["network.public-listener"]
    assert severity == "critical"
    assert {(e["bound"], e["public_address"]) for e in data["listeners"]} == {
        ("0.0.0.0", PUBLIC_HERE)}
    assert {e["listener"] for e in data["listeners"]} == {"dicom", "dicom_tls", "https"}
    assert seen["network.exposure-events"][0] == "critical"
    # and from the trail alone, outside the namespace, within and after the 30 days
    opened = vault.open()
    try:
        result = run(CheckContext(opened, dt.datetime.now(dt.UTC), probe=False), ("network",))
        later = run(CheckContext(opened, dt.datetime.now(dt.UTC) + dt.timedelta(days=31),
                                 probe=False), ("network",))
    finally:
        opened.close()
    exposure = next(f for f in result.findings if f.id == "network.exposure-events")
    assert exposure.severity is Severity.CRITICAL and result.exit_code == 2
    assert exposure.data["addresses"] == [PUBLIC] and exposure.data["ports"] == ["plain"]
    assert PUBLIC in exposure.evidence.en and PUBLIC in exposure.evidence.fr
    assert "network.exposure-events" not in later.ids()  # older than 30 days
    assert "network.public-listener" not in result.ids()  # no server runs any more


def test_gateway_targets_from_the_environment(served: Served,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    vault = served.vault.open()
    try:
        ctx = CheckContext(vault, dt.datetime.now(dt.UTC))
        monkeypatch.setenv(network.GATEWAY_ENV, "off")
        assert network.gateway_targets(ctx) == (None, None)
        monkeypatch.setenv(network.GATEWAY_ENV, "ssdp=127.0.0.1:1901,natpmp=127.0.0.1:5350")
        assert network.gateway_targets(ctx) == (("127.0.0.1", 1901), ("127.0.0.1", 5350))
    finally:
        vault.close()
