"""Issue 12, defect 5 (and the TLS part of defect 8): a node is registered only with a host
the association policy can match, and a refused registered node is told why.

* ``node add`` / ``node set`` (the real CLI) refuse a bad IPv4 address, a description
  with spaces, a URL, a network, and a public address for plain DICOM: exit 2, one line.
* The admin page (real HTTPS listener in-process, signed in as admin, CSRF) shows the
  same refusals next to the host field and registers nothing.
* A TLS-only node that connects to the plain port, or a node connecting from another
  address than its registered host (dcmtk ``echoscu`` against the real
  ``serve``) is recorded as a registered node refused, with the reason, not as an
  unknown node.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import pytest

from pacsvault.index.hosts import HostError, check_ae_title, check_host
from tests.helpers import VaultDir, echoscu, events, make_vault, start_server
from tests.web_helpers import FakeClock, LocalWeb, csrf_of, local_web

BAD_HOSTS = [
    ("192.168.1.300", "not a valid IP address"),
    ("999.1.1.1", "not a valid IP address"),
    ("ct scanner", "contains a space"),
    ("http://192.168.1.20", "is a URL"),
    ("http://ct.practice.lan/", "is a URL"),
    ("/24", "a network"),
    ("192.168.1.0/24", "a network"),
    ("8.8.8.8", "plain DICOM is for the practice network"),
    ("2001:4860:4860::8888", "plain DICOM is for the practice network"),
    ("0.0.0.0", "not the address of one device"),
    ("ct_scanner!", "neither an IP address nor a valid host name"),
    ("-ct.practice.lan", "neither an IP address nor a valid host name"),
]


@pytest.fixture(scope="module")
def vault(tmp_path_factory: pytest.TempPathFactory) -> VaultDir:
    return make_vault(tmp_path_factory.mktemp("nodes") / "v")


def test_rules_in_one_place() -> None:
    for host, words in BAD_HOSTS:
        with pytest.raises(HostError, match=re.escape(words)):
            check_host(host, tls=False)
    assert check_host(" 192.168.1.20 ", tls=False) == "192.168.1.20"
    assert check_host("::ffff:10.0.0.5", tls=False) == "10.0.0.5"
    assert check_host("fd00::5", tls=False) == "fd00::5"
    assert check_host("169.254.3.4", tls=False) == "169.254.3.4"
    assert check_host("us2.practice.lan", tls=False) == "us2.practice.lan"
    assert check_host("localhost", tls=False) == "localhost"
    assert check_host("8.8.8.8", tls=True) == "8.8.8.8"  # TLS: allowed from anywhere
    assert check_ae_title("  CT_1 ") == "CT_1"
    assert check_ae_title("CT SCANNER 1") == "CT SCANNER 1"  # spaces inside are valid
    for ae in ("", "    ", "A" * 17, "BAD\\AE", "TAB\tAE", "ÉCHO"):
        with pytest.raises(HostError):
            check_ae_title(ae)


@pytest.mark.parametrize(("host", "words"), BAD_HOSTS[:8])
def test_cli_refuses_a_bad_host_with_one_line(vault: VaultDir, host: str, words: str) -> None:
    proc = vault.cli("node", "add", "CT1", "--host", host, check=False)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("pacsvault: error: ") and words in lines[0], lines


def test_cli_refuses_a_bad_ae_title_and_checks_set(vault: VaultDir) -> None:
    proc = vault.cli("node", "add", "A" * 17, "--host", "192.168.1.20", check=False)
    assert proc.returncode == 2 and "1 to 16" in proc.stderr, proc.stderr
    # a public address is fine for a TLS node, and stays so until TLS is turned off
    vault.cli("node", "add", "REMOTE", "--host", "203.0.113.9", "--tls")
    proc = vault.cli("node", "set", "REMOTE", "--no-tls", check=False)
    assert proc.returncode == 2, proc.stderr
    assert "plain DICOM is for the practice network" in proc.stderr
    proc = vault.cli("node", "set", "REMOTE", "--host", "ct scanner", check=False)
    assert proc.returncode == 2 and "contains a space" in proc.stderr, proc.stderr
    listed = vault.cli("node", "list").stdout
    assert "203.0.113.9" in listed and "ct scanner" not in listed
    line = next(x for x in listed.splitlines() if x.startswith("REMOTE"))
    assert " yes " in line  # still TLS only


@pytest.fixture
def web(vault: VaultDir) -> Iterator[LocalWeb]:
    with local_web(vault, FakeClock()) as running:
        yield running


def test_admin_page_shows_the_refusal(web: LocalWeb, vault: VaultDir) -> None:
    with web.browser() as admin:
        web.sign_in(admin, vault.admin_name, vault.admin_password)
        page = admin.get("/admin/nodes")
        csrf = csrf_of(page.text)
        for host, words in [
            ("192.168.1.300", "not a valid IP address"),
            ("ct scanner", "has no spaces"),
            ("http://192.168.1.20", "without “http://”"),
            ("/24", "networks"),
            ("8.8.8.8", "public internet address"),
        ]:
            res = admin.post("/admin/nodes", data={"csrf": csrf, "ae_title": "PAGE_CT",
                                                   "host": host, "roles": ["store"]})
            assert res.status_code == 400, (host, res.status_code)
            error = re.search(r'<p id="host-error" class="field-error">([^<]*)</p>', res.text)
            assert error and words in error.group(1).replace("&#39;", "'"), (host, error)
        # the same public address with TLS is accepted
        res = admin.post("/admin/nodes", data={"csrf": csrf, "ae_title": "PAGE_CT",
                                               "host": "8.8.8.8", "tls": "1",
                                               "roles": ["store"]})
        assert res.status_code == 303, res.text[-2000:]
        # the edit page (node set) keeps the rule: TLS cannot be dropped for that address
        res = admin.post("/admin/nodes/edit", data={"csrf": csrf, "ae_title": "PAGE_CT",
                                                    "host": "8.8.8.8", "roles": ["store"]})
        assert res.status_code == 400, res.status_code
        assert "public internet address" in res.text
    v = vault.open()
    try:
        node = v.nodes.get("PAGE_CT")
        assert node is not None and node.tls
    finally:
        v.close()


def _rejections(vault: VaultDir, ae: str) -> list[dict[str, object]]:
    return [e for e in events(vault, "dicom.association.rejected") if e["ae"] == ae]


def _alerts(vault: VaultDir, ae: str) -> list[dict[str, object]]:
    return [e for e in events(vault) if str(e["action"]).startswith("alert.")
            and e.get("rule") == "unknown-node" and e["ae"] == ae]


@pytest.mark.slow
def test_registered_node_refused_is_told_why(vault: VaultDir) -> None:
    """A TLS-only node on the plain port, and a node whose registered host is not where it
    connects from, are refused as *registered* nodes with the reason, not as unknown."""
    vault.add_node("TLSONLY", "--tls")
    vault.add_node("MOVEDCT", host="10.0.0.99")
    server = start_server(vault, log_name="registered.log")
    try:
        assert echoscu(server.port, calling="TLSONLY").returncode != 0
        assert echoscu(server.port, calling="MOVEDCT").returncode != 0
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not (
                _alerts(vault, "TLSONLY") and _alerts(vault, "MOVEDCT")):
            time.sleep(0.3)
    finally:
        server.stop()
    tls_only = _rejections(vault, "TLSONLY")
    assert tls_only, "no rejection recorded"
    message = str(tls_only[-1]["message"])
    assert "registered for DICOM TLS only" in message and "plain port" in message, message
    assert tls_only[-1].get("registered") is True
    moved = _rejections(vault, "MOVEDCT")
    assert moved and "registered for host 10.0.0.99" in str(moved[-1]["message"]), moved
    for ae in ("TLSONLY", "MOVEDCT"):
        alerts = _alerts(vault, ae)
        assert alerts, f"no alert for {ae}"
        assert all("Registered DICOM node refused" in str(a["message"]) for a in alerts)
        assert not any("Unknown DICOM node" in str(a["message"]) for a in alerts)
