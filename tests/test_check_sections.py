"""Issue 18, part 1: ``pacsvault check`` outside network/TLS (accounts, keys and disks,
backups, audit, software), the whole check of a fresh install with its server running,
its record in the trail, the nightly run, the alert, the page.

One vault for the module, made by the real ``init``, its key file on tmpfs (``/dev/shm``:
another filesystem than the data, as a key on a USB stick would be). Disks are judged
twice: on this machine as it is, and through a fake ``/sys`` tree and ``/proc`` texts
(``PACSVAULT_CHECK_OPTIONS``) that show the data on LVM over LUKS.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pacsvault.audit.alerts import AlertSettings, Detector
from pacsvault.audit.events import AuditEvent
from pacsvault.check import CheckContext, Severity, run
from pacsvault.check.disks import ENCRYPTED, MEMORY, PLAIN, BlockProbe
from pacsvault.check.record import STATE_NAME, load_kept, run_and_record, tick
from pacsvault.check.software import load_advisories
from pacsvault.config import BackupSettings, BackupTarget
from tests.helpers import VaultDir, events, first_run_secrets, pv, start_server
from tests.web_helpers import FakeClock, local_web

MINE = ("accounts", "keys", "backups", "audit", "software")
# A fresh vault, whatever the machine's disks: the first administrator has not enrolled a
# second factor nor changed the setup password, and no backup target exists.
FRESH = {"accounts.initial-password", "accounts.no-second-factor", "backups.none"}
# The whole check (all eight sections) on that fresh vault: ``init`` was given no alert
# channel (a standing finding); network, keys (the fake LUKS disks), audit and software
# have nothing to say; TLS nothing while its server runs (probed: TLS 1.2/1.3 only, a
# fresh certificate), only that it could not probe when none runs.
WHOLE_FRESH = FRESH | {"alerts.no-channel"}
NOT_RUNNING = {"tls.not-probed"}


def fake_sys(root: Path) -> Path:
    """``/sys`` of a machine whose root filesystem (254:0) is LVM (dm-1) over LUKS (dm-0),
    with a plain partition vdb1 and a zram device."""
    sys = root / "sys"
    blocks = sys / "devices" / "virtual" / "block"
    for name, uuid in (("dm-0", "CRYPT-LUKS2-0123456789abcdef-luks"), ("dm-1", "LVM-abc")):
        (blocks / name / "dm").mkdir(parents=True)
        (blocks / name / "dm" / "uuid").write_text(uuid + "\n")
        (blocks / name / "slaves").mkdir()
    (blocks / "dm-1" / "slaves" / "dm-0").symlink_to(blocks / "dm-0")
    disk = sys / "devices" / "pci0" / "block" / "vdb"
    (disk / "vdb1").mkdir(parents=True)
    (disk / "vdb1" / "partition").write_text("1\n")
    (disk / "slaves").mkdir()
    (blocks / "zram0").mkdir()
    (sys / "dev" / "block").mkdir(parents=True)
    (sys / "dev" / "block" / "254:0").symlink_to(blocks / "dm-1")
    (sys / "class" / "block").mkdir(parents=True)
    for name, target in (("dm-1", blocks / "dm-1"), ("vdb1", disk / "vdb1"),
                         ("zram0", blocks / "zram0")):
        (sys / "class" / "block" / name).symlink_to(target)
    return sys


MOUNTINFO = ("22 1 254:0 / / rw,relatime - ext4 /dev/mapper/vg-root rw\n"
             "25 22 0:23 / /dev/shm rw - tmpfs tmpfs rw\n")
SWAPS_HEADER = "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n"


@pytest.fixture(scope="module")
def luks_options(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("fake-sys")
    return {"sys_root": str(fake_sys(root)), "mountinfo": MOUNTINFO, "swaps": SWAPS_HEADER}


@pytest.fixture(scope="module")
def vault(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VaultDir]:
    root = tmp_path_factory.mktemp("check")
    shm = Path(tempfile.mkdtemp(prefix="pv-check-", dir="/dev/shm"))
    key = shm / "master.key"
    try:
        proc = pv("init", "--data", root / "data", "--key-file", key, "--admin", "admin")
        found = first_run_secrets(proc.stdout)
        yield VaultDir(root, key, found.recovery_code, found.admin_password, "admin")
    finally:
        shutil.rmtree(shm, ignore_errors=True)


def check_json(vault: VaultDir, *args: str, options: dict[str, str] | None = None,
               key: Path | None = None) -> tuple[int, dict[str, object]]:
    env = dict(os.environ, PACSVAULT_CHECK_OPTIONS=json.dumps(options or {}))
    proc = pv("check", "--json", *args, "--data", vault.data, "--key-file", key or vault.key,
              check=False, env=env)
    assert proc.returncode in (0, 1, 2), proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def sections_args() -> list[str]:
    return [a for s in MINE for a in ("--section", s)]


def ids(body: dict[str, object]) -> set[str]:
    return {str(f["id"]) for f in body["findings"]}  # type: ignore[attr-defined]


def by_id(body: dict[str, object], wanted: str) -> dict[str, object]:
    found = [f for f in body["findings"] if f["id"] == wanted]  # type: ignore[attr-defined]
    assert len(found) == 1, ids(body)
    return dict(found[0])


# --- the command on a fresh vault --------------------------------------------------------


def test_fresh_vault_reports_only_the_expected_findings(
        vault: VaultDir, luks_options: dict[str, str]) -> None:
    code, body = check_json(vault, *sections_args(), options=luks_options)
    assert ids(body) == FRESH, body
    assert code == 1 and body["exit_code"] == 1 and body["worst"] == "warning"
    assert body["sections"] == list(MINE) and body["errors"] == []
    assert set(body) >= {"started", "finished", "findings", "errors", "new_critical", "lang"}
    finding = by_id(body, "backups.none")
    assert set(finding) == {"id", "section", "severity", "title", "requirement", "evidence",
                            "fix", "data"}
    assert finding["severity"] == "warning" and finding["section"] == "backups"
    assert "GDPR art. 32" in str(finding["requirement"])
    assert "Sauvegarder" in str(finding["requirement"])
    # a --section run is recorded, not kept for Health (it would hide the other sections)
    assert not (vault.data / STATE_NAME).exists()


@pytest.mark.slow  # a server start and the TLS probes
def test_whole_check_of_a_fresh_install_with_its_server_running(
        vault: VaultDir, luks_options: dict[str, str]) -> None:
    """Every section, the real server up (on loopback, as the harness starts it): exactly
    the expected findings, no more, no fewer. The gateway is not asked
    (``PACSVAULT_CHECK_GATEWAY=off``, tests/helpers.py): the fake box is
    tests/test_check_network.py's."""
    assert os.environ.get("PACSVAULT_CHECK_GATEWAY") == "off"
    server = start_server(vault)
    try:
        code, body = check_json(vault, options=luks_options)
    finally:
        server.stop()
    assert body["sections"] == ["network", "tls", "accounts", "keys", "backups", "audit",
                                "software", "alerts"]
    assert body["errors"] == [] and ids(body) == WHOLE_FRESH, body
    assert code == 1 and body["exit_code"] == 1 and body["worst"] == "warning"
    assert by_id(body, "alerts.no-channel")["severity"] == "warning"
    # kept for Health (a whole run), but only for what runs now: no server, no probe
    kept = load_kept(vault.data)
    assert kept is not None and kept.result.ids() == WHOLE_FRESH
    code, body = check_json(vault, options=luks_options)
    assert ids(body) == WHOLE_FRESH | NOT_RUNNING and code == 1, body
    assert by_id(body, "tls.not-probed")["severity"] == "info"


def test_fresh_vault_on_this_machine(vault: VaultDir) -> None:
    """The real /sys and /proc: whatever this machine's disks, the only other findings are
    about them, and they say what the kernel says."""
    _code, body = check_json(vault, *sections_args())
    assert body["errors"] == []
    extra = ids(body) - FRESH
    assert extra <= {"keys.data-unencrypted-disk", "keys.swap-unencrypted"}, extra
    data_state = BlockProbe.real().of_path(vault.data).state
    assert ("keys.data-unencrypted-disk" in extra) == (data_state == PLAIN)
    assert BlockProbe.real().of_path(vault.key).state == MEMORY


def test_french_output(vault: VaultDir, luks_options: dict[str, str]) -> None:
    env = dict(os.environ, PACSVAULT_CHECK_OPTIONS=json.dumps(luks_options))
    proc = vault.cli("check", "--lang", "fr", "--section", "backups", check=False, env=env)
    assert proc.returncode == 1, proc.stderr
    assert "[ATTENTION] backups.none: Aucune sauvegarde configurée" in proc.stdout
    assert "Correction : Ajoutez deux cibles" in proc.stdout
    assert "code de sortie 1" in proc.stdout
    _code, body = check_json(vault, "--lang", "fr", "--section", "accounts")
    assert by_id(body, "accounts.no-second-factor")["title"] == \
        "Utilisateurs sans second facteur"


def test_user_without_second_factor(vault: VaultDir, luks_options: dict[str, str]) -> None:
    secret = vault.root / "bob.pw"
    secret.write_text("des-galets-ronds-dans-la-riviere\n")
    secret.chmod(0o600)
    vault.cli("user", "add", "bob", "--role", "physician", "--password-file", secret)
    code, body = check_json(vault, "--section", "accounts", options=luks_options)
    finding = by_id(body, "accounts.no-second-factor")
    assert finding["severity"] == "warning" and code == 1
    assert finding["data"] == {"users": ["admin", "bob"]}
    assert "bob" in str(finding["evidence"])


def test_key_moved_next_to_the_data(vault: VaultDir, luks_options: dict[str, str]) -> None:
    beside = vault.root / "keys" / "master.key"  # same filesystem as the data
    beside.parent.mkdir(exist_ok=True)
    shutil.copy2(vault.key, beside)
    # on an unencrypted disk (this machine as the fake /proc/self/mountinfo describes it
    # with a plain partition): key in clear beside the images is critical
    plain = dict(luks_options, mountinfo="22 1 253:1 / / rw - ext4 /dev/vdb1 rw\n")
    code, body = check_json(vault, "--section", "keys", options=plain, key=beside)
    finding = by_id(body, "keys.key-with-data")
    assert finding["severity"] == "critical" and code == 2
    assert "keys.data-unencrypted-disk" in ids(body)
    # on LUKS: still a weakness (a copy of the disk carries both), no longer critical
    code, body = check_json(vault, "--section", "keys", options=luks_options, key=beside)
    assert by_id(body, "keys.key-with-data")["severity"] == "warning" and code == 1
    assert "keys.data-unencrypted-disk" not in ids(body)
    # and from tmpfs, as created: nothing about the key
    code, body = check_json(vault, "--section", "keys", options=luks_options)
    assert ids(body) == set() and code == 0
    # a key made readable while the server runs (opening refuses such a file)
    v = vault.open()
    try:
        beside.chmod(0o644)
        found = run(CheckContext(vault=v, now=dt.datetime.now(dt.UTC),
                                 options=dict(luks_options, key_file=str(beside))), ("keys",))
        assert {f.id: f.severity for f in found.findings}["keys.key-permissions"] \
            is Severity.CRITICAL
    finally:
        v.close()
        beside.unlink()


# --- disks from /sys and /proc -----------------------------------------------------------


def test_fake_sys_shows_luks_under_lvm(luks_options: dict[str, str], tmp_path: Path) -> None:
    swaps = SWAPS_HEADER + "/dev/vdb1 partition 1048572 0 -2\n/dev/zram0 partition 8 0 100\n"
    probe = BlockProbe(Path(luks_options["sys_root"]), MOUNTINFO, swaps)
    data = probe.of_path(tmp_path)
    assert data.state == ENCRYPTED and "dm-1" in data.device
    assert probe.of_path(Path("/dev/shm/x")).state == MEMORY
    assert [(n, v.state) for n, v in probe.swap_devices()] == [
        ("/dev/vdb1", PLAIN), ("/dev/zram0", MEMORY)]
    spaced = BlockProbe(Path(luks_options["sys_root"]),
                        MOUNTINFO + "30 22 0:40 / /media/usb\\040key rw - vfat /dev/sdz1 rw\n",
                        "")
    assert spaced.of_path(Path("/media/usb key/pacsvault.key")).state == "unknown"


def test_swap_on_a_plain_partition_is_a_finding(vault: VaultDir,
                                                luks_options: dict[str, str]) -> None:
    swaps = SWAPS_HEADER + "/dev/vdb1 partition 1048572 0 -2\n"
    code, body = check_json(vault, "--section", "keys",
                            options=dict(luks_options, swaps=swaps))
    assert by_id(body, "keys.swap-unencrypted")["data"] == {"swap": ["/dev/vdb1"]}
    assert code == 1


# --- backups, audit, software in-process -------------------------------------------------


def test_backup_never_made_and_audit_retention(vault: VaultDir) -> None:
    v = vault.open()
    try:
        v.settings = v.settings.model_copy(update={"backup": BackupSettings(
            targets=[BackupTarget(name="usb", repository="/nonexistent/repo")])})
        ctx = CheckContext(vault=v, now=dt.datetime.now(dt.UTC), probe=False)
        stale = [f for f in run(ctx, ("backups",)).findings]
        assert [(f.id, f.severity) for f in stale] == [("backups.stale", Severity.CRITICAL)]
        later = CheckContext(vault=v, now=dt.datetime.now(dt.UTC) + dt.timedelta(days=400),
                             probe=False)
        assert "audit.retention-overdue" in run(later, ("audit",)).ids()
        assert run(ctx, ("audit",)).ids() == set()
    finally:
        v.close()


def test_known_vulnerable_versions() -> None:
    advisories = load_advisories()
    assert {a.package for a in advisories} >= {"pydicom", "starlette", "cryptography"}
    pydicom = next(a for a in advisories if a.id == "CVE-2026-32711")
    from packaging.version import Version

    assert pydicom.affects(Version("3.0.1")) and pydicom.affects(Version("2.4.4"))
    assert not pydicom.affects(Version("3.0.2")) and not pydicom.affects(Version("2.4.5"))


def test_software_section_compares_versions(vault: VaultDir) -> None:
    v = vault.open()
    try:
        now = dt.datetime.now(dt.UTC)
        clean = run(CheckContext(vault=v, now=now), ("software",))
        assert clean.findings == () and clean.errors == ()  # this release's dependencies
        old = run(CheckContext(vault=v, now=now, options={"versions": {
            "starlette": "0.45.0", "pydicom": "3.0.1"}}), ("software",))
        found = {f.id: f.severity for f in old.findings}
        assert found == {"software.starlette.CVE-2025-62727": Severity.CRITICAL,
                         "software.starlette.CVE-2025-54121": Severity.WARNING,
                         "software.pydicom.CVE-2026-32711": Severity.WARNING}
    finally:
        v.close()


# --- the record, the nightly run, the alert, the page -------------------------------------


def test_new_critical_is_recorded_and_alerted(vault: VaultDir,
                                              luks_options: dict[str, str]) -> None:
    beside = vault.root / "keys" / "again.key"
    beside.parent.mkdir(exist_ok=True)  # not left to an earlier test: it runs alone too
    shutil.copy2(vault.key, beside)
    seen: list[AuditEvent] = []
    v = vault.open()
    try:
        v.recorder.add_sink(type("Catch", (), {"write": lambda _s, e: seen.append(e)})())
        plain = dict(luks_options, mountinfo="22 1 253:1 / / rw - ext4 /dev/vdb1 rw\n",
                     key_file=str(beside))
        _result, new = run_and_record(v, trigger="test", sections=("keys",), options=plain)
        assert new == ["keys.key-with-data"]
    finally:
        v.close()
        beside.unlink()
    event = seen[-1]
    assert event.action == "check.run" and event.detail["new_critical"] == "keys.key-with-data"
    assert event.detail["critical"] == 1 and event.detail["exit_code"] == 2
    detector = Detector(AlertSettings())
    alerts = detector.observe(event)
    assert [a.rule for a in alerts] == ["security-check"]
    assert "keys.key-with-data" in alerts[0].text


@pytest.mark.slow  # the whole check, network and TLS sections included
def test_nightly_run_is_kept_and_recorded(vault: VaultDir, luks_options: dict[str, str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PACSVAULT_CHECK_OPTIONS", json.dumps(luks_options))
    (vault.data / STATE_NAME).unlink(missing_ok=True)
    v = vault.open()
    try:
        first = dt.datetime.now(dt.UTC)
        tick(v, now=first)  # a server just started: it waits for [check] at
        assert not (vault.data / STATE_NAME).exists()
        tick(v, now=first + dt.timedelta(days=1, minutes=1))
        mode = stat.S_IMODE((vault.data / STATE_NAME).stat().st_mode)
        assert mode == 0o600
        kept = load_kept(vault.data)
        assert kept is not None and kept.trigger == "nightly"
        assert kept.result.ids() == WHOLE_FRESH | NOT_RUNNING, kept.result.ids()
        assert kept.result.sections == ("network", "tls", "accounts", "keys", "backups",
                                        "audit", "software", "alerts")
        assert kept.result.errors == ()
        tick(v, now=first + dt.timedelta(days=1, minutes=2))  # once a day
    finally:
        v.close()
    nightly = [e for e in events(vault, "check.run") if e["trigger"] == "nightly"]
    assert len(nightly) == 1
    assert nightly[0]["complete"] is True and nightly[0]["user"] == ""
    assert "backups.none" in str(nightly[0]["ids"])


@pytest.mark.slow  # "run now" runs the whole check
def test_page_for_admin_only(vault: VaultDir, luks_options: dict[str, str],
                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PACSVAULT_CHECK_OPTIONS", json.dumps(luks_options))
    clock = FakeClock()
    with local_web(vault, clock) as web:
        web.accounts.add_user("chef", ["admin"], "lanterne-du-gardien-de-phare", by="test")
        web.accounts.add_user("lecteur", ["physician"], "confiture-de-mirabelles", by="test")
        with web.browser() as other:
            web.sign_in(other, "lecteur", "confiture-de-mirabelles")
            assert other.get("/admin/check").status_code == 403
        with web.browser() as admin:
            web.sign_in(admin, "chef", "lanterne-du-gardien-de-phare")
            page = admin.get("/admin/check")
            assert page.status_code == 200
            from tests.web_helpers import csrf_of

            refused = admin.post("/admin/check/run", data={})
            assert refused.status_code == 403
            ran = admin.post("/admin/check/run", data={"csrf": csrf_of(page.text)})
            assert ran.status_code == 303 and ran.headers["location"] == "/admin/check"
            page = admin.get("/admin/check", headers={"accept-language": "fr"})
            assert "Aucune sauvegarde configurée" in page.text
            assert 'id="finding-backups.none"' in page.text
            health = admin.get("/admin/health")
            assert 'id="check-summary"' in health.text


def test_dormant_accounts_and_syslog_collector(vault: VaultDir) -> None:
    import socket

    from pacsvault.config import AuditSettings
    from pacsvault.config.syslog import SyslogSettings

    v = vault.open()
    try:
        later = dt.datetime.now(dt.UTC) + dt.timedelta(days=100)
        dormant = [f for f in run(CheckContext(vault=v, now=later, probe=False),
                                  ("accounts",)).findings if f.id == "accounts.dormant"]
        assert len(dormant) == 1 and "admin" in dormant[0].data["users"]
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(1)
            port = listener.getsockname()[1]
            v.settings = v.settings.model_copy(update={"audit": AuditSettings(
                syslog=SyslogSettings(enabled=True, host="127.0.0.1", port=port,
                                      ca_file="/nonexistent/ca.pem"))})
            ctx = CheckContext(vault=v, now=dt.datetime.now(dt.UTC),
                               options={"syslog_timeout": 5})
            assert "audit.syslog-unreachable" not in run(ctx, ("audit",)).ids()
        # the listener is closed: nothing answers on that port any more
        assert "audit.syslog-unreachable" in run(ctx, ("audit",)).ids()
    finally:
        v.close()


def test_a_check_that_cannot_run_exits_unknown_not_critical(tmp_path: Path) -> None:
    """Monitoring reads 2 as an exposure: a vault that does not open is 3 ("unknown")."""
    proc = pv("check", "--json", "--data", str(tmp_path / "nothing-here"), check=False)
    assert proc.returncode == 3, (proc.returncode, proc.stderr)
    assert "error" in proc.stderr and not proc.stdout
