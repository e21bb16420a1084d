"""The PROXY protocol behind a load balancer (issue 16, part 3).

A real server with ``[dicom] proxy_protocol_from = ["127.0.0.1"]``: 127.0.0.1 is the
balancer. ``Relay`` plays the balancer's part (HAProxy ``send-proxy``/``send-proxy-v2``):
it accepts a client, connects to the server from 127.0.0.1 and sends a v1 or v2 header
naming a practice address, then copies bytes both ways. The header's address, not the
balancer's, decides: a node's registered host, the trusted networks, the sign-in throttle
and the audit records. The same header from a source that is not listed is garbage; a
listed balancer without a header is refused. Direct connections that must not be taken
for the balancer's leave from 127.0.0.2.

The parser's own bounds and refusals are tested first, without a server.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydicom.data import get_testdata_file

from pacsvault.proxyproto import (
    V2_SIGNATURE,
    ProxyHeaderError,
    ProxyHeaderMissing,
    parse,
    read_header,
    wanted,
)
from tests.harness.served import Served, served_vault
from tests.helpers import (
    echoscu,
    events,
    make_vault,
    start_server,
    storescu,
    wait_events,
    wait_until,
)
from tests.web_helpers import client, post_login

NODE = "PROXIED"  # registered at the client's address, which only the header names
NODE_HOST = "10.20.30.40"
BALANCER_NODE = "ATBALANCER"  # registered at the balancer's address: must never match
OTHER_CLIENT = "10.20.30.41"
OUTSIDE = "203.0.113.9"  # documentation range: outside every trusted network
REFUSED = "dicom.connection.refused"


def v1(client_ip: str, client_port: int = 40000, dest_port: int = 11112) -> bytes:
    kind = "TCP6" if ":" in client_ip else "TCP4"
    dest = "::1" if kind == "TCP6" else "127.0.0.1"
    return f"PROXY {kind} {client_ip} {dest} {client_port} {dest_port}\r\n".encode()


def v2(client_ip: str, client_port: int = 40000, dest_port: int = 11112,
       tlvs: bytes = b"") -> bytes:
    ip = ipaddress.ip_address(client_ip)
    if ip.version == 4:
        family, dest = 0x11, ipaddress.ip_address("127.0.0.1").packed
    else:
        family, dest = 0x21, ipaddress.ip_address("::1").packed
    block = ip.packed + dest + struct.pack(">HH", client_port, dest_port) + tlvs
    return V2_SIGNATURE + bytes([0x21, family]) + struct.pack(">H", len(block)) + block


V2_LOCAL = V2_SIGNATURE + bytes([0x20, 0x00]) + struct.pack(">H", 0)


# --- the parser ---------------------------------------------------------------------------


@pytest.mark.parametrize("header", [v1("10.1.2.3"), v2("10.1.2.3"),
                                    v2("10.1.2.3", tlvs=b"\x04\x00\x03abc")])
def test_header_names_the_client_and_its_length(header: bytes) -> None:
    found = parse(header + b"\x01\x00rest of the PDU")
    assert found is not None
    assert found.source == ("10.1.2.3", 40000) and found.length == len(header)
    assert found.destination == ("127.0.0.1", 11112)


def test_ipv6_local_and_unknown() -> None:
    for header in (v1("2001:db8::7"), v2("2001:db8::7")):
        found = parse(header)
        assert found is not None and found.source == ("2001:db8::7", 40000)
    for header in (V2_LOCAL, b"PROXY UNKNOWN\r\n", b"PROXY UNKNOWN ffff::1 ::1 1 2\r\n"):
        found = parse(header)
        assert found is not None and found.source is None and found.length == len(header)


def test_incomplete_headers_ask_for_more_and_never_past_the_end() -> None:
    for header in (v1("10.1.2.3"), v2("10.1.2.3", tlvs=b"\x04\x00\x01x"), V2_LOCAL,
                   b"PROXY UNKNOWN\r\n"):
        data = b""
        while True:
            assert parse(data) is None, data
            data += header[len(data):len(data) + wanted(data)]
            assert len(data) <= len(header)  # a byte past the header would be the PDU's
            if len(data) == len(header):
                break
        assert parse(data) is not None


@pytest.mark.parametrize("data", [
    b"\x01\x00\x00\x00\x00\xcc",  # an A-ASSOCIATE-RQ: no header at all
    b"\x16\x03\x01\x02\x00",  # a TLS ClientHello
    b"GET / HTTP/1.1\r\n",
    b"PROXY TCP4 10.1.2.3 127.0.0.1 40000\r\n",  # a field missing
    b"PROXY TCP4 10.1.2.3 127.0.0.1 40000 011112\r\n",  # leading zero
    b"PROXY TCP4 10.1.2.3 127.0.0.1 40000 70000\r\n",  # port out of range
    b"PROXY TCP4 2001:db8::1 127.0.0.1 1 2\r\n",  # family mismatch
    b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n",  # a zone
    b"PROXY TCP4 010.1.2.3 127.0.0.1 1 2\r\n",  # ambiguous octet
    b"PROXY TCP4 10.1.2.3 127.0.0.1 1 2\n",  # LF only
    b"PROXY UDP4 10.1.2.3 127.0.0.1 1 2\r\n",
    b"PROXY TCP4 " + b"1" * 120,  # never terminated within 107 bytes
    "PROXY TCP4 10.1.2.3 127.0.0.1 1 2\u00e9\r\n".encode(),
    V2_SIGNATURE[:11] + b"X" + bytes([0x21, 0x11, 0, 12]),  # signature off by one byte
    V2_SIGNATURE + bytes([0x11, 0x11, 0, 12]) + b"\0" * 12,  # version 1 in a v2 header
    V2_SIGNATURE + bytes([0x22, 0x11, 0, 12]) + b"\0" * 12,  # command 2
    V2_SIGNATURE + bytes([0x21, 0x12, 0, 12]) + b"\0" * 12,  # UDP
    V2_SIGNATURE + bytes([0x21, 0x31, 0, 216]) + b"\0" * 216,  # UNIX socket
    V2_SIGNATURE + bytes([0x21, 0x11, 0, 8]) + b"\0" * 8,  # address block too short
    V2_SIGNATURE + bytes([0x21, 0x11]) + struct.pack(">H", 217),  # over 232 bytes
    V2_SIGNATURE + bytes([0x21, 0x11]) + struct.pack(">H", 0xFFFF),
])
def test_malformed_headers_are_refused_early(data: bytes) -> None:
    with pytest.raises(ProxyHeaderError):
        parse(data)


def test_largest_v2_header_is_accepted() -> None:
    header = v2("10.1.2.3", tlvs=b"\x04" + struct.pack(">H", 201) + b"x" * 201)
    assert len(header) == 232
    found = parse(header)
    assert found is not None and found.source == ("10.1.2.3", 40000)


def test_read_header_from_a_socket_leaves_what_follows() -> None:
    a, b = socket.socketpair()
    with a, b:
        header = v2("10.1.2.3")

        def send() -> None:
            for i in range(0, len(header), 5):  # in pieces, as a slow balancer would
                b.sendall(header[i:i + 5])
                time.sleep(0.01)
            b.sendall(b"\x01PDU")

        sender = threading.Thread(target=send)
        sender.start()
        found = read_header(a, 5.0)
        sender.join()
        assert found.source == ("10.1.2.3", 40000)
        a.settimeout(5)
        assert a.recv(100) == b"\x01PDU"


def test_read_header_deadline_and_close() -> None:
    a, b = socket.socketpair()
    with a, b:
        b.sendall(b"PROXY TCP4 ")
        started = time.monotonic()
        with pytest.raises(ProxyHeaderError, match="deadline"):
            read_header(a, 0.3)
        assert time.monotonic() - started < 3
    a, b = socket.socketpair()
    with a:
        b.close()
        with pytest.raises(ProxyHeaderMissing):
            read_header(a, 1.0)


# --- a balancer in front of the real server ---------------------------------------------


class Relay:
    """A minimal TCP balancer on 127.0.0.1: each client's connection goes to ``target``
    from ``source``, preceded by ``header`` (None: no header), bytes copied both ways."""

    def __init__(self, target: int, header: bytes | None, source: str = "127.0.0.1") -> None:
        self.target, self.header, self.source = target, header, source
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = int(self.listener.getsockname()[1])
        self._stop = threading.Event()
        self._sockets: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                down, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            up = socket.create_connection(("127.0.0.1", self.target), timeout=10,
                                          source_address=(self.source, 0))
            up.settimeout(None)
            down.settimeout(None)
            self._sockets += [down, up]
            if self.header is not None:
                up.sendall(self.header)
            for a, b in ((down, up), (up, down)):
                threading.Thread(target=_pump, args=(a, b), daemon=True).start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.listener.close()
        for sock in self._sockets:
            sock.close()

    def __enter__(self) -> Relay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while chunk := src.recv(65536):
            dst.sendall(chunk)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


@pytest.fixture(scope="module")
def balanced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    settings = {"dicom": {"proxy_protocol_from": '["127.0.0.1"]', "connect_timeout": "2.0",
                          "refusal_report_seconds": "1.0"}}
    with served_vault(tmp_path_factory.mktemp("proxied") / "vault",
                      nodes=[(NODE, (), NODE_HOST), (BALANCER_NODE, (), "127.0.0.1")],
                      settings=settings) as served:
        yield served


def _refusals(served: Served, reason: str) -> list[dict[str, object]]:
    return [e for e in events(served.vault, REFUSED) if e.get("reason") == reason]


@pytest.mark.slow
@pytest.mark.parametrize("make", [v1, v2], ids=["v1", "v2"])
def test_the_headers_address_is_the_nodes_host(balanced: Served, make: object) -> None:
    server = balanced.server
    assert callable(make)
    with Relay(server.port, make(NODE_HOST)) as relay:
        done = echoscu(relay.port, calling=NODE)
        assert done.returncode == 0, done.stdout + done.stderr
        ct = Path(str(get_testdata_file("CT_small.dcm")))
        sent = storescu(relay.port, [ct], calling=NODE)
        assert sent.returncode == 0, sent.stdout + sent.stderr
    accepted = wait_events(balanced.vault, "dicom.association.accepted",
                           lambda e: e["ae"] == NODE, count=2)
    assert accepted and all(e["address"] == NODE_HOST for e in accepted)
    # Another client behind the same balancer is not that node, and the balancer's own
    # address, registered for another node, is not what the policy looks at.
    with Relay(server.port, make(OTHER_CLIENT)) as relay:
        assert echoscu(relay.port, calling=NODE).returncode != 0
        assert echoscu(relay.port, calling=BALANCER_NODE).returncode != 0
    rejected = wait_events(balanced.vault, "dicom.association.rejected",
                           lambda e: e["address"] == OTHER_CLIENT, count=2)
    assert len(rejected) >= 2
    assert not [e for e in events(balanced.vault, "dicom.association.accepted")
                if e["address"] == "127.0.0.1"]


@pytest.mark.slow
def test_a_client_outside_the_trusted_networks_is_refused(balanced: Served) -> None:
    with Relay(balanced.server.port, v2(OUTSIDE)) as relay:
        assert echoscu(relay.port, calling=NODE).returncode != 0
    assert wait_events(balanced.vault, "exposure", lambda e: e["address"] == OUTSIDE)


@pytest.mark.slow
def test_the_header_from_a_source_not_listed_is_garbage(balanced: Served) -> None:
    server = balanced.server
    for make in (v1, v2):
        with Relay(server.port, make(NODE_HOST), source="127.0.0.2") as relay:
            assert echoscu(relay.port, calling=NODE).returncode != 0
    assert wait_until(lambda: [e for e in _refusals(balanced, "malformed-pdu")
                               if e["address"] == "127.0.0.2"], 15)
    accepted = events(balanced.vault, "dicom.association.accepted")
    assert not [e for e in accepted if e["address"] == "127.0.0.2"]


@pytest.mark.slow
def test_the_balancer_without_a_header_is_refused(balanced: Served) -> None:
    server = balanced.server
    # echoscu from 127.0.0.1 directly: its A-ASSOCIATE-RQ where the header should be.
    assert echoscu(server.port, calling=BALANCER_NODE).returncode != 0
    assert wait_until(lambda: [e for e in _refusals(balanced, "proxy-header")
                               if e["address"] == "127.0.0.1"], 15)
    # TLS port: the ClientHello where the header should be; nothing to handshake with.
    with socket.create_connection(("127.0.0.1", server.tls_port), timeout=10) as raw:
        raw.sendall(b"\x16\x03\x01\x00\x05hello")
        raw.settimeout(10)
        try:
            answer = raw.recv(100)
        except ConnectionResetError:  # closed with our bytes unread
            answer = b""
        assert answer == b""


@pytest.mark.slow
def test_tls_after_the_header(balanced: Served) -> None:
    """The header comes before the TLS handshake; TLS then runs end to end."""
    server = balanced.server
    with Relay(server.tls_port, v2(NODE_HOST, dest_port=2762)) as relay:
        ctx = ssl.create_default_context(cafile=str(balanced.ca))
        ctx.check_hostname = False
        with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as raw, \
                ctx.wrap_socket(raw) as tls:
            assert tls.version() in ("TLSv1.2", "TLSv1.3")


@pytest.mark.slow
def test_sign_in_throttling_counts_the_headers_address(balanced: Served) -> None:
    server = balanced.server
    sprayer, bystander = "10.9.8.7", "10.9.8.8"
    throttled = False
    with Relay(server.https_port, v2(sprayer, dest_port=8443)) as relay, \
            client(relay.port, balanced.ca) as browser:
        for n in range(40):
            if post_login(browser, f"name{n}", "Printemps2024").status_code == 429:
                throttled = True
                break
    assert throttled, "no throttling for the sprayer's address"
    # Another client behind the same balancer is not slowed down.
    with Relay(server.https_port, v1(bystander, dest_port=8443)) as relay, \
            client(relay.port, balanced.ca) as browser:
        assert post_login(browser, "someone", "Printemps2024").status_code == 401
    failed = wait_events(balanced.vault, "auth.login.failed", count=2)
    addresses = {e["address"] for e in failed}
    assert sprayer in addresses and bystander in addresses
    assert "127.0.0.1" not in addresses
    # Without a header, the balancer gets nothing over HTTPS either.
    with client(server.https_port, balanced.ca) as browser, \
            pytest.raises((httpx.TransportError, ssl.SSLError)):
        browser.get("/login")
    assert wait_until(lambda: [e for e in events(balanced.vault, "web.connection.refused")
                               if e.get("reason") == "proxy-header"], 15)


@pytest.mark.slow
def test_a_balancers_health_check_records_nothing(balanced: Served) -> None:
    """HAProxy sends a LOCAL header with its checks, then closes: on the TLS port too, no
    failed handshake and no refusal is recorded for it."""
    server = balanced.server
    for port in (server.port, server.tls_port):
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                raw.sendall(V2_LOCAL)
    time.sleep(2.0)  # past refusal_report_seconds
    assert not [e for e in events(balanced.vault, "dicom.tls.handshake_failed")
                if e["address"] == "127.0.0.1"]
    assert not [e for e in _refusals(balanced, "deadline") if e["address"] == "127.0.0.1"]


# --- a real HAProxy ---------------------------------------------------------------------

HAPROXY = "/usr/sbin/haproxy"
HAPROXY_SOURCE = "127.0.0.5"  # the balancer's address as the server sees it
CLIENT_NODE = "BEHINDHAPROXY"  # registered at the client's address, 127.0.0.1
HAPROXY_NODE = "ATHAPROXY"  # registered at the balancer's address: must never match

HAPROXY_CFG = """\
global
    maxconn 64
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend dicom
    bind 127.0.0.1:{front_dicom}
    default_backend dicom
frontend dicom_tls
    bind 127.0.0.1:{front_tls}
    default_backend dicom_tls
frontend https
    bind 127.0.0.1:{front_https}
    default_backend https
backend dicom
    source {source}
    server a 127.0.0.1:{dicom} send-proxy-v2 check inter 500ms
backend dicom_tls
    source {source}
    server a 127.0.0.1:{tls} send-proxy-v2 check inter 500ms
backend https
    source {source}
    server a 127.0.0.1:{https} send-proxy-v2 check inter 500ms
"""


def _free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def haproxied(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Served, dict[str, int]]]:
    if not Path(HAPROXY).exists():
        pytest.skip("haproxy is not installed (scripts/install.sh --test)")
    root = tmp_path_factory.mktemp("haproxy")
    settings = {"dicom": {"proxy_protocol_from": f'["{HAPROXY_SOURCE}"]',
                          "connect_timeout": "2.0", "refusal_report_seconds": "1.0"}}
    with served_vault(root / "vault", settings=settings,
                      nodes=[(CLIENT_NODE, (), "127.0.0.1"),
                             (HAPROXY_NODE, (), HAPROXY_SOURCE)]) as served:
        server = served.server
        front = {"dicom": _free_port(), "tls": _free_port(), "https": _free_port()}
        cfg = root / "haproxy.cfg"
        cfg.write_text(HAPROXY_CFG.format(
            front_dicom=front["dicom"], front_tls=front["tls"], front_https=front["https"],
            source=HAPROXY_SOURCE, dicom=server.port, tls=server.tls_port,
            https=server.https_port))
        log = open(root / "haproxy.log", "wb")  # noqa: SIM115 (closed below)
        proc = subprocess.Popen([HAPROXY, "-db", "-f", str(cfg)], stdout=log,
                                stderr=subprocess.STDOUT)
        try:
            assert wait_until(lambda: _listening(front["dicom"]), 10), \
                (root / "haproxy.log").read_text()
            time.sleep(1.5)  # a few health checks
            yield served, front
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
            log.close()


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


@pytest.mark.slow
def test_storescu_through_haproxy(haproxied: tuple[Served, dict[str, int]]) -> None:
    served, front = haproxied
    ct = Path(str(get_testdata_file("CT_small.dcm")))
    sent = storescu(front["dicom"], [ct], calling=CLIENT_NODE)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    accepted = wait_events(served.vault, "dicom.association.accepted",
                           lambda e: e["ae"] == CLIENT_NODE)
    assert accepted and accepted[0]["address"] == "127.0.0.1"
    # The balancer's own address is not what the node check sees.
    assert echoscu(front["dicom"], calling=HAPROXY_NODE).returncode != 0
    assert wait_events(served.vault, "dicom.association.rejected",
                       lambda e: e["ae"] == HAPROXY_NODE and e["address"] == "127.0.0.1")
    # HTTPS through it: the failed sign-in is recorded with the client's address.
    with client(front["https"], served.ca, local_address="127.0.0.9") as browser:
        assert post_login(browser, "nobody", "Printemps2024").status_code == 401
    failed = wait_events(served.vault, "auth.login.failed")
    assert [e["address"] for e in failed] == ["127.0.0.9"]
    # Its health checks (every 500 ms on each port, with a LOCAL header) left no trace.
    assert not events(served.vault, "dicom.tls.handshake_failed")
    assert not [e for e in events(served.vault)
                if str(e["action"]).endswith("connection.refused")]
    assert not [e for e in events(served.vault) if e["address"] == HAPROXY_SOURCE]


@pytest.mark.slow
def test_https_header_from_a_source_not_listed_is_not_read(balanced: Served) -> None:
    """Over HTTPS too: from 127.0.0.2 the header is just bytes that are not TLS."""
    server = balanced.server
    with socket.create_connection(("127.0.0.1", server.https_port), timeout=10,
                                  source_address=("127.0.0.2", 0)) as raw:
        raw.sendall(v2(NODE_HOST, dest_port=8443) + b"\x16\x03\x01\x00\x05hello")
        raw.settimeout(10)
        answer = raw.recv(4096)
    assert answer.startswith(b"HTTP/1.1 400 ")


@pytest.mark.slow
def test_behind_the_balancer_with_serve_workers(tmp_path: Path) -> None:
    """``serve --workers 2``: the header is read by whichever worker accepts (shared sockets)."""
    vault = make_vault(tmp_path / "vault")
    vault.set_toml("dicom", "proxy_protocol_from", '["127.0.0.1"]')
    vault.add_node(NODE, host=NODE_HOST)
    server = start_server(vault, args=("--workers", "2"), timeout=90)
    try:
        with Relay(server.port, v2(NODE_HOST)) as relay:
            for _ in range(4):
                done = echoscu(relay.port, calling=NODE)
                assert done.returncode == 0, done.stdout + done.stderr
        with Relay(server.https_port, v1(OTHER_CLIENT, dest_port=8443)) as relay, \
                client(relay.port, vault.data / "tls" / "ca.crt") as browser:
            assert post_login(browser, "nobody", "Printemps2024").status_code == 401
    finally:
        server.stop()
    accepted = wait_events(vault, "dicom.association.accepted", count=4)
    assert len(accepted) == 4 and {e["address"] for e in accepted} == {NODE_HOST}
    assert [e["address"] for e in events(vault, "auth.login.failed")] == [OTHER_CLIENT]
