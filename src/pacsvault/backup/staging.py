"""Staging a point-in-time copy of a vault for a backup run, and the keystore snapshot.

Why its own module: this is the part of a run that reads the live vault while ``serve``
keeps committing (``runner`` describes the whole run). The index is copied with one
``VACUUM INTO`` (one read transaction) and every wrapped data key is then removed from the
copy; the trail is cut at the record the copy anchors; objects committed but not yet
published are hard-linked. The keystore (every live data key re-wrapped under the backup
keystore key) is built from the same index.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import errno
import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import sqlcipher3

from pacsvault import config
from pacsvault.backup import pgindex, s3objects
from pacsvault.backup.targets import (
    KEYSTORE_FORMAT,
    PENDING_DIR,
    REPOSITORY_SECRET,
    STAGING_DIR,
    BackupError,
    _keystore_key,
    _master,
)
from pacsvault.crypto import datakeys, keys

if TYPE_CHECKING:
    from pacsvault.vault import Vault

log = logging.getLogger("pacsvault.backup")

MANIFEST_FILE = "backup.json"
MANIFEST_FORMAT = "pacsvault-backup-manifest/1"


@dataclass
class _Staged:
    root: Path
    anchor_seq: int
    instances: int
    pending: int
    run_tag: str = ""  # tags the data snapshot and, on PostgreSQL, its index dump
    paths: tuple[str, ...] = (STAGING_DIR, "objects")  # what the data snapshot takes
    point: pgindex.Exported | None = None  # PostgreSQL: the exported snapshot, open
    dump_major: int = 0
    stack: contextlib.ExitStack[bool | None] = field(default_factory=contextlib.ExitStack)
    # S3 store: the object ids to mirror (``s3objects.sync``), after the exported
    # snapshot is released (a first mirror of a large bucket takes long)
    mirror: list[str] | None = None

    def close(self) -> None:
        """End the exported snapshot's transaction (every dump has imported it)."""
        self.point = None
        self.stack.close()


_EPHEMERAL_TABLES = ("web_sessions", "sign_in_tickets", "webauthn_challenges")


def _index_key(vault: Vault) -> str:
    return _master(vault).derive(keys.PURPOSE_INDEX, vault.vault_id).hex()


def _connect(path: Path, key_hex: str) -> sqlcipher3.Connection:
    conn = sqlcipher3.connect(str(path), isolation_level=None, check_same_thread=False)
    conn.execute(f"PRAGMA key = \"x'{key_hex}'\"")
    conn.execute("PRAGMA busy_timeout = 30000")
    conn.execute("PRAGMA temp_store = MEMORY")  # SQLite's temp files would be clear text
    return conn


def _anchor_all(vault: Vault) -> None:
    """Every record written so far anchored before the index is copied (the copy's anchor
    cuts the trail's copy): an access recorded on the event loop is anchored within 0.5 s
    of its fsync, a deferred record too (``audit.trail_queue``). If that fails the backup
    goes on with the anchor as it is: those records belong to the next one."""
    try:
        vault.audit.anchor_all()
    except Exception as exc:
        log.warning("the audit trail could not be anchored before the backup copy (%s); "
                    "its last records go to the next backup", type(exc).__name__)


def _copy_index(vault: Vault, dest: Path) -> tuple[int, list[str]]:
    """Consistent encrypted copy of the live index without any wrapped data key; returns
    the trail anchor's seq and the object ids the copy names."""
    key_hex = _index_key(vault)
    live = _connect(vault.layout.index, key_hex)
    try:
        # One statement, one read transaction: a point in time even while serve commits.
        live.execute("VACUUM INTO ?", (str(dest),))
    finally:
        live.close()
    os.chmod(dest, 0o600)  # as the live index (VACUUM INTO follows the umask)
    copy = _connect(dest, key_hex)
    try:
        copy.execute("PRAGMA secure_delete = ON")
        copy.execute("UPDATE data_keys SET wrapped = NULL")
        # Live browser sessions, pending sign-ins and WebAuthn challenges (issue 16): a
        # restored backup signs nobody in.
        present = {r[0] for r in copy.execute("SELECT name FROM sqlite_master")}
        for table in _EPHEMERAL_TABLES:
            if table in present:
                copy.execute(f"DELETE FROM {table}")  # noqa: S608 (names from the code)
        if "audit_lines" in present:  # (embedded: lines the copied trail holds anyway,
            copy.execute("DELETE FROM audit_lines")  # ``audit.trail_journal``)
        copy.execute("VACUUM")  # rewrites every page: the old key pages are gone
        row = copy.execute("SELECT seq FROM audit_head WHERE id = 1").fetchone()
        ids = [r[0] for r in copy.execute("SELECT object_id FROM instances")]
        left = copy.execute(
            "SELECT count(*) FROM data_keys WHERE wrapped IS NOT NULL").fetchone()[0]
        if left:
            raise BackupError("the index copy still holds data keys; backup stopped")
    finally:
        copy.close()
    return (int(row[0]) if row else 0), ids


def _copy_trail(source: Path, dest: Path, anchor_seq: int) -> None:
    """The trail up to the record the index copy anchors (inclusive): what a restored
    vault verifies against its own anchor. Torn or repair lines before it stay as they
    are (their repair record describes them). Streamed: a year of trail is large."""
    dest.parent.mkdir(mode=0o700, exist_ok=True)
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        try:
            src = source.open("rb")
        except FileNotFoundError:
            return
        with src:
            held: list[bytes] = []  # lines after the last record kept, not yet written
            for line in src:
                if not line.endswith(b"\n"):  # a last line being written
                    break
                seq = _record_seq(line)
                if seq is not None and seq > anchor_seq:
                    break
                held.append(line)
                if seq is not None:
                    out.writelines(held)
                    held.clear()


def _record_seq(line: bytes) -> int | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    seq = record.get("seq") if isinstance(record, dict) else None
    return seq if isinstance(seq, int) else None


def _write_manifest(root: Path, body: dict[str, str | int]) -> None:
    """``backup.json`` in the staging: what the restore needs to know of this snapshot
    (which index, where its dump is, where the objects are). No secret, no patient."""
    fd = os.open(root / MANIFEST_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        json.dump({"format": MANIFEST_FORMAT, **body}, out, sort_keys=True)


def _stage(vault: Vault) -> _Staged:
    """The point-in-time copy. On PostgreSQL (issue 16) no index file: the exported
    snapshot (``pgindex.exported``) stays open in the returned ``_Staged`` until every
    target's dump has read it (``_Staged.close``)."""
    layout = vault.layout
    root = layout.root / STAGING_DIR
    shutil.rmtree(root, ignore_errors=True)  # a run killed before cleaning up
    root.mkdir(mode=0o700)
    stack = contextlib.ExitStack()
    point: pgindex.Exported | None = None
    try:
        if vault.settings.index.is_postgres:
            point = stack.enter_context(pgindex.exported(vault))
            tools = pgindex.PgTools(vault.settings.backup.pg_bin_dir)
            dump_major = pgindex.check_dump_version(tools, point.server_version_num)
            anchor_seq, ids = point.anchor_seq, point.object_ids
        else:
            dump_major = 0
            _anchor_all(vault)
            anchor_seq, ids = _copy_index(vault, root / "index.db")
        staged = _copy_rest(vault, root, anchor_seq, ids)
    except BaseException:
        stack.close()
        raise
    run_tag = f"run-{uuid.uuid4().hex[:16]}"
    mirrored = s3objects.is_s3(vault)  # synced by the run once the dumps are made
    _write_manifest(root, {
        "index": "postgresql" if point is not None else "embedded",
        "index_dump": pgindex.DUMP_FILE if point is not None else "",
        "run": run_tag, "objects": "mirror" if mirrored else "local",
        "instances": len(ids), "anchor_seq": anchor_seq})
    return _Staged(root, anchor_seq, len(ids), staged, run_tag,
                   paths=(STAGING_DIR, s3objects.MIRROR_DIR if mirrored else "objects"),
                   point=point, dump_major=dump_major, stack=stack,
                   mirror=ids if mirrored else None)


def _copy_rest(vault: Vault, root: Path, anchor_seq: int, ids: list[str]) -> int:
    """The trail up to the anchor, the small files, the objects still staged. Returns the
    number of pending objects hard-linked."""
    layout = vault.layout
    _copy_trail(layout.audit / "trail.jsonl", root / "audit" / "trail.jsonl", anchor_seq)
    for name in ("vault.json", config.CONFIG_NAME):
        shutil.copy2(layout.root / name, root / name)
    if (layout.root / "tls").is_dir():
        shutil.copytree(layout.root / "tls", root / "tls")
    if (layout.root / "breaches").is_dir():  # the breach register (art. 33(5)), ciphertext
        shutil.copytree(layout.root / "breaches", root / "breaches")
    pending_dir = root / PENDING_DIR
    pending_dir.mkdir(mode=0o700)
    pending = 0
    if s3objects.is_s3(vault):
        return 0  # a confirmed PUT is in its final place: nothing is ever pending
    objects = layout.objects
    for object_id in ids:
        if vault.objects.path(object_id).exists():
            continue
        for staged in (objects / ".spare" / f"{object_id}.part",
                       objects / ".tmp" / f"{object_id}.part"):
            try:
                try:
                    os.link(staged, pending_dir / f"{object_id}.part")
                except OSError as exc:
                    if exc.errno != errno.EXDEV:
                        raise
                    shutil.copy2(staged, pending_dir / f"{object_id}.part")
            except FileNotFoundError:
                continue
            pending += 1
            break
        # neither published nor staged a moment ago: published meanwhile (restic reads
        # objects/ after this), or removed by an administrator since the copy.
    return pending


# --- keystore ------------------------------------------------------------------------------


def _keystore(vault: Vault) -> bytes:
    """Every live data key, wrapped under the backup keystore key (AES-GCM, the same
    format as in the index; a key the live KEK cannot open, e.g. sealed-mode, as is)."""
    kek = _master(vault).derive(keys.PURPOSE_KEK, vault.vault_id)
    store_key = _keystore_key(vault.named_secret(REPOSITORY_SECRET), vault.vault_id)
    entries: dict[str, str] = {}
    query = "SELECT key_id, wrapped FROM data_keys WHERE wrapped IS NOT NULL"
    rows: list[tuple[str, bytes]]
    if vault.settings.index.is_postgres:
        with pgindex.connect(vault.settings.index) as conn:
            rows = [(str(k), bytes(w)) for k, w in conn.execute(query)]
    else:
        live = _connect(vault.layout.index, _index_key(vault))
        try:
            rows = [(str(k), bytes(w)) for k, w in live.execute(query).fetchall()]
        finally:
            live.close()
    for key_id, wrapped in rows:
        kid = uuid.UUID(key_id)
        try:
            raw = datakeys.unwrap(kek, kid, bytes(wrapped))
            entries[key_id] = "w:" + base64.b64encode(
                datakeys.wrap(store_key, kid, raw)).decode()
        except datakeys.DataKeyError:
            entries[key_id] = "a:" + base64.b64encode(bytes(wrapped)).decode()
    body = {"format": KEYSTORE_FORMAT, "vault_id": vault.vault_id,
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "keys": entries}
    return json.dumps(body, sort_keys=True).encode("utf-8")
