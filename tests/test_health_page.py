"""Issue 20, item 7: a Health page that shows rather than lists.

One real ``pacsvault serve`` for the module, with three registered devices: a modality
(``HPMOD``, store role, no port) that sends three images with dcmtk ``storescu``, a
workstation that is a running dcmtk ``storescp`` (``HPSCP``) and one whose port nobody
listens on (``HPGONE``). Checked through HTTPS as a browser would (every response's
security headers and CSP checked by ``tests.web_helpers.client``):

- the images-per-day chart is an SVG with one bar per day over 90 days, today's bar
  holding the three images, the legend naming the device; the storage and sign-in charts
  are there; the page passes the page checks (labels, ids, no inline code) in both
  languages;
- the active-problems banner names a problem in plain words with what to do, in English
  and French (a fresh vault has no backup target), and after a trail line is edited, the
  broken audit chain with its fix;
- each device's last contact; "test connection" (C-ECHO) succeeds against storescp and
  fails clearly against a closed port, both audited; refused without CSRF and to a
  non-administrator;
- security events are named, not coded.

And without a server: the forecast's linear fit, the trail read backwards in blocks.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from pydicom import dcmread

from pacsvault.check import record
from pacsvault.check.model import Finding, Localized, Severity, finding_to_json
from pacsvault.status import series
from tests import corpus
from tests.harness.peers import StoreSCP
from tests.helpers import Server, VaultDir, events, free_port, make_vault, start_server, storescu
from tests.test_web_pages import check_page
from tests.web_helpers import client, page_csrf, sign_in

pytestmark = pytest.mark.slow  # a real server

ADMIN, ADMIN_PW = "chef.sante", "phare-des-baleines-au-loin"
DOCTOR, DOCTOR_PW = "dr.sante", "marees-basses-de-septembre"
MOD, SCP, GONE = "HPMOD", "HPSCP", "HPGONE"
IMAGES = 3


@dataclass
class Env:
    vault: VaultDir
    server: Server
    scp: StoreSCP
    admin: httpx.Client


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("health-page")
    vault = make_vault(root / "v")
    scp = StoreSCP.start(SCP, root)
    server: Server | None = None
    try:
        v = vault.open()
        try:
            v.nodes.add(MOD, "127.0.0.1", roles=("store",))
            v.nodes.add(SCP, "127.0.0.1", scp.port, roles=("retrieve",))
            v.nodes.add(GONE, "127.0.0.1", free_port(), roles=("retrieve",))
            v.accounts.add_user(ADMIN, ["admin"], ADMIN_PW, by="test")
            v.accounts.add_user(DOCTOR, ["physician"], DOCTOR_PW, by="test")
        finally:
            v.close()
        server = start_server(vault)
        files = corpus.synthetic_ct_series(root / "ct", IMAGES, size=16)
        for path in files:  # no patient data worth the name
            ds = dcmread(path)
            ds.PatientName, ds.PatientID = "Health^Page", "HP0001"
            ds.save_as(path, enforce_file_format=True)
        done = storescu(server.port, files, calling=MOD)
        assert done.returncode == 0, done.stdout + done.stderr
        admin = client(server.https_port, vault.data / "tls" / "ca.crt")
        sign_in(admin, ADMIN, ADMIN_PW)
        yield Env(vault, server, scp, admin)
        admin.close()
    finally:
        if server is not None:
            server.stop()
        scp.stop()


def health(env: Env, lang: str = "en") -> str:
    answer = env.admin.get("/admin/health", headers={"accept-language": lang})
    assert answer.status_code == 200, answer.text[:500]
    return answer.text


def device_row(html: str, ae: str) -> str:
    found = re.search(rf'<tr class="device" data-ae="{ae}">(.*?)</tr>', html, re.DOTALL)
    assert found, html
    return found.group(1)


def test_chart_of_images_received_per_day_and_device(env: Env) -> None:
    html = health(env)
    chart = re.search(r'<svg id="chart-received".*?</svg>', html, re.DOTALL)
    assert chart, html
    bars = re.findall(r'<g class="bar" data-day="([0-9-]+)" data-total="(\d+)">',
                      chart.group(0))
    assert len(bars) == series.DAYS
    today = dt.datetime.now(dt.UTC).date()
    assert bars[-1] == (today.isoformat(), str(IMAGES)), bars[-3:]
    assert bars[0][0] == (today - dt.timedelta(days=series.DAYS - 1)).isoformat()
    assert sum(int(total) for _day, total in bars) == IMAGES
    assert f"{MOD}: {IMAGES}" in html  # the legend
    assert "style=" not in chart.group(0) and "<script" not in chart.group(0)
    for other in ("chart-storage", "chart-sign-ins"):
        assert f'<svg id="{other}"' in html
    signed = re.search(r'<svg id="chart-sign-ins".*?</svg>', html, re.DOTALL)
    assert signed and re.search(r'data-day="[0-9-]+" data-total="[1-9]', signed.group(0))
    for lang in ("en", "fr"):
        check_page(health(env, lang), f"/admin/health ({lang})")


def test_banner_says_what_is_wrong_and_what_to_do_in_both_languages(env: Env) -> None:
    english = health(env, "en")
    banner = re.search(r'<section id="problems".*?</section>', english, re.DOTALL)
    assert banner, english
    assert 'data-code="backup.none"' in banner.group(0)
    assert "No backup is configured: a disk failure loses every image." in banner.group(0)
    assert "What to do:" in banner.group(0) and "[backup] section" in banner.group(0)
    french = health(env, "fr")
    banner = re.search(r'<section id="problems".*?</section>', french, re.DOTALL)
    assert banner, french
    assert "Aucune sauvegarde n’est configurée" in banner.group(0)
    assert "Que faire :" in banner.group(0) and "section [backup]" in banner.group(0)



def test_banner_shows_the_security_checks_critical_findings(env: Env) -> None:
    """The check's last kept run (as the nightly job leaves it): its critical finding is
    a problem with its own fix in the reader's language; a run ten days old is stale."""
    finished = dt.datetime.now(dt.UTC) - dt.timedelta(days=10)
    finding = Finding("network.test-open", "network", Severity.CRITICAL,
                      Localized("Port 104 answers from the internet",
                                "Le port 104 répond depuis internet"), "ANSSI",
                      Localized("seen", "vu"),
                      Localized("Close the router's port forwarding",
                                "Fermez la redirection de port du routeur"))
    kept = {"format": record.STATE_FORMAT, "trigger": "test",
            "started": (finished - dt.timedelta(seconds=5)).isoformat(),
            "finished": finished.isoformat(), "sections": ["network"], "exit_code": 2,
            "findings": [finding_to_json(finding)], "errors": [], "new_critical": []}
    path = env.vault.data / record.STATE_NAME
    path.write_text(json.dumps(kept), "utf-8")
    try:
        for lang, title, fix in (
                ("en", "Port 104 answers from the internet", "Close the router"),
                ("fr", "Le port 104 répond depuis internet", "Fermez la redirection")):
            banner = re.search(r'<section id="problems".*?</section>', health(env, lang),
                               re.DOTALL)
            assert banner and 'data-code="check.critical"' in banner.group(0)
            assert title in banner.group(0) and fix in banner.group(0)
            assert 'data-code="check.stale"' in banner.group(0)
    finally:
        path.unlink()


def test_last_seen_and_connection_test(env: Env) -> None:
    html = health(env)
    seen = re.search(r'<td class="last-seen">([^<]*)</td>', device_row(html, MOD))
    assert seen and re.search(r"\d{2}", seen.group(1)), device_row(html, MOD)  # a time
    assert "not in the last 90 days" in device_row(html, SCP)
    assert "Test connection" not in device_row(html, MOD)  # no port: nothing to call
    csrf = page_csrf(env.admin)
    refused = env.admin.post("/admin/health/echo", data={"node": SCP})
    assert refused.status_code == 403
    for node in (SCP, GONE):
        answer = env.admin.post("/admin/health/echo", data={"csrf": csrf, "node": node})
        assert answer.status_code == 303, answer.text[:500]
    html = health(env)
    assert 'data-ok="yes"' in device_row(html, SCP) and "answered at" in device_row(html, SCP)
    gone = device_row(html, GONE)
    assert 'data-ok="no"' in gone and "is the device on, and its address and port right?" in gone
    french = health(env, "fr")
    assert "l’appareil est-il allumé" in device_row(french, GONE)
    echoes = {e["node"]: e for e in events(env.vault, "dicom.echo")}
    assert echoes[SCP]["result"] == "ok" and echoes[SCP]["user"] == ADMIN
    assert echoes[GONE]["result"] == "unreachable"


def test_non_admin_refused(env: Env) -> None:
    with client(env.server.https_port, env.vault.data / "tls" / "ca.crt") as doctor:
        sign_in(doctor, DOCTOR, DOCTOR_PW)
        assert doctor.get("/admin/health").status_code == 403
        answer = doctor.post("/admin/health/echo",
                             data={"csrf": page_csrf(doctor), "node": SCP})
        assert answer.status_code == 403
    assert all(e["user"] != DOCTOR for e in events(env.vault, "dicom.echo"))


def test_events_are_named_and_a_broken_chain_is_a_problem(env: Env) -> None:
    """Last: it breaks the module's trail on purpose."""
    trail = env.vault.data / "audit" / "trail.jsonl"
    lines = trail.read_bytes().split(b"\n")
    lines[2] = lines[2].replace(b'"address":"', b'"address":"x', 1)
    assert lines[2] != trail.read_bytes().split(b"\n")[2]
    trail.write_bytes(b"\n".join(lines))
    html = health(env)
    banner = re.search(r'<section id="problems".*?</section>', html, re.DOTALL)
    assert banner and 'data-code="audit.broken"' in banner.group(0), html
    assert "Run pacsvault audit verify" in banner.group(0)
    french = health(env, "fr")
    assert "Le journal d’audit ne se vérifie pas" in french
    assert "Lancez pacsvault audit verify" in french
    events_table = re.search(r'<table id="security-events".*?</table>', html, re.DOTALL)
    if events_table:  # raw codes only as a tooltip, the cell reads as a name
        for code, name in re.findall(r'<td title="([a-z._]+)">([^<]*)</td>',
                                     events_table.group(0)):
            assert name != code or "." not in code, (code, name)


def test_forecast_and_backward_trail_reader(tmp_path: Path) -> None:
    days = tuple(dt.date(2026, 1, 1) + dt.timedelta(days=i) for i in range(90))
    held = tuple(1_000_000 + 10_000 * i for i in range(90))  # 10 kB a day
    s = series.Series(days=days, received={}, held=held, sign_ins=(0,) * 90,
                      failed_sign_ins=(0,) * 90)
    assert s.growth_per_day() == pytest.approx(10_000)
    assert s.full_on(free=1_500_000, reserve=500_000) == days[-1] + dt.timedelta(days=100)
    flat = series.Series(days=days, received={}, held=(5,) * 90, sign_ins=(0,) * 90,
                         failed_sign_ins=(0,) * 90)
    assert flat.full_on(free=10, reserve=1) is None
    trail = tmp_path / "trail.jsonl"
    start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    trail.write_text("".join(
        json.dumps({"time": (start + dt.timedelta(hours=i)).isoformat(),
                    "action": "auth.login", "pad": "x" * 50}) + "\n" for i in range(500)))
    since = (start + dt.timedelta(hours=400)).isoformat()
    old_block = series.BLOCK
    series.BLOCK = 1000  # many blocks, lines cut across them
    try:
        found, partial = series.trail_backwards(trail, since)
        assert [b["time"] for b in found] == [
            (start + dt.timedelta(hours=i)).isoformat() for i in range(499, 399, -1)]
        assert not partial
        _cut, partial = series.trail_backwards(trail, "", budget=5000)
        assert partial
    finally:
        series.BLOCK = old_block
