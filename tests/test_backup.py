"""Backups (issue 14, item 1): restic repositories on local directories, the real server and
real storescu. Backup -> lose everything -> restore onto a "new machine" with only the
repository location and the recovery code; a corrupted repository is caught; nothing of a
patient is readable in the repository, its cache or the staging; a wrong recovery code
writes nothing; crypto-shredding reaches backups taken before an erasure."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests import corpus
from tests.helpers import VaultDir, events, pv, start_server, storescu
from tests.vault_template import copy_of, template

MODALITY = "MODALITY"
RESTIC = shutil.which("restic") or "/usr/bin/restic"

pytestmark = pytest.mark.skipif(not Path(RESTIC).exists(), reason="restic not installed")


def add_target(vault: VaultDir, repo: Path, name: str = "usb", binary: str | None = None
               ) -> None:
    with open(vault.data / "pacsvault.toml", "a") as fh:
        fh.write(f'\n[[backup.targets]]\nname = "{name}"\nrepository = "{repo}"\n')
    if binary is not None:
        vault.set_toml("backup", "restic_binary", f'"{binary}"')


def private_file(path: Path, text: str) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text + "\n")
    return path


def rotate_keys(vault: VaultDir) -> str:
    """``pacsvault keys rotate`` (offline, the real CLI); the new recovery code, read from
    the 0600 file it is handed over in."""
    rotated = vault.cli("keys", "rotate")
    code_file = Path(rotated.stdout.strip().splitlines()[-1].strip())
    return next(line.split(":", 1)[1].strip() for line in code_file.read_text().splitlines()
                if line.startswith("recovery code:"))


def digests(v: Any) -> dict[str, str]:
    """SOP Instance UID -> SHA-256 of the decrypted Part 10 bytes (authenticated read)."""
    return {item.sop_uid: hashlib.sha256(v.archive.read(item)).hexdigest()
            for item in v.archive.locate()}


def send_corpus(port: int, files: list[corpus.CorpusFile]) -> None:
    for f in files:
        res = storescu(port, [f.path], calling=MODALITY, extra=f.proposal)
        assert res.returncode == 0, res.stderr


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> VaultDir:
    """One real ``init`` for the module; each test backs up its own copy of it
    (tests/vault_template.py): its own vault, repository and restores, as before."""
    return template(tmp_path_factory.mktemp("template") / "v")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> list[corpus.CorpusFile]:
    return corpus.build(tmp_path_factory.mktemp("corpus"))


@pytest.mark.slow
def test_restore_onto_new_machine_with_recovery_code_only(
        tmp_path: Path, fresh: VaultDir, files: list[corpus.CorpusFile]) -> None:
    vault = copy_of(fresh, tmp_path / "v")
    vault.add_node(MODALITY)
    vault.add_node("VIEWER", "--port", "11113", "--roles", "store,query,retrieve")
    repo = tmp_path / "usb" / "pacsvault-backup"
    add_target(vault, repo)
    server = start_server(vault)
    try:
        send_corpus(server.port, files[:6])
        vault.cli("backup", "init")
        run = vault.cli("backup", "run")  # while serve runs
        assert "usb: snapshot" in run.stdout
    finally:
        server.stop()
    v = vault.open()
    try:
        before = digests(v)
        users = sorted(u.name for u in v.accounts.list_users())
        nodes = sorted((n.ae_title, n.roles) for n in v.nodes.all())
    finally:
        v.close()
    assert len(before) == 6

    # The machine is gone: data dir and key file. Left: the USB disk and the recovery sheet.
    shutil.rmtree(vault.data)
    vault.key.unlink()
    new, new_key = tmp_path / "new" / "data", tmp_path / "new" / "keys" / "master.key"
    code = private_file(tmp_path / "code.txt", vault.recovery_code)
    res = pv("backup", "restore", "--repository", repo, "--to", new, "--key-file", new_key,
             "--recovery-code-file", code)
    assert "6 instances" in res.stdout
    assert stat.S_IMODE(new_key.stat().st_mode) == 0o600
    assert stat.S_IMODE((new / "index.db").stat().st_mode) == 0o600
    assert stat.S_IMODE(new.stat().st_mode) == 0o700
    assert not (new / ".backup-staging").exists()
    assert f'key_file = "{new_key.resolve()}"' in (new / "pacsvault.toml").read_text()

    from pacsvault.vault import Vault

    restored = Vault.open(new, new_key)
    try:
        assert digests(restored) == before  # every instance byte-identical, authenticated
        assert sorted(u.name for u in restored.accounts.list_users()) == users
        assert sorted((n.ae_title, n.roles) for n in restored.nodes.all()) == nodes
    finally:
        restored.close()
    verdict = pv("audit", "verify", "--data", new, "--key-file", new_key)
    assert verdict.returncode == 0
    # and it serves again
    again = VaultDir(tmp_path / "new", new_key, vault.recovery_code)
    server = start_server(again)
    try:
        send_corpus(server.port, files[6:7])
    finally:
        server.stop()


def test_wrong_recovery_code_writes_nothing(tmp_path: Path, fresh: VaultDir) -> None:
    vault = copy_of(fresh, tmp_path / "v")
    repo = tmp_path / "repo"
    add_target(vault, repo)
    vault.cli("backup", "init")
    vault.cli("backup", "run")
    new, new_key = tmp_path / "new", tmp_path / "k" / "master.key"
    wrong = "AAAA-BBBB-CCCC-DDDD-EEEE-FFFF-GGGG-HHHH"
    res = pv("backup", "restore", "--repository", repo, "--to", new, "--key-file", new_key,
             "--recovery-code-file", private_file(tmp_path / "wrong.txt", wrong), check=False)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert lines[-1].startswith("pacsvault: error: ") and "recovery code" in lines[-1]
    assert not any(ln.startswith(("Traceback", "Fatal")) for ln in lines)
    assert not new.exists() and not new_key.exists()
    # a non-empty destination is refused before anything else
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    res = pv("backup", "restore", "--repository", repo, "--to", tmp_path / "busy",
             "--recovery-code-file", tmp_path / "wrong.txt", check=False)
    assert res.returncode == 2 and "not an empty directory" in res.stderr


@pytest.mark.slow
def test_corrupted_repository_is_detected_by_verify(tmp_path: Path, fresh: VaultDir,
                                                     files: list[corpus.CorpusFile]) -> None:
    vault = copy_of(fresh, tmp_path / "v")
    vault.add_node(MODALITY)
    repo = tmp_path / "repo"
    add_target(vault, repo)
    server = start_server(vault)
    try:
        send_corpus(server.port, files[:3])
    finally:
        server.stop()
    vault.cli("backup", "init")
    vault.cli("backup", "run")
    assert "usb: OK" in vault.cli("backup", "verify").stdout
    packs = sorted((p for p in (repo / "data").rglob("*") if p.is_file()),
                   key=lambda p: p.stat().st_size)
    victim = packs[-1]  # the largest pack: image data
    os.chmod(victim, 0o600)
    raw = bytearray(victim.read_bytes())
    for i in range(len(raw) // 2, len(raw) // 2 + 16):
        raw[i] ^= 0xFF
    victim.write_bytes(bytes(raw))
    res = vault.cli("backup", "verify", check=False)
    assert res.returncode != 0
    assert "usb: DAMAGED" in res.stdout
    assert res.stderr.strip().splitlines()[-1].startswith("pacsvault: error: ")
    checks = events(vault, "backup.verify")
    assert checks[-1]["outcome"] != "success" and checks[0]["outcome"] == "success"


SPY = """#!/bin/sh
# restic, but first a copy of the staging directory as it is while a backup runs
for arg in "$@"; do
  if [ "$arg" = ".backup-staging" ]; then cp -a .backup-staging "{dest}/staging-$$"; fi
done
exec {restic} "$@"
"""


@pytest.mark.slow
def test_phi_scan_of_repository_cache_and_staging(tmp_path: Path, fresh: VaultDir,
                                                  files: list[corpus.CorpusFile]) -> None:
    vault = copy_of(fresh, tmp_path / "v")
    vault.add_node(MODALITY)
    repo = tmp_path / "repo"
    seen = tmp_path / "seen"
    seen.mkdir()
    spy = tmp_path / "restic-spy"
    spy.write_text(SPY.format(dest=seen, restic=RESTIC))
    spy.chmod(0o700)
    add_target(vault, repo, binary=str(spy))
    server = start_server(vault)
    try:
        send_corpus(server.port, files)
        vault.cli("backup", "init")
        vault.cli("backup", "run")
    finally:
        server.stop()
    staged = list(seen.iterdir())
    assert staged and (staged[0] / "index.db").exists()
    assert not (vault.data / ".backup-staging").exists()  # deleted after the run
    needles = [s.encode() for s in corpus.secrets_of(files)]
    needles += [s.encode("utf-16-le") for s in corpus.secrets_of(files)]
    needles += [f.sop_uid.encode() for f in files] + [f.study_uid.encode() for f in files]
    scanned = 0
    for root in (repo, vault.data / ".backup-cache", seen):
        for path in root.rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                scanned += 1
                for needle in needles:
                    assert needle not in data, f"{needle!r} in clear in {path}"
    assert scanned > 10
    assert any((vault.data / ".backup-cache").rglob("*"))  # the cache was scanned


@pytest.mark.slow
def test_destroyed_key_unreadable_in_older_snapshot(tmp_path: Path, fresh: VaultDir,
                                                    files: list[corpus.CorpusFile]) -> None:
    from pacsvault.backup import runner

    vault = copy_of(fresh, tmp_path / "v")
    vault.add_node(MODALITY)
    repo = tmp_path / "repo"
    add_target(vault, repo)
    server = start_server(vault)
    try:
        send_corpus(server.port, files[:3])
    finally:
        server.stop()
    # an object committed but not yet published (still in objects/.spare) is backed up
    v = vault.open()
    try:
        pending = next(i for i in v.archive.locate() if i.sop_uid == files[2].sop_uid)
        spare = vault.data / "objects" / ".spare"
        spare.mkdir(exist_ok=True)
        os.replace(v.objects.path(pending.object_id), spare / f"{pending.object_id}.part")
    finally:
        v.close()
    vault.cli("backup", "init")
    vault.cli("backup", "run")
    assert [e["outcome"] for e in events(vault, "backup.run")] == ["success"]
    erased = files[1]
    vault.cli("study", "delete", erased.study_uid, "--reason", "test erasure", "--yes")
    v = vault.open()
    try:
        from pacsvault.index.models import DataKey
        with v.sessions() as s:
            assert s.query(DataKey).filter(DataKey.wrapped.is_(None)).count() == 1
        listing = runner._repo(v, runner._target(v, "usb")).run(
            ["ls", "--tag", "data", "latest"]).stdout.decode()
        assert "/objects/.spare" not in listing and "/objects/.tmp" not in listing
        assert f"pending-objects/{pending.object_id}.part" in listing
        assert runner.keys_destroyed(v) == {"usb": "ok"}
        kinds = [s.kind for s in runner.list_snapshots(v, "usb")]
    finally:
        v.close()
    assert kinds.count("keystore") == 1 and kinds.count("data") == 1

    # the data snapshot taken BEFORE the erasure still holds the patient's objects
    new, new_key = tmp_path / "new", tmp_path / "k" / "master.key"
    result = runner.restore(str(repo), None, vault.recovery_code, new, new_key)
    assert result.keys_absent == 1 and result.keys_restored == 2
    assert result.objects_missing == 0
    assert (new / "objects" / pending.object_id[:2] / pending.object_id[2:4]
            / f"{pending.object_id}.pvo").exists()
    from pacsvault.crypto.keyring import KeyDestroyed
    from pacsvault.vault import Vault

    restored = Vault.open(new, new_key)
    try:
        items = list(restored.archive.locate())
        assert len(items) == 3
        for item in items:
            if item.sop_uid == erased.sop_uid:
                with pytest.raises(KeyDestroyed):
                    restored.archive.read(item)
            else:
                assert restored.archive.read(item)[128:132] == b"DICM"
    finally:
        restored.close()


@pytest.mark.slow
def test_backup_while_storescu_sends_200(tmp_path: Path, fresh: VaultDir) -> None:
    from pacsvault.backup import runner
    from pacsvault.vault import Vault

    vault = copy_of(fresh, tmp_path / "v")
    vault.add_node(MODALITY)
    repo = tmp_path / "repo"
    add_target(vault, repo)
    series = corpus.synthetic_ct_series(tmp_path / "ct", 200, size=64)
    vault.cli("backup", "init")
    server = start_server(vault)
    try:
        result: dict[str, Any] = {}
        sender = threading.Thread(target=lambda: result.update(
            res=storescu(server.port, series, calling=MODALITY, timeout=300)))
        sender.start()
        watcher = vault.open()
        try:  # back up once a quarter of the images are acknowledged
            deadline = time.monotonic() + 120
            while watcher.archive.counts()["instances"] < 50 and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            watcher.close()
        first = vault.cli("backup", "run", timeout=300)
        sender.join(300)
        assert result["res"].returncode == 0, result["res"].stderr
        second = vault.cli("backup", "run", timeout=300)
    finally:
        server.stop()
    snap1 = first.stdout.split("snapshot ")[1].split(",")[0]
    snap2 = second.stdout.split("snapshot ")[1].split(",")[0]
    v = vault.open()
    try:
        live = digests(v)
    finally:
        v.close()
    assert len(live) == 200

    counts = []
    for n, snap in enumerate((snap1, snap2)):
        new, key = tmp_path / f"r{n}", tmp_path / f"k{n}" / "master.key"
        runner.restore(str(repo), None, vault.recovery_code, new, key, snap)
        restored = Vault.open(new, key)
        try:
            got = digests(restored)  # every indexed object present and authenticating
            assert restored.audit.verify().ok
        finally:
            restored.close()
        assert all(live[uid] == digest for uid, digest in got.items())
        counts.append(len(got))
    # everything acknowledged after the first snapshot is in the next one
    print(f"instances in the snapshot taken during the transfer: {counts[0]}/200; "
          f"runs: {first.stdout.strip()} | {second.stdout.strip()}")
    assert counts[1] == 200 and 50 <= counts[0] <= 200


@pytest.mark.slow
def test_older_vault_init_needs_the_recovery_code_and_rotation_adds_the_new_one(
        tmp_path: Path, fresh: VaultDir) -> None:
    from pacsvault.backup import state
    from pacsvault.backup.restic import Repository, WrongPassword
    from pacsvault.crypto import keys
    from pacsvault.vault import Layout, update_meta

    vault = copy_of(fresh, tmp_path / "v")
    repo, away = tmp_path / "repo", tmp_path / "unplugged" / "repo"
    add_target(vault, repo)
    add_target(vault, away, name="offsite")
    # a vault made before backups existed has no recovery password
    update_meta(Layout(vault.data),
                lambda meta: meta["secrets"].pop("backup-recovery-password"))  # type: ignore
    res = vault.cli("backup", "init", "--target", "usb", check=False)
    assert res.returncode == 2 and "recovery code" in res.stderr.splitlines()[-1]
    wrong = private_file(tmp_path / "wrong.txt", keys.new_recovery_code())
    res = vault.cli("backup", "init", "--target", "usb", "--recovery-code-file", wrong,
                    check=False)
    assert res.returncode == 2 and "does not open this vault" in res.stderr
    assert not repo.exists()
    loose = tmp_path / "loose.txt"
    loose.write_text(vault.recovery_code)
    loose.chmod(0o644)
    res = vault.cli("backup", "init", "--recovery-code-file", loose, check=False)
    assert res.returncode == 2 and "chmod 600" in res.stderr
    right = private_file(tmp_path / "right.txt", vault.recovery_code)
    vault.cli("backup", "init", "--target", "usb", "--recovery-code-file", right)
    Repository(str(repo), keys.backup_recovery_password(vault.recovery_code)).snapshots()

    vault.cli("backup", "init", "--target", "offsite")
    Repository(str(away), keys.backup_recovery_password(vault.recovery_code)).snapshots()
    layout = Layout(vault.data)

    def registered() -> tuple[str, str]:
        targets = state.load_state(layout)["targets"]
        return targets["usb"]["recovery_key"], targets["offsite"]["recovery_key"]

    old_usb, old_offsite = registered()

    # a key rotation replaces the recovery password in vault.json and touches no
    # repository: each gets the new code's key at its next run, one out of reach then at
    # the run after
    new_code = rotate_keys(vault)
    with pytest.raises(WrongPassword):
        Repository(str(repo), keys.backup_recovery_password(new_code)).snapshots()
    plugged_off = away.parent.rename(tmp_path / "drawer")
    res = vault.cli("backup", "run", check=False)
    assert res.returncode != 0 and "usb: snapshot" in res.stdout \
        and "offsite: FAILED" in res.stdout
    Repository(str(repo), keys.backup_recovery_password(new_code)).snapshots()
    Repository(str(repo), keys.backup_recovery_password(vault.recovery_code)).snapshots()
    new_usb, offsite_now = registered()
    assert new_usb != old_usb and offsite_now == old_offsite
    plugged_off.rename(away.parent)
    with pytest.raises(WrongPassword):
        Repository(str(away), keys.backup_recovery_password(new_code)).snapshots()
    vault.cli("backup", "run")
    Repository(str(away), keys.backup_recovery_password(new_code)).snapshots()
    Repository(str(away), keys.backup_recovery_password(vault.recovery_code)).snapshots()
    with pytest.raises(WrongPassword):
        Repository(str(repo), keys.backup_recovery_password(keys.new_recovery_code())
                   ).snapshots()
    assert registered()[0] == new_usb and registered()[1] not in (old_offsite, new_usb)
    # the state file names the registered password without holding it
    text = state.state_path(layout).read_text()
    assert keys.backup_recovery_password(new_code).decode() not in text
    assert keys.backup_recovery_password(vault.recovery_code).decode() not in text


@pytest.mark.slow
def test_prune_keeps_the_latest_and_runs_exclude_each_other(tmp_path: Path,
                                                           fresh: VaultDir) -> None:
    from pacsvault.backup import runner

    vault = copy_of(fresh, tmp_path / "v")
    add_target(vault, tmp_path / "repo")
    vault.set_toml("backup", "keep_daily", "1")
    vault.set_toml("backup", "keep_weekly", "0")
    vault.set_toml("backup", "keep_monthly", "0")
    vault.set_toml("backup", "keep_yearly", "0")
    vault.cli("backup", "init")
    vault.cli("backup", "run")
    vault.cli("backup", "run")
    listing = vault.cli("backup", "list").stdout
    assert listing.count(" data") == 2 and listing.count(" keystore") == 1
    vault.cli("backup", "prune")
    listing = vault.cli("backup", "list").stdout
    assert listing.count(" data") == 1 and listing.count(" keystore") == 1
    v = vault.open()
    try:
        with runner._exclusive(v):
            (outcome,) = runner.run_backup(v)
            assert not outcome.ok and "another backup" in (outcome.error or "")
    finally:
        v.close()


@pytest.mark.slow
def test_key_rotation_old_snapshots_with_old_code_new_ones_with_new_code(
        tmp_path: Path, fresh: VaultDir, files: list[corpus.CorpusFile]) -> None:
    from pacsvault.backup import runner
    from pacsvault.backup.restic import Repository, WrongPassword
    from pacsvault.crypto import keys
    from pacsvault.vault import Vault

    vault = copy_of(fresh, tmp_path / "v")
    vault.add_node(MODALITY)
    repo = tmp_path / "repo"
    add_target(vault, repo)
    server = start_server(vault)
    try:
        send_corpus(server.port, files[:2])
    finally:
        server.stop()
    vault.cli("backup", "init")
    before = vault.cli("backup", "run").stdout.split("snapshot ")[1].split(",")[0]
    new_code = rotate_keys(vault)  # offline: the rotation itself touches no repository
    assert new_code != vault.recovery_code
    with pytest.raises(WrongPassword):
        Repository(str(repo), keys.backup_recovery_password(new_code)).snapshots()
    # a drill now would test a snapshot the new recovery sheet cannot open: said plainly
    early = vault.cli("backup", "drill", check=False)
    assert early.returncode == 1 and "recovery code changed" in early.stdout + early.stderr
    after = vault.cli("backup", "run").stdout.split("snapshot ")[1].split(",")[0]
    vault.cli("backup", "drill")  # the run registered the new code's key: the drill passes

    def restore(code: str, snapshot: str, n: int) -> dict[str, str]:
        to, key = tmp_path / f"r{n}", tmp_path / f"k{n}" / "master.key"
        runner.restore(str(repo), None, code, to, key, snapshot)
        v = Vault.open(to, key)
        try:
            return digests(v)
        finally:
            v.close()

    old = restore(vault.recovery_code, before, 1)  # the recovery sheet of that time
    new = restore(new_code, after, 2)  # the run after the rotation added the new code
    assert old == new and len(new) == 2
    with pytest.raises(runner.BackupError, match="before a key rotation"):
        restore(new_code, before, 3)
    assert not (tmp_path / "r3").exists() and not (tmp_path / "k3").exists()
