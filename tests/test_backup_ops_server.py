"""Backup operations against the real ``pacsvault serve`` and real restic (issue 14, item 1).

* a configured target gets its first backup, then its first restore drill, from ``serve``
  alone (no command), and the drill leaves no restored copy behind;
* the admin Health page and ``pacsvault status`` show the last backup, the last drill and
  the next run; without any target they say that a disk failure loses everything;
* a corrupted repository makes the drill fail: ``backup.drill`` failure recorded, the
  state says so, and the alert reaches a webhook on 127.0.0.1;
* a last good backup older than ``max_age_hours`` (state file's time faked) raises the
  ``backup-stale`` alert.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest

from tests.corpus import synthetic_ct_series
from tests.harness.webhook import Webhook
from tests.helpers import (
    AE,
    Server,
    VaultDir,
    events,
    make_vault,
    start_server,
    storescu,
)
from tests.web_helpers import Authenticator, client, sign_in

pytestmark = pytest.mark.slow  # real servers and real restic

DRILL_PREFIX = ".pacsvault-drill-"


def configure_backup(vault: VaultDir, targets: list[tuple[str, str]],
                     **settings: str | int) -> None:
    """Set ``[backup]`` keys and targets in the vault's toml (keeps the other lines)."""
    path = vault.data / "pacsvault.toml"
    lines = path.read_text().splitlines()
    scalars = [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
    blocks: list[str] = []
    for name, repository in targets:
        blocks += ["[[backup.targets]]", f"name = {json.dumps(name)}",
                   f"repository = {json.dumps(repository)}"]
    if "[backup]" not in (line.strip() for line in lines):
        path.write_text("\n".join([*lines, "", "[backup]", *scalars, *blocks]) + "\n")
        return
    out: list[str] = []
    inside = False
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("["):
            if inside and not stripped.startswith("[[backup.targets]]"):
                out += [*blocks, ""]
                blocks = []
                inside = False
            out.append(line)
            if stripped == "[backup]":
                inside = True
                out += scalars
            continue
        if inside and any(stripped.startswith(f"{k} =") for k in settings):
            continue
        out.append(line)
    out += blocks
    path.write_text("\n".join(out) + "\n")


def wait_for(what: str, check: Callable[[], Any], timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def state(vault: VaultDir) -> dict[str, Any]:
    try:
        found: dict[str, Any] = json.loads((vault.data / "backup-state.json").read_text())
    except (OSError, ValueError):
        return {}
    targets: dict[str, Any] = found.get("targets", {})
    return targets


def far_schedule() -> str:
    """A daily time 12 hours away: no scheduled run falls within the test."""
    later = dt.datetime.now() + dt.timedelta(hours=12)
    return later.strftime("%H:%M")


def serve(vault: VaultDir) -> Server:
    os.environ["PACSVAULT_JOBS_FIRST_AFTER"] = "1"
    try:
        return start_server(vault)
    finally:
        del os.environ["PACSVAULT_JOBS_FIRST_AFTER"]


def drill_copies(vault: VaultDir) -> list[Path]:
    return [p for p in (vault.root.iterdir()) if p.name.startswith(DRILL_PREFIX)]


def store_images(vault: VaultDir, server: Server, count: int = 3) -> None:
    files = synthetic_ct_series(vault.root / "images", count, size=32)
    vault.add_node("MODALITY")
    done = storescu(server.port, files, calling="MODALITY", called=AE)
    assert done.returncode == 0, done.stderr


def with_webhook(vault: VaultDir, hook: Webhook) -> None:
    vault.set_toml("alerts", "webhook_url", json.dumps(hook.url))
    vault.set_toml("alerts", "webhook_allow_http_loopback", "true")


@dataclass
class Backed:
    vault: VaultDir
    repository: Path
    no_target_status: str  # `pacsvault status` before any target was configured
    no_target_page: str  # the Health page then
    page: str  # the Health page after the first backup and drill


def health_page(vault: VaultDir, server: Server,
                authenticator: Authenticator | None = None) -> tuple[str, Authenticator]:
    with client(server.https_port, vault.data / "tls" / "ca.crt") as browser:
        done = sign_in(browser, vault.admin_name, vault.admin_password, authenticator)
        page = browser.get("/admin/health")
    assert page.status_code == 200, page.text
    return page.text, done.authenticator


@pytest.fixture(scope="module")
def backed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backed]:
    """A vault with images whose only target was backed up and drilled by ``serve``."""
    root = tmp_path_factory.mktemp("backup-ops")
    vault = make_vault(root / "v")
    repository = root / "usb" / "pacsvault-backup"
    repository.parent.mkdir()
    no_target_status = vault.cli("status").stdout
    first = start_server(vault)  # images first, so the first backup holds some
    try:
        store_images(vault, first)
        no_target_page, totp = health_page(vault, first)
    finally:
        first.stop()
    configure_backup(vault, [("usb", str(repository))], schedule=far_schedule())
    server = serve(vault)
    try:
        wait_for("the first backup and drill",
                 lambda: state(vault).get("usb", {}).get("last_drill"), timeout=180)
        page, _ = health_page(vault, server, totp)
    finally:
        server.stop()
    yield Backed(vault, repository, no_target_status, no_target_page, page)


def test_serve_backs_up_and_drills_a_new_target_without_any_command(backed: Backed) -> None:
    usb = state(backed.vault)["usb"]
    assert usb.get("last_success") and usb.get("last_snapshot"), usb
    assert usb["last_drill_ok"] is True, usb
    runs = events(backed.vault, "backup.run")
    assert runs and runs[0]["outcome"] == "success" and runs[0]["target"] == "usb"
    drills = events(backed.vault, "backup.drill")
    assert len(drills) == 1 and drills[0]["outcome"] == "success", drills
    drill = drills[0]
    # counts only: the restored objects authenticated and the trail verified
    assert drill["instances"] == drill["expected"] == 3 and drill["failed"] == 0
    assert drill["verified"] == 3 and drill["shredded"] == 0
    assert int(cast(int, drill["trail_records"])) > 0
    assert (backed.repository / "config").is_file()  # the repository was made by serve
    assert drill_copies(backed.vault) == []  # the copy is gone


def test_cli_drill_succeeds_and_leaves_no_copy(backed: Backed) -> None:
    done = backed.vault.cli("backup", "drill", "--target", "usb")
    assert "drill usb: OK" in done.stdout, done.stdout
    assert drill_copies(backed.vault) == []
    unknown = backed.vault.cli("backup", "drill", "--target", "nope", check=False)
    assert unknown.returncode == 2 and "pacsvault: error:" in unknown.stderr


def test_health_page_and_status_show_backups(backed: Backed) -> None:
    vault = backed.vault
    status = vault.cli("status").stdout
    line = next(ln for ln in status.splitlines() if ln.startswith("Backup"))
    assert "usb: ok" in line and "last good" in line and "drill" in line and "next run" \
        in line, status
    report = json.loads(vault.cli("status", "--json").stdout)["backup"]
    assert report["configured"] and report["targets"][0]["last_drill_ok"] is True
    row = re.search(r'<tr class="backup-target" data-target="usb" '
                    r'data-state="(\w[\w-]*)">(.*?)</tr>', backed.page, re.S)
    assert row, backed.page
    assert row.group(1) == "ok"
    cells = row.group(2)
    last = re.search(r'class="last-backup">(.*?)</td>', cells)
    upcoming = re.search(r'class="next-run">(.*?)</td>', cells)
    # times in the practice's zone ([web] time_zone, issue 20), no longer labelled UTC
    local_time = r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}"
    assert last and re.match(local_time, last.group(1)) and "h ago" in last.group(1)
    assert "succeeded" in cells
    assert upcoming and re.match(local_time, upcoming.group(1)), upcoming


def test_no_target_is_a_clear_warning(backed: Backed) -> None:
    assert "no backup configured: a disk failure loses everything" in backed.no_target_status
    assert "[[backup.targets]]" in backed.no_target_status  # and what to do
    assert 'id="backup-none"' in backed.no_target_page
    assert "disk failure loses everything" in backed.no_target_page


def corrupt(repository: Path) -> int:
    """Flip bytes in the middle of every pack file: restic's MACs must catch it."""
    count = 0
    for pack in (repository / "data").rglob("*"):
        if pack.is_file() and pack.stat().st_size > 64:
            with open(pack, "r+b") as fh:
                fh.seek(pack.stat().st_size // 2)
                chunk = fh.read(32)
                fh.seek(pack.stat().st_size // 2)
                fh.write(bytes(b ^ 0xFF for b in chunk))
            count += 1
    return count


def test_corrupted_repository_fails_the_drill_and_alerts(backed: Backed, hook: Webhook) -> None:
    vault = backed.vault
    assert corrupt(backed.repository) > 0
    with_webhook(vault, hook)
    # the last drill a month ago: the server drills at its first tick
    path = vault.data / "backup-state.json"
    saved = json.loads(path.read_text())
    month_ago = (dt.datetime.now(dt.UTC) - dt.timedelta(days=31)).isoformat()
    saved["targets"]["usb"]["last_drill"] = month_ago
    path.write_text(json.dumps(saved))
    server = serve(vault)
    try:
        wait_for("the failed drill",
                 lambda: state(vault)["usb"].get("last_drill_ok") is False, timeout=120)
        alerts = wait_for("the alert", lambda: [b for b in hook.bodies
                                                if b["rule"] == "backup-failed"], timeout=60)
    finally:
        server.stop()
    failed = [e for e in events(vault, "backup.drill") if e["outcome"] != "success"]
    assert failed and failed[-1]["target"] == "usb" and failed[-1]["ok"] is False
    assert "restore drill" in alerts[0]["title"] and alerts[0]["facts"]["target"] == "usb"
    assert drill_copies(vault) == []  # deleted on failure too
    status = vault.cli("status").stdout
    assert "DRILL-FAILED" in status or "FAILING" in status, status


def test_stale_backup_alerts(tmp_path: Path, hook: Webhook) -> None:
    vault = make_vault(tmp_path / "v")
    # the disk is gone: the catch-up run fails, so the backup stays three days old
    configure_backup(vault, [("usb", str(tmp_path / "unplugged" / "repo"))],
                     schedule=far_schedule(), max_age_hours=36)
    with_webhook(vault, hook)
    three_days = (dt.datetime.now(dt.UTC) - dt.timedelta(days=3)).isoformat()
    (vault.data / "backup-state.json").write_text(json.dumps({"targets": {"usb": {
        "last_success": three_days, "last_drill": three_days, "last_drill_ok": True}}}))
    server = serve(vault)
    try:
        stale = wait_for("the stale alert", lambda: [b for b in hook.bodies
                                                     if b["rule"] == "backup-stale"])
    finally:
        server.stop()
    assert stale[0]["facts"]["target"] == "usb" and "hours old" in stale[0]["text"]
    assert [e for e in events(vault, "backup.stale") if e["target"] == "usb"]
    assert any(b["rule"] == "backup-failed" for b in hook.bodies)  # the failed run too
    status = vault.cli("status").stdout
    assert "usb: FAILING" in status and "last good" in status, status



def test_drill_authenticates_every_object_restic_cannot_judge(backed: Backed) -> None:
    """An object damaged on the live disk before the backup restores without any restic
    error (restic faithfully keeps the damaged bytes): the drill's own decryption of
    every object is what catches it."""
    from pacsvault.backup import drill, runner

    vault = backed.vault
    objects = sorted((vault.data / "objects").rglob("*.pvo"))
    assert len(objects) == 3
    victim = objects[0]
    original = victim.read_bytes()
    damaged = bytearray(original)
    damaged[len(damaged) // 2] ^= 0x01
    victim.write_bytes(bytes(damaged))
    other = backed.repository.parent / "second-disk"
    configure_backup(vault, [("second", str(other))])
    opened = vault.open()
    try:
        runner.init(opened, "second")
        assert [o.ok for o in runner.run_backup(opened, ["second"])] == [True]
        result = drill.run_drill(opened, "second")
    finally:
        opened.close()
        victim.write_bytes(original)
    assert not result.ok and result.failed == 1 and result.verified == 2, result
    assert "1 of 3 restored object(s)" in result.error
    assert drill_copies(vault) == []
    recorded = [e for e in events(vault, "backup.drill") if e["target"] == "second"]
    assert recorded and recorded[-1]["outcome"] != "success" and recorded[-1]["failed"] == 1
