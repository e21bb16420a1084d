"""Online master key rotation (issue 14, item 4): ``pacsvault keys rotate`` while storescu
keeps sending to the running server. Afterwards every acknowledged instance reads with the
new key only, the old key file opens nothing of the live vault, the trail records the
rotation and verifies across it, old records' references still show, the running server
serves C-GET with its swapped keys, and users with TOTP still sign in (in a new process and
over HTTPS)."""

from __future__ import annotations

import base64
import datetime as dt
import json
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
from pydicom import dcmread

from pacsvault.accounts import totp as totp_mod
from pacsvault.accounts.service import AuthOutcome
from tests.helpers import AE, dcmtk, dcmtk_env, make_vault, start_server, storescu
from tests.test_rotation import (
    CALLING,
    assert_old_key_useless,
    assert_trail_across,
    patients_files,
    read_code_file,
)
from tests.web_helpers import client, sign_in

pytestmark = pytest.mark.slow

ADDR = "127.0.0.1"
PASSWORD = "correct horse battery staple 41 violet"
WS = "ROTWS"


def _c_get(port: int, study_uid: str, out: Path) -> set[str]:
    """C-GET one study from the running server (dcmtk getscu); the SOP UIDs received."""
    out.mkdir(parents=True)
    res = subprocess.run(
        [dcmtk("getscu"), "-S", "-aet", WS, "-aec", AE, "-od", str(out),
         "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}",
         "127.0.0.1", str(port)], capture_output=True, text=True, env=dcmtk_env(), timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    return {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in out.iterdir()}


def _totp_user(vault_dir: Path, key: Path) -> bytes:
    """A user enrolled in TOTP (first code one step back, so a later step is fresh)."""
    from pacsvault.vault import Vault

    vault = Vault.open(vault_dir, key)
    try:
        accounts = vault.accounts
        accounts.add_user("totpuser", ["physician"], PASSWORD)
        first = accounts.authenticate("totpuser", PASSWORD, ADDR)
        enrolment = accounts.enroll_totp(first.ticket, ADDR)
        secret = base64.b32decode(enrolment.secret + "=" * (-len(enrolment.secret) % 8))
        code = totp_mod.generate_code(secret, dt.datetime.now(dt.UTC) - dt.timedelta(seconds=30))
        done = accounts.verify_second_factor(first.ticket, code, ADDR)
        assert done.outcome is AuthOutcome.SUCCESS
        return secret
    finally:
        vault.close()


def _signs_in(vault_dir: Path, key: Path, secret: bytes) -> None:
    from pacsvault.vault import Vault

    vault = Vault.open(vault_dir, key)
    try:
        first = vault.accounts.authenticate("totpuser", PASSWORD, ADDR)
        assert first.outcome is AuthOutcome.NEEDS_SECOND_FACTOR and first.totp_enrolled
        code = totp_mod.generate_code(secret, dt.datetime.now(dt.UTC) + dt.timedelta(seconds=30))
        done = vault.accounts.verify_second_factor(first.ticket, code, ADDR)
        assert done.outcome is AuthOutcome.SUCCESS, done
    finally:
        vault.close()


def test_rotate_while_storescu_sends(tmp_path: Path) -> None:
    vault = make_vault(tmp_path / "v")
    vault.add_node(CALLING)
    vault.add_node(WS, "--roles", "query,retrieve")
    secret = _totp_user(vault.data, vault.key)
    groups = patients_files(tmp_path / "in", 15, per_patient=4)
    files = [f for group in groups.values() for f in group]  # 60 objects, 15 patients
    old_key = tmp_path / "old-copy.key"
    shutil.copy2(vault.key, old_key)
    server = start_server(vault)
    acknowledged: list[Path] = []
    acked_at: list[float] = []
    failures: list[str] = []
    sent_some = threading.Event()

    def send() -> None:
        for start in range(0, len(files), 2):
            part = files[start:start + 2]
            done = storescu(server.port, part, calling=CALLING)
            if done.returncode == 0:
                acknowledged.extend(part)
                acked_at.append(time.monotonic())
            else:
                failures.append(f"rc={done.returncode} out={done.stdout[-300:]!r} "
                                f"err={done.stderr[-500:]!r}")
            if start >= 8:
                sent_some.set()
            time.sleep(0.2)  # a modality sending a study image by image
        sent_some.set()

    sender = threading.Thread(target=send)
    ca = vault.data / "tls" / "ca.crt"
    try:
        with client(server.https_port, ca) as browser:  # the admin enrols TOTP over HTTPS
            enrolled = sign_in(browser, vault.admin_name, vault.admin_password)
        sender.start()
        assert sent_some.wait(120)
        began = time.monotonic()
        proc = vault.cli("keys", "rotate", timeout=300)
        ended = time.monotonic()
        took = ended - began
        sender.join(300)
        assert not sender.is_alive()
        assert server.alive(), server.log()
        assert "online" in proc.stderr, proc.stderr
        assert not failures, (failures, server.log()[-3000:])
        assert len(acknowledged) == len(files)
        # acknowledged before, during and after the rotation
        assert min(acked_at) < began and max(acked_at) > ended, (took, acked_at)
        paused = [line for line in server.log().splitlines() if "commits paused" in line]
        assert paused, server.log()
        print(paused[-1], f"rotate command: {took:.2f} s")
        code = read_code_file(proc.stdout)
        assert code != vault.recovery_code and code not in server.log()
        # Every acknowledged instance reads with the new key (the server still runs).
        out = tmp_path / "out"
        vault.cli("export", "--all", "--out", out)
        exported = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                    for p in out.rglob("*") if p.is_file()}
        wanted = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                  for p in acknowledged}
        assert wanted <= exported
        # The running server itself reads with its swapped keys: C-GET of studies stored
        # before, during and after the rotation (data keys cached and not).
        for pid in ("PVROT000", "PVROT007", "PVROT014"):
            group = groups[pid]
            study = str(dcmread(group[0], stop_before_pixels=True).StudyInstanceUID)
            got = _c_get(server.port, study, tmp_path / f"get-{pid}")
            assert got == {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                           for p in group}
        assert_old_key_useless(vault, old_key)
        assert_trail_across(vault, "PVROT000")
        rotated = json.loads(vault.cli("audit", "show", "--action", "keys.rotated",
                                       "--json").stdout.splitlines()[-1])
        assert rotated["detail"]["online"] is True and rotated["user"] == "local-admin"
        _signs_in(vault.data, vault.key, secret)
        # ... and through the running server, whose accounts key was swapped in memory.
        with client(server.https_port, ca) as browser:
            sign_in(browser, vault.admin_name, vault.admin_password, enrolled.authenticator)
        # The server keeps storing after the rotation, with the new keys.
        late = patients_files(tmp_path / "late", 2, per_patient=1)
        late_files = [f for group in late.values() for f in group]
        assert storescu(server.port, late_files, calling=CALLING).returncode == 0
    finally:
        sender.join(60)
        server.stop()
    assert "Traceback" not in server.log()
    vault.cli("audit", "verify")


def test_server_killed_mid_rotation_completes_at_restart(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The server dies (test hook: exit after re-wrapping 2 data keys) during an online
    rotation while storescu sends: the restart completes the rotation before serving, and
    every acknowledged instance is there, readable with the new key only."""
    from tests.test_rotation import CRASH_ENV, assert_consistent_inproc

    vault = make_vault(tmp_path / "v")
    vault.add_node(CALLING)
    groups = patients_files(tmp_path / "in", 6, per_patient=2)
    files = [f for group in groups.values() for f in group]
    old_key = tmp_path / "old-copy.key"
    shutil.copy2(vault.key, old_key)
    monkeypatch.setenv(CRASH_ENV, "data-keys:2")
    server = start_server(vault)
    monkeypatch.delenv(CRASH_ENV)
    acknowledged: list[Path] = []
    try:
        for start in range(0, 8, 2):
            part = files[start:start + 2]
            assert storescu(server.port, part, calling=CALLING).returncode == 0
            acknowledged.extend(part)
        refused = vault.cli("keys", "rotate", check=False, timeout=300)
        assert refused.returncode == 2 and "Traceback" not in refused.stderr
        server.proc.wait(30)
        assert server.proc.returncode == 70
        assert "rotation" in json.loads((vault.data / "vault.json").read_text())
    finally:
        server.stop()
    server = start_server(vault, log_name="restart.log")
    try:
        assert "interrupted master key rotation was completed" in server.log()
        rest = files[8:]
        assert storescu(server.port, rest, calling=CALLING).returncode == 0
        acknowledged.extend(rest)
    finally:
        server.stop()
    assert "rotation" not in json.loads((vault.data / "vault.json").read_text())
    assert list(vault.key.parent.rglob("*.recovery.txt"))
    assert_old_key_useless(vault, old_key)
    assert_consistent_inproc(vault, acknowledged, "PVROT000")
