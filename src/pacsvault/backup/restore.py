"""Restoring a backup: a data snapshot combined with the latest keystore.

Why its own module: a restore runs on a new machine without a vault (only the repository,
its credentials and the recovery code) or, for a drill, with the live vault's keys into a
throw-away directory. A data key absent from the latest keystore was destroyed (erasure)
and stays unreadable in every older snapshot.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pacsvault import config
from pacsvault.backup import pgindex, s3objects
from pacsvault.backup.restic import (
    NoRepository,
    Repository,
    ResticError,
    WrongPassword,
    read_credentials,
)
from pacsvault.backup.staging import MANIFEST_FILE, _connect
from pacsvault.backup.targets import (
    _DATETIME_FORMAT,
    KEYSTORE_FILE,
    KEYSTORE_FORMAT,
    PENDING_DIR,
    REPOSITORY_SECRET,
    STAGING_DIR,
    TAG_DATA,
    TAG_INDEX,
    TAG_KEYSTORE,
    BackupError,
    _credentials_path,
    _keystore_key,
    _kind,
    _master,
    _repository_password,
    _target,
)
from pacsvault.config.index import IndexSettings
from pacsvault.crypto import datakeys, keys

if TYPE_CHECKING:
    from pacsvault.vault import Vault

log = logging.getLogger("pacsvault.backup")


@dataclass(frozen=True)
class RestoreResult:
    data_dir: Path
    key_file: Path | None  # None for a drill (the copy opens with Vault.open_copy)
    snapshot: str
    instances: int
    keys_restored: int
    keys_absent: int  # data keys destroyed since (or before) the snapshot: unreadable
    objects_missing: int  # index rows whose object the snapshot lacks (removed meanwhile)
    index_database: str = ""  # PostgreSQL: host:port/db the index was restored into
    objects_were_in_bucket: bool = False  # S3 objects, restored as local files


# --- restore ---------------------------------------------------------------------------


def _pick(snapshots: list[dict[str, Any]], wanted: str, kind: str) -> dict[str, Any]:
    of_kind = sorted((s for s in snapshots if _kind(s) == kind),
                     key=lambda s: str(s.get("time", "")))
    if not of_kind:
        raise BackupError(f"the repository holds no {kind} snapshot")
    if wanted == "latest":
        return of_kind[-1]
    found = [s for s in of_kind if str(s.get("id", "")).startswith(wanted.lower())]
    if len(found) != 1 or len(wanted) < 4:
        raise BackupError(f"no single {kind} snapshot {wanted!r} (see 'pacsvault backup "
                          "list')")
    return found[0]


def _check_target_dir(to: Path) -> None:
    if to.exists() and (not to.is_dir() or any(to.iterdir())):
        raise BackupError(f"{to} is not an empty directory; restore only into a new one")


def restore(repository: str, credentials_file: Path | None, recovery_code: str | None,
            to: Path, key_file: Path | None, snapshot: str = "latest", *,
            password: bytes | None = None, master: keys.MasterKey | None = None,
            binary: str = "restic", to_index: IndexSettings | None = None,
            pg_bin_dir: str = "") -> RestoreResult:
    """Restore a data snapshot into the empty directory ``to`` with the latest keystore.

    New machine: ``recovery_code`` opens the repository (its second key) and the
    snapshot's ``vault.json`` (the master key), and ``key_file`` is written (default: the
    usual place for this vault id). Drill: ``password`` (the repository password) and the
    live ``master``; no key file is written, open the copy with ``Vault.open_copy``.
    Nothing is written before the repository and the keystore have opened.

    A snapshot of a vault whose index is PostgreSQL (issue 16) has its index dump in a
    paired snapshot (same ``run-*`` tag): ``to_index`` names the new, empty database it is
    restored into (pg_restore), and the restored settings point at it.
    """
    if recovery_code is None and (password is None or master is None):
        raise BackupError("a recovery code is needed to restore")
    _check_target_dir(to)
    if key_file is not None and key_file.exists():
        raise BackupError(f"key file {key_file} already exists; refusing to overwrite it")
    repo_password = keys.backup_recovery_password(recovery_code) if recovery_code \
        else password
    assert repo_password is not None
    repo = Repository(repository, repo_password, read_credentials(credentials_file), binary)
    try:
        found = repo.snapshots()
    except WrongPassword:
        raise BackupError("this recovery code does not open the backup repository "
                          "(nothing was written)") from None
    except NoRepository as exc:
        raise BackupError(str(exc).replace(" (run 'pacsvault backup init')", "")) from None
    except ResticError as exc:
        raise BackupError(str(exc)) from None
    data = _pick(found, snapshot, TAG_DATA)
    # the keystore of the same vault (a repository shared by two vaults stays usable)
    store = _pick([s for s in found if s.get("hostname") == data.get("hostname")],
                  "latest", TAG_KEYSTORE)
    try:
        keystore = json.loads(repo.dump(str(store["id"]), f"/{KEYSTORE_FILE}"))
    except (ResticError, ValueError) as exc:
        raise BackupError(f"the backup keystore cannot be read ({exc})") from None
    dump = _paired_dump(found, data)
    if dump is not None and to_index is None:
        raise BackupError("this backup's index is a PostgreSQL database: name a new, empty "
                          "database to restore it into (--to-index postgresql://...); "
                          "nothing was written")
    if dump is None and to_index is not None:
        raise BackupError("this snapshot holds an embedded index, not a PostgreSQL dump: "
                          "restore without --to-index (then 'pacsvault migrate' converts "
                          "it); nothing was written")
    pg: _PgTarget | None = None
    if dump is not None and to_index is not None:
        pg = _PgTarget(to_index, str(dump["id"]), pgindex.PgTools(pg_bin_dir))
        pgindex.check_empty(to_index)
        pg.tools.major("pg_restore")
    created = not to.exists()
    try:
        return _restore_into(repo, data, keystore, recovery_code, master, to, key_file, pg)
    except BaseException:
        if pg is not None:
            log.error("restore failed: the database %s may hold a partial index; drop and "
                      "create it again before retrying", pgindex.where(pg.settings))
        if created:
            shutil.rmtree(to, ignore_errors=True)
        elif to.is_dir():
            for child in to.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class _PgTarget:
    settings: IndexSettings
    dump_snapshot: str
    tools: pgindex.PgTools


def _paired_dump(found: list[dict[str, Any]], data: dict[str, Any]) -> dict[str, Any] | None:
    """The PostgreSQL index dump of the data snapshot's run (same host, same run tag)."""
    runs = {str(t) for t in data.get("tags") or [] if str(t).startswith("run-")}
    if not runs:
        return None
    for snap in found:
        if _kind(snap) == TAG_INDEX and snap.get("hostname") == data.get("hostname") \
                and runs & {str(t) for t in snap.get("tags") or []}:
            return snap
    return None


def _restore_into(repo: Repository, data: dict[str, Any], keystore: dict[str, Any],
                  recovery_code: str | None, master: keys.MasterKey | None, to: Path,
                  key_file: Path | None, pg: _PgTarget | None = None) -> RestoreResult:
    from pacsvault.service import lock as instance_lock
    from pacsvault.vaultfile import default_key_path

    to.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(to, 0o700)
    try:
        repo.restore(str(data["id"]), to)
    except ResticError as exc:
        raise BackupError(str(exc)) from None
    staging = to / STAGING_DIR
    if not (staging / "vault.json").is_file():
        raise BackupError("this snapshot is not a pacsvault backup (no vault.json)")
    for child in staging.iterdir():
        if child.name != PENDING_DIR:
            os.replace(child, to / child.name)
    meta = json.loads((to / "vault.json").read_text("utf-8"))
    vault_id = str(meta["vault_id"])
    if keystore.get("format") != KEYSTORE_FORMAT or keystore.get("vault_id") != vault_id:
        raise BackupError("the backup keystore belongs to another vault")
    if recovery_code is not None:
        try:
            master = keys.unwrap_with_recovery(meta["recovery"], recovery_code, vault_id)
        except keys.VaultKeyError:
            raise BackupError("this recovery code opens the repository but not this "
                              "snapshot's vault (taken before a key rotation? use the "
                              "recovery code of that time)") from None
    assert master is not None
    if not keys.verify_key_check(master, vault_id, str(meta["key_check"])):
        raise BackupError("the master key does not open this snapshot's vault")
    secret_blob = (meta.get("secrets") or {}).get(REPOSITORY_SECRET)
    if not isinstance(secret_blob, str):
        raise BackupError("this snapshot's vault.json lacks the backup repository secret")
    store_key = _keystore_key(
        keys.unwrap_secret(master, vault_id, REPOSITORY_SECRET, secret_blob), vault_id)
    kek = master.derive(keys.PURPOSE_KEK, vault_id)
    entries = keystore.get("keys") or {}
    restored = absent = missing = instances = 0

    def wrapped_for(key_id: str) -> bytes | None:
        entry = entries.get(key_id)
        if isinstance(entry, str) and entry.startswith("w:"):
            kid = uuid.UUID(key_id)
            raw = datakeys.unwrap(store_key, kid, base64.b64decode(entry[2:]))
            return datakeys.wrap(kek, kid, raw)
        if isinstance(entry, str) and entry.startswith("a:"):
            return base64.b64decode(entry[2:])
        return None  # destroyed (erased) since this snapshot, or before it

    if pg is not None:
        header, restored, absent = pgindex.restore_index(
            pg.settings, None, pg.tools,
            lambda: repo.dump_stream(pg.dump_snapshot, f"/{pgindex.DUMP_FILE}"), wrapped_for)
        if header.get("vault_id") != vault_id:
            raise BackupError("the index dump belongs to another vault")
        with pgindex.connect(pg.settings) as pconn:
            ids = [str(r[0]) for r in pconn.execute("SELECT object_id FROM instances")]
        _set_settings(to / config.CONFIG_NAME, "index", {
            "url": pg.settings.url, "password_file": pg.settings.password_file})
    else:
        restored, absent, ids = _rewrap_embedded(to, master, vault_id, wrapped_for)
    (to / MANIFEST_FILE).unlink(missing_ok=True)
    # Objects of an S3 store were backed up from their mirror: they come back as local
    # files (the restored settings say so; 'pacsvault migrate' puts them in a bucket).
    mirror = to / s3objects.MIRROR_DIR
    from_bucket = mirror.is_dir()
    if from_bucket:
        shutil.rmtree(mirror / ".tmp", ignore_errors=True)
        if (to / "objects").exists():
            shutil.rmtree(to / "objects")
        os.replace(mirror, to / "objects")
        _set_settings(to / config.CONFIG_NAME, "storage", {"url": ""})
    # Settle objects that were committed but still staged at backup time.
    objects = to / "objects"
    (objects / ".tmp").mkdir(parents=True, exist_ok=True, mode=0o700)
    pending = staging / PENDING_DIR
    if pending.is_dir():
        for part in pending.iterdir():
            object_id = part.name.removesuffix(".part")
            final = objects / object_id[:2] / object_id[2:4] / f"{object_id}.pvo"
            final.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.replace(part, final)
    shutil.rmtree(staging, ignore_errors=True)
    for object_id in ids:
        instances += 1
        if not (objects / object_id[:2] / object_id[2:4] / f"{object_id}.pvo").exists():
            missing += 1
    instance_lock.create_lock_file(to)
    written: Path | None = None
    if recovery_code is not None:
        written = key_file or default_key_path(vault_id)
        _point_settings_at(to, written)
        keys.write_key_file(written, master, vault_id)
    return RestoreResult(to, written, str(data.get("short_id") or data["id"])[:8],
                         instances, restored, absent, missing,
                         pgindex.where(pg.settings) if pg is not None else "", from_bucket)


def _rewrap_embedded(to: Path, master: keys.MasterKey, vault_id: str,
                     wrapped_for: Callable[[str], bytes | None]
                     ) -> tuple[int, int, list[str]]:
    """The embedded index: each key of the keystore re-wrapped under the restored KEK (in
    place), absent ones marked destroyed. Returns (restored, absent, object ids)."""
    restored = absent = 0
    conn = _connect(to / "index.db", master.derive(keys.PURPOSE_INDEX, vault_id).hex())
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        now = dt.datetime.now(dt.UTC).replace(tzinfo=None).strftime(_DATETIME_FORMAT)
        conn.execute("BEGIN IMMEDIATE")
        for key_id, destroyed in conn.execute(
                "SELECT key_id, destroyed FROM data_keys").fetchall():
            wrapped = wrapped_for(key_id)
            if wrapped is None:
                absent += 1
                if destroyed is None:
                    conn.execute("UPDATE data_keys SET destroyed = ? WHERE key_id = ?",
                                 (now, key_id))
                continue
            conn.execute("UPDATE data_keys SET wrapped = ? WHERE key_id = ?",
                         (wrapped, key_id))
            restored += 1
        conn.execute("COMMIT")
        ids = [str(r[0]) for r in conn.execute("SELECT object_id FROM instances")]
    finally:
        conn.close()
    return restored, absent, ids


def _set_settings(path: Path, section: str, values: dict[str, str]) -> None:
    """Set ``key = "value"`` lines of one ``[section]`` of the restored settings in place
    (comments and the rest kept); a key the section lacks is added under its header."""
    lines = path.read_text("utf-8").splitlines()
    current = ""
    todo = dict(values)
    header_at: int | None = None
    for number, line in enumerate(lines):
        stripped = line.strip()
        if stripped.startswith("[") and stripped.endswith("]"):
            current = stripped.strip("[]").strip()
            if current == section:
                header_at = number
        elif current == section and "=" in stripped and not stripped.startswith("#"):
            key = stripped.split("=", 1)[0].strip()
            if key in todo:
                lines[number] = f"{key} = {json.dumps(todo.pop(key))}"
    added = [f"{key} = {json.dumps(value)}" for key, value in todo.items()]
    if added:
        if header_at is None:
            lines += ["", f"[{section}]", *added]
        else:
            lines[header_at + 1:header_at + 1] = added
    path.write_text("\n".join(lines) + "\n", "utf-8")


def _point_settings_at(data_dir: Path, key_file: Path) -> None:
    """The restored settings may name the old machine's key file: name the new one."""
    path = data_dir / config.CONFIG_NAME
    lines = path.read_text("utf-8").splitlines()
    section = ""
    for number, line in enumerate(lines):
        stripped = line.strip()
        if stripped.startswith("[") and stripped.endswith("]"):
            section = stripped[1:-1].strip()
        elif section == "server" and stripped.startswith("key_file") and "=" in stripped:
            lines[number] = f"key_file = {json.dumps(str(key_file.resolve()))}"
    path.write_text("\n".join(lines) + "\n", "utf-8")


def drill_restore(vault: Vault, target: str, to: Path,
                  snapshot: str = "latest") -> RestoreResult:
    """Restore a target's snapshot for a restore drill, opened with the live keys: no key
    file is written; open the copy with ``vault.open_copy(to)``, check it, delete it."""
    chosen = _target(vault, target)
    return restore(chosen.repository, _credentials_path(chosen), None, to, None, snapshot,
                   password=_repository_password(vault), master=_master(vault),
                   binary=vault.settings.backup.restic_binary)
