"""Issue 19: ``[server] bind = "private"`` (the default) listens on this machine's loopback
and private addresses only, one socket each, never on a public one.

The listening addresses are read from the kernel's socket table (psutil reads
/proc/net/tcp{,6}); the only connections made are to loopback (127.0.0.1, ::1), as the
workplace allows no traffic to any other address.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from pacsvault.cli.exposure import addresses_notice
from pacsvault.config import ServerSettings, render
from pacsvault.config.exposure import Exposure, safe_start, widened
from pacsvault.service.bind import addresses, private_addresses
from tests.helpers import Server, VaultDir, make_vault, start_server

V4, V6 = socket.AF_INET, socket.AF_INET6


def _if(*entries: tuple[int, str]) -> list[SimpleNamespace]:
    return [SimpleNamespace(family=family, address=address) for family, address in entries]


def test_resolution_from_interfaces() -> None:
    interfaces = {
        "lo": _if((V4, "127.0.0.1"), (V6, "::1"), (17, "00:00:00:00:00:00")),
        "eth0": _if((V4, "192.168.1.20"), (V6, "fe80::1%eth0"), (V6, "2001:db8::5"),
                    (V6, "fd12:3456::20")),
        "wan": _if((V4, "203.0.113.7"), (V4, "100.64.0.9"), (V6, "2a01:4f8::1")),
        "vpn": _if((V4, "10.8.0.1"), (V4, "172.20.0.1"), (V4, "172.32.0.1")),
        "dhcp-less": _if((V4, "169.254.10.10")),
    }
    # loopback first, then RFC 1918 and unique local; public, CGNAT, documentation,
    # IPv6 link-local left out; IPv4 link-local not needed when there is a private one
    assert private_addresses(interfaces) == [
        "127.0.0.1", "::1", "10.8.0.1", "172.20.0.1", "192.168.1.20", "fd12:3456::20"]
    # link-local only as the fallback: a machine that got no DHCP answer
    alone = {"lo": _if((V4, "127.0.0.1")), "eth0": _if((V4, "169.254.10.10"),
                                                       (V4, "198.51.100.4"))}
    assert private_addresses(alone) == ["127.0.0.1", "169.254.10.10"]
    assert private_addresses({}) == ["127.0.0.1"]
    assert addresses("private", interfaces) == private_addresses(interfaces)
    assert addresses("0.0.0.0") == ["0.0.0.0"]
    assert addresses("192.168.1.20") == ["192.168.1.20"]


def test_default_and_validation() -> None:
    assert ServerSettings(ae_title="PACSVAULT").bind == "private"
    assert ServerSettings(ae_title="A", bind=" Private ").bind == "private"
    assert ServerSettings(ae_title="A", bind="0.0.0.0").bind == "0.0.0.0"
    # an older settings file saying "localhost" still loads (the loopback address)
    assert ServerSettings(ae_title="A", bind="localhost").bind == "127.0.0.1"
    with pytest.raises(ValueError, match="IP address"):
        ServerSettings(ae_title="A", bind="pacs.example.org")
    with pytest.raises(ValueError, match="private"):
        ServerSettings(ae_title="A", bind="privat")
    assert 'bind = "private"' in render("PACSVAULT", None)


def test_keywords_in_any_case_on_the_command_line_too(capsys: pytest.CaptureFixture[str]
                                                     ) -> None:
    """``serve --bind Private`` is the keyword, as in the settings file (one rule,
    service/bind.normalize): before, the command line took it for an address."""
    from pacsvault.cli.main import build_parser

    def bind(value: str) -> str:
        return str(build_parser().parse_args(["serve", "--bind", value]).bind)

    for word in ("Private", "PRIVATE", " private "):
        assert bind(word) == "private"
        assert ServerSettings(ae_title="A", bind=word).bind == "private"
    for word in ("LocalHost", "LOCALHOST"):
        assert bind(word) == "127.0.0.1"
        assert ServerSettings(ae_title="A", bind=word).bind == "127.0.0.1"
    assert bind("0.0.0.0") == "0.0.0.0"
    assert bind("fd12:3456::20") == "fd12:3456::20"
    assert Exposure("lan", False, bind("Private"), ("192.168.0.0/16",)).public_bind() is False
    with pytest.raises(SystemExit) as exited:
        bind("pacs.example.org")
    assert exited.value.code == 2
    assert 'bind must be "private" or an IP address' in capsys.readouterr().err


def test_guard_private_is_not_widening() -> None:
    lan = ("127.0.0.0/8", "192.168.0.0/16")
    legacy = Exposure("lan", False, "0.0.0.0", lan)
    private = Exposure("lan", False, "private", lan)
    assert not private.public_bind() and private.active() == []
    assert widened(legacy, private) == [] and widened(private, legacy) == []
    assert safe_start(private) == private
    assert widened(private, Exposure("lan", False, "203.0.113.7", lan)) == [
        "bind = 203.0.113.7"]
    notice = addresses_notice("private")
    assert notice is not None and "127.0.0.1" in notice and "(private)" in notice


def _listening(port: int) -> set[str]:
    return {c.laddr.ip for c in psutil.net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port}


def _ipv6_loopback() -> bool:
    return socket.has_ipv6 and "::1" in private_addresses()


def _check(server: Server) -> None:
    expected = set(private_addresses())
    for name in ("dicom_port", "dicom_tls_port", "https_port"):
        port = server.ports[name]
        assert _listening(port) == expected, name  # and so never a public or wildcard one
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
        if _ipv6_loopback():
            with socket.create_connection(("::1", port), timeout=5):
                pass
    # serve.json records them, and status shows them (its text and JSON)
    status = server.vault.cli("status", check=False)
    assert status.returncode == 0, status.stderr
    assert "Listening on " + ", ".join(private_addresses()) + " (private)" in status.stdout
    report = json.loads(server.vault.cli("status", "--json", check=False).stdout)
    assert report["server"]["addresses"] == private_addresses()
    assert "listening on " + ", ".join(private_addresses()) + " (private)" in server.log()


@pytest.fixture(scope="module")
def vault(tmp_path_factory: pytest.TempPathFactory) -> VaultDir:
    return make_vault(tmp_path_factory.mktemp("bind") / "vault")


@pytest.fixture
def started(vault: VaultDir, request: pytest.FixtureRequest) -> Iterator[Server]:
    server = start_server(vault, args=("--bind", "private", *request.param),
                          timeout=90)
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.slow
@pytest.mark.parametrize("started", [()], indirect=True)
def test_serve_private_listens_on_private_addresses_only(started: Server) -> None:
    # every private address of this machine (here, if it has one besides loopback), and
    # none of its public ones
    _check(started)


@pytest.mark.slow
@pytest.mark.parametrize("started", [("--workers", "2")], indirect=True)
def test_serve_workers_private_listens_on_the_same(started: Server) -> None:
    _check(started)


def test_init_file_says_private(vault: VaultDir) -> None:
    text = Path(vault.data / "pacsvault.toml").read_text("utf-8")
    assert 'bind = "private"' in text


def test_health_names_the_addresses() -> None:
    from pacsvault.web.admin_health import _bind_text

    assert _bind_text({"bind": "private", "addresses": ["127.0.0.1", "192.168.1.20"]}) == (
        "private: 127.0.0.1, 192.168.1.20")
    assert _bind_text({"bind": "0.0.0.0", "addresses": ["0.0.0.0"]}) == "0.0.0.0"
