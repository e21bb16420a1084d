"""Issue 18: the security check's findings the other check tests do not reach, each with
its id, severity and exit code: the number of administrators, API tokens that barely
expire or lie unused, a broken audit chain, data and settings open to other accounts,
and a restore drill that is old or failed.

One vault for the module, made in-process (``vault.create``: no first administrator, so
the "no administrator" case comes first), its key file on tmpfs (``/dev/shm``) so that
the key never lies beside the data. The disks are "unknown" (empty mountinfo): only the
finding under test shows in the keys section. Time is a fake clock (``ctx.now``, and
the accounts' clock when a token is used); the backup state is written by the backup's
own recorders. The audit chain is broken last (the module's trail stays broken).
"""

from __future__ import annotations

import datetime as dt
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pacsvault.accounts.service import Accounts
from pacsvault.audit.events import AuditEvent, EventCode, Outcome
from pacsvault.backup.runner import BackupOutcome
from pacsvault.backup.state import record_backup, record_drill
from pacsvault.check import CheckContext, CheckResult, Finding, Severity, run
from pacsvault.config import BackupSettings, BackupTarget
from pacsvault.config.tokens import TokenSettings
from pacsvault.vault import Vault, create
from tests.helpers import VaultDir
from tests.web_helpers import FakeClock, cheap_hasher

PASSWORD = "galets-de-la-loire-au-soleil"
NO_DISKS = {"mountinfo": "", "swaps": ""}  # every path "unknown": no disk finding


@pytest.fixture(scope="module")
def vault(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VaultDir]:
    root = tmp_path_factory.mktemp("findings")
    shm = Path(tempfile.mkdtemp(prefix="pv-findings-", dir="/dev/shm"))
    key = shm / "master.key"
    try:
        yield VaultDir(root, key, create(root / "data", key_file=key, ae_title="FINDINGS"))
    finally:
        shutil.rmtree(shm, ignore_errors=True)


@pytest.fixture
def opened(vault: VaultDir) -> Iterator[Vault]:
    v = vault.open()
    try:
        yield v
    finally:
        v.close()


def check(v: Vault, section: str, now: dt.datetime | None = None) -> CheckResult:
    return run(CheckContext(v, now or dt.datetime.now(dt.UTC), probe=False,
                            options=dict(NO_DISKS)), (section,))


def one(result: CheckResult, wanted: str) -> Finding:
    found = [f for f in result.findings if f.id == wanted]
    assert len(found) == 1, result.ids()
    return found[0]


def accounts_with(v: Vault, clock: FakeClock) -> Accounts:
    """The real account service over the vault, on a fake clock, with the vault's token
    policy (as the server's is)."""
    accounts = Accounts(v.sessions, v.recorder, secret_key=secrets.token_bytes(32),
                        clock=clock, hasher=cheap_hasher(), recovery_hasher=cheap_hasher())
    accounts.use_token_policy(v.token_policy)
    return accounts


# --- accounts ---------------------------------------------------------------------------


def test_no_administrator_then_too_many(opened: Vault) -> None:
    result = check(opened, "accounts")
    none = one(result, "accounts.no-admin")
    assert none.severity is Severity.WARNING and none.data == {"admins": 0}
    assert result.exit_code == 1 and "accounts.many-admins" not in result.ids()
    assert "administrateur" in none.title.fr
    accounts = accounts_with(opened, FakeClock())
    for n in range(1, 5):
        accounts.add_user(f"chef{n}", ["admin"], PASSWORD, by="test")
    accounts.add_user("lecteur", ["physician"], PASSWORD, by="test")
    result = check(opened, "accounts")
    many = one(result, "accounts.many-admins")
    assert many.severity is Severity.WARNING and many.data == {"admins": 4}
    assert "chef4" in many.evidence.en and "chef4" in many.evidence.fr
    assert "accounts.no-admin" not in result.ids() and result.exit_code == 1
    accounts.disable("chef4", by="test")  # three enabled administrators: the limit
    assert not {"accounts.no-admin", "accounts.many-admins"} & check(opened, "accounts").ids()


def test_tokens_that_barely_expire_or_lie_unused(opened: Vault) -> None:
    """A 200-day token (allowed by a [tokens] max_days of 365) is long-lived; unused for
    100 days it is also an unused one, while a token used at day 60 is not. With the
    default idle expiry (30 days) the same tokens no longer work by day 100: the check
    must not call them valid."""
    start = dt.datetime.now(dt.UTC)
    clock = FakeClock()
    clock.now = start
    opened.settings = opened.settings.model_copy(update={
        "tokens": TokenSettings(default_days=30, max_days=365, idle_days=180)})
    accounts = accounts_with(opened, clock)
    accounts.add_user("robot", ["physician"], PASSWORD, by="test")
    idle = accounts.create_token("robot", dt.timedelta(days=200), label="forgotten")
    used = accounts.create_token("robot", dt.timedelta(days=200), label="nightly")
    short = accounts.create_token("robot", dt.timedelta(days=30), label="short")
    result = check(opened, "accounts", start + dt.timedelta(days=1))
    long_lived = one(result, "accounts.token-long-lived")
    assert long_lived.severity is Severity.WARNING
    assert sorted(long_lived.data["tokens"]) == sorted([idle.token_id, used.token_id])
    assert short.token_id not in str(long_lived.data)
    assert "accounts.token-unused" not in result.ids()
    clock.now = start + dt.timedelta(days=60)
    assert accounts.verify_token(used.token, "127.0.0.1").ok
    later = check(opened, "accounts", start + dt.timedelta(days=100))
    unused = one(later, "accounts.token-unused")
    assert unused.severity is Severity.WARNING and later.exit_code == 1
    assert unused.data == {"tokens": [idle.token_id], "days": 90}
    assert idle.token_id in unused.evidence.en and idle.token_id in unused.evidence.fr
    # the default idle expiry: by day 100 neither 200-day token works any more
    opened.settings = opened.settings.model_copy(update={
        "tokens": TokenSettings(default_days=30, max_days=365, idle_days=30)})
    assert not accounts_with(opened, clock).verify_token(idle.token, "127.0.0.1").ok
    dead = check(opened, "accounts", start + dt.timedelta(days=100))
    assert not {"accounts.token-unused", "accounts.token-long-lived"} & dead.ids()
    for token in (idle, used, short):
        accounts.revoke_token(token.token_id, by="test")


# --- keys: permissions ------------------------------------------------------------------


def test_data_and_settings_open_to_other_accounts(vault: VaultDir, opened: Vault) -> None:
    assert check(opened, "keys").findings == ()
    settings = vault.data / "pacsvault.toml"
    modes = {p: p.stat().st_mode & 0o7777 for p in (vault.data, settings)}
    try:
        vault.data.chmod(0o750)
        settings.chmod(0o664)  # group-writable: anyone in the group changes the settings
        result = check(opened, "keys")
        loose = one(result, "keys.data-permissions")
        assert loose.severity is Severity.WARNING and result.exit_code == 1
        assert {"data 0750", "pacsvault.toml 0664"} <= set(loose.data["paths"])
        assert f"chmod -R go-rwx {vault.data}" == loose.fix.en == loose.fix.fr
        assert result.ids() == {"keys.data-permissions"}
    finally:
        for path, mode in modes.items():
            path.chmod(mode)
    assert check(opened, "keys").findings == ()


# --- backups: the restore drill ---------------------------------------------------------


def test_restore_drill_never_old_and_failed(opened: Vault) -> None:
    opened.settings = opened.settings.model_copy(update={"backup": BackupSettings(
        targets=[BackupTarget(name="usb", repository="/nonexistent/repo")],
        max_age_hours=168, drill_every_days=1)})
    layout = opened.layout
    record_backup(layout, BackupOutcome("usb", True, "abc123", None, 10, 100, 1.0))
    now = dt.datetime.now(dt.UTC)
    never = check(opened, "backups", now)
    assert [(f.id, f.severity) for f in never.findings] == [
        ("backups.drill-old", Severity.INFO)]
    assert never.exit_code == 0 and "never" in never.findings[0].evidence.en
    record_drill(layout, "usb", True, "restored and verified")
    assert check(opened, "backups", now + dt.timedelta(hours=1)).findings == ()
    # three days on (the backup 72 h old, under its 168 h limit): the daily drill is late
    old = check(opened, "backups", now + dt.timedelta(days=3))
    assert [(f.id, f.severity) for f in old.findings] == [
        ("backups.drill-old", Severity.WARNING)]
    assert old.exit_code == 1 and "3 days ago" in old.findings[0].evidence.en
    assert "il y a 3 jours" in old.findings[0].evidence.fr
    assert old.findings[0].data == {"target": "usb"}
    record_drill(layout, "usb", False, "2 objects did not verify")
    failed = check(opened, "backups", now + dt.timedelta(hours=1))
    assert [(f.id, f.severity) for f in failed.findings] == [
        ("backups.drill-failed", Severity.WARNING)]
    assert failed.exit_code == 1 and "GDPR art. 32(1)(d)" in failed.findings[0].requirement


# --- audit: last, it breaks the module's trail --------------------------------------------


def test_broken_audit_chain_is_critical(vault: VaultDir) -> None:
    v = vault.open()
    try:
        for n in range(3):
            v.recorder.emit(AuditEvent(action="test.before", outcome=Outcome.SUCCESS,
                                       code=EventCode.APPLICATION_ACTIVITY, detail={"n": n}))
        assert check(v, "audit").ids() == set()
    finally:
        v.close()
    trail = vault.data / "audit" / "trail.jsonl"
    lines = trail.read_bytes().split(b"\n")
    at = next(i for i, line in enumerate(lines) if b"test.before" in line)
    lines[at] = lines[at].replace(b"test.before", b"test.bef0re", 1)  # one edited record
    trail.write_bytes(b"\n".join(lines))
    proc = vault.cli("check", "--json", "--section", "audit", check=False)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    v = vault.open()
    try:
        result = check(v, "audit")
    finally:
        v.close()
    broken = one(result, "audit.chain-broken")
    assert broken.severity is Severity.CRITICAL and result.exit_code == 2
    assert broken.evidence.en.startswith("Verification failed: ")
    assert broken.evidence.fr.startswith("La vérification a échoué : ")
