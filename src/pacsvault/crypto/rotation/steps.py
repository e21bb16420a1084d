"""The steps of a master key rotation: each store the master key protects, moved to the
new key (``Rotation``), and the final hand-over of the key file and ``vault.json``
(``finish_files``). Every step is idempotent, so an interrupted rotation is completed by
running them again (``rotation.run``, driven by ``rotation/__init__``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives import serialization
from sqlalchemy import inspect, text

from pacsvault import vaultfile
from pacsvault.crypto import datakeys, keys
from pacsvault.fsutil import fsync_dir, write_atomic

if TYPE_CHECKING:
    from pacsvault.vault import Layout, Vault

log = logging.getLogger("pacsvault.rotation")

MARKER = "rotation"
RETIRED_EVENTS_PREFIX = "audit-events-retired/"
ROTATED_ACTION = "keys.rotated"
# Tests only: stop the process (exit 70) after this step, or after N data keys
# ("data-keys:N"), to prove the rotation resumes.
CRASH_ENV = "PACSVAULT_TEST_ROTATION_CRASH"
_CHUNK = 256


class RotationError(keys.VaultKeyError):
    """The rotation cannot proceed (message is user-facing)."""


@dataclass
class Outcome:
    """What a rotation did (no secret except the recovery code, shown once)."""

    recovery_code: str
    data_keys: int = 0
    totp: int = 0
    tls_keys: int = 0
    secrets: int = 0
    queued: int = 0
    index_rows: int = 0  # PostgreSQL: rows whose sealed columns were re-encrypted
    retired_key_file: str = ""
    online: bool = False
    resumed: bool = False
    paused_seconds: float = 0.0  # how long commits waited (the critical part)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {"data_keys": self.data_keys, "totp": self.totp, "tls_keys": self.tls_keys,
                "secrets": self.secrets, "queued": self.queued,
                "index_rows": self.index_rows,
                "retired_key_file": self.retired_key_file, "online": self.online,
                "resumed": self.resumed, "paused_seconds": round(self.paused_seconds, 3)}


def new_key_path(key_path: Path) -> Path:
    return key_path.with_name(key_path.name + ".new")


def _crash_point(step: str) -> None:
    if os.environ.get(CRASH_ENV) == step:
        log.warning("test hook: stopping the rotation after %s", step)
        os._exit(70)


def _crash_after_keys(step: str = "data-keys") -> int | None:
    value = os.environ.get(CRASH_ENV, "")
    if value.startswith(step + ":"):
        return int(value.split(":", 1)[1])
    return None


# --- the steps ------------------------------------------------------------------------


class Rotation:
    """One rotation of an open vault from its current master key to ``new``."""

    def __init__(self, vault: Vault, key_path: Path, new: keys.MasterKey,
                 marker: dict[str, Any]) -> None:
        self.vault = vault
        self.key_path = key_path
        self.old = vault._master
        self.new = new
        self.marker = marker
        self.vid = vault.vault_id
        self.outcome = Outcome(recovery_code="")

    # derived keys, old and new
    def _d(self, master: keys.MasterKey, purpose: str) -> bytes:
        return master.derive(purpose, self.vid)

    def data_keys(self) -> int:
        """Re-wrap every data key (AES-GCM under the KEK; sealed-mode keys, algorithm 2,
        are left to the sealed-mode private key, itself a named secret)."""
        old_kek, new_kek = self._d(self.old, keys.PURPOSE_KEK), self._d(self.new, keys.PURPOSE_KEK)
        limit = _crash_after_keys()
        done = 0
        engine = self.vault.engine
        with engine.connect() as conn:
            rows = conn.execute(text(
                "SELECT key_id, wrapped FROM data_keys WHERE wrapped IS NOT NULL")).all()
        pending: list[tuple[str, bytes]] = []
        for key_id, wrapped in rows:
            wrapped = bytes(wrapped)
            if not wrapped or wrapped[0] != datakeys.WRAP_AESGCM_KEK_V1:
                continue
            kid = uuid.UUID(str(key_id))
            try:
                datakeys.unwrap(new_kek, kid, wrapped)
                continue  # done by an interrupted run
            except datakeys.DataKeyError:
                pass
            try:
                key = datakeys.unwrap(old_kek, kid, wrapped)
            except datakeys.DataKeyError:
                raise RotationError(f"data key {key_id} opens with neither the old nor the "
                                    "new key; nothing more was changed") from None
            pending.append((str(key_id), datakeys.wrap(new_kek, kid, key)))
        chunk = min(_CHUNK, limit) if limit else _CHUNK
        for start in range(0, len(pending), chunk):
            part = pending[start:start + chunk]
            with engine.begin() as conn:
                for key_id, wrapped in part:
                    conn.execute(text("UPDATE data_keys SET wrapped = :w WHERE key_id = :k "
                                      "AND wrapped IS NOT NULL"), {"w": wrapped, "k": key_id})
            done += len(part)
            if limit is not None and done >= limit:  # test hook "data-keys:N"
                log.warning("test hook: stopping the rotation after %d data keys", done)
                os._exit(70)
        return done

    def totp(self) -> int:
        """Re-seal every TOTP secret (same secret: the users' authenticator apps keep
        working) under the new accounts key."""
        from pacsvault.accounts import totp as totp_mod

        old_key = self._d(self.old, keys.PURPOSE_ACCOUNTS)
        new_key = self._d(self.new, keys.PURPOSE_ACCOUNTS)
        done = 0
        with self.vault.engine.begin() as conn:
            if not inspect(conn).has_table("user_totp"):  # SQLite or PostgreSQL
                return 0
            for pk, user_pk, sealed in conn.execute(
                    text("SELECT pk, user_pk, sealed FROM user_totp")).all():
                sealed = bytes(sealed)
                try:
                    totp_mod.open_secret(new_key, sealed, int(user_pk))
                    continue
                except totp_mod.SecondFactorError:
                    pass
                secret = totp_mod.open_secret(old_key, sealed, int(user_pk))
                conn.execute(text("UPDATE user_totp SET sealed = :s WHERE pk = :p"),
                             {"s": totp_mod.seal_secret(new_key, secret, int(user_pk)),
                              "p": pk})
                done += 1
        return done

    def tls_keys(self) -> int:
        """Re-encrypt every PKCS#8 key under ``tls/`` (retired CAs too: the old master key
        must open none of them). Loaded TLS contexts keep their keys in memory."""
        root = self.vault.layout.tls.root
        old_pw = self._d(self.old, keys.PURPOSE_TLS).hex().encode("ascii")
        new_pw = self._d(self.new, keys.PURPOSE_TLS).hex().encode("ascii")
        done = 0
        for path in sorted(root.rglob("*.key.enc")):
            data = path.read_bytes()
            try:
                serialization.load_pem_private_key(data, new_pw)
                continue
            except (ValueError, TypeError):
                pass
            try:
                key = serialization.load_pem_private_key(data, old_pw)
            except (ValueError, TypeError):
                self.outcome.notes.append(f"{path.name}: opens with neither key, left as is")
                continue
            body = key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(new_pw))
            write_atomic(path, body)
            done += 1
        return done

    def secrets(self) -> int:
        """Re-wrap every named secret (values unchanged) and keep the old events key, in
        one atomic ``vault.json`` write."""

        count = 0
        stamp = str(self.marker.get("started", "")).replace(":", "")
        old_events = self._d(self.old, keys.PURPOSE_EVENTS)

        def change(meta: dict[str, object]) -> None:
            nonlocal count
            table = meta.setdefault("secrets", {})
            assert isinstance(table, dict)
            for name, blob in list(table.items()):
                if not isinstance(blob, str):
                    continue
                try:
                    keys.unwrap_secret(self.new, self.vid, name, blob)
                    continue
                except (keys.VaultKeyError, ValueError):
                    pass
                value = keys.unwrap_secret(self.old, self.vid, name, blob)
                table[name] = keys.wrap_secret(self.new, self.vid, name, value)
                count += 1
            name = RETIRED_EVENTS_PREFIX + stamp
            if name not in table:
                table[name] = keys.wrap_secret(self.new, self.vid, name, old_events)
                count += 1

        vaultfile.update(self.vault.layout.meta, change)
        return count

    def syslog_queue(self) -> int:
        from pacsvault.audit.syslog import QUEUE_DIR_NAME, SyslogQueue

        old_key = self._d(self.old, keys.PURPOSE_AUDIT_EXPORT)
        new_key = self._d(self.new, keys.PURPOSE_AUDIT_EXPORT)
        sink = self.vault.syslog
        if sink is not None:
            return sink.queue.rekey(new_key)
        where = self.vault.layout.audit / QUEUE_DIR_NAME
        if not where.is_dir():
            return 0
        queue = SyslogQueue(where, old_key)
        try:
            return queue.rekey(new_key)
        finally:
            queue.close()

    def index(self) -> None:
        """``PRAGMA rekey`` behind the vault's one engine, its gate closed (``index.db``):
        queries and association checks wait the moment it takes instead of meeting a
        connection opened with the old key. On PostgreSQL: every sealed column and
        token re-encrypted (``sealed_index``)."""
        from pacsvault.index.db import gate_of, opens_with, rekey

        engine = self.vault.engine
        if self.vault.settings.index.is_postgres:
            self._sealed_index()
            return
        path = self.vault.layout.index
        new_key = self._d(self.new, keys.PURPOSE_INDEX)
        if self.outcome.resumed and opens_with(path, new_key):
            gate_of(engine).set_key(new_key)  # rekeyed already (an interrupted run)
            return
        old_key = self._d(self.old, keys.PURPOSE_INDEX)
        if not rekey(engine, old_key, new_key):
            log.warning("key rotation: a connection to the index was still in use when it "
                        "was re-keyed; that one request may fail once")
        _crash_point("index")  # (rekey truncated the WAL itself: no old-key page left)

    def _sealed_index(self) -> None:
        from pacsvault.crypto.rotation import sealed_index
        from pacsvault.index.sealing import sealer_for

        limit = _crash_after_keys("index-rows")

        def chunk_done(rows: int) -> None:
            if limit is not None and rows >= limit:  # test hook "index-rows:N"
                log.warning("test hook: stopping the rotation after %d index rows", rows)
                os._exit(70)

        engine = self.vault.engine
        held = sealed_index.readers_held(engine) if self.outcome.online \
            else contextlib.nullcontext(True)
        try:
            with held as drained:
                if not drained:
                    log.warning("key rotation: a connection to the index was still in use "
                                "when its columns were re-encrypted; that one request may "
                                "miss a row once")
                self.outcome.index_rows = sealed_index.reseal_index(
                    engine, sealer_for(self.old, self.vid), sealer_for(self.new, self.vid),
                    self.vid, limit=limit, chunk_done=chunk_done)
        except sealed_index.SealedIndexError as exc:
            raise RotationError(str(exc)) from None
        _crash_point("index")

    def trail_done(self) -> bool:
        """Whether the trail already has this rotation's record (an interrupted run)."""
        wanted = str(self.marker.get("new_signing_key", ""))
        path = self.vault.audit.path
        if not path.exists():
            return False
        needle = wanted.encode()
        with open(path, "rb") as fh:
            return any(needle in line and ROTATED_ACTION.encode() in line for line in fh)

    def memory(self) -> None:
        """The running process's keys move to the new master key."""
        vault = self.vault
        vault._master = self.new
        archive = vault._archive
        if archive is not None:
            archive._keyring.replace_kek(self._d(self.new, keys.PURPOSE_KEK))
        accounts = vault._accounts
        if accounts is not None:
            accounts.rekey(self._d(self.new, keys.PURPOSE_ACCOUNTS))
        # (the trail swapped its own keys with the rotation record)

    def finish(self, *, keep_old: bool) -> None:
        finish_files(self.vault.layout, self.key_path, self.new, self.vid, keep_old=keep_old,
                     outcome=self.outcome)


def finish_files(layout: Layout, key_path: Path, new: keys.MasterKey, vault_id: str, *,
                 keep_old: bool, outcome: Outcome) -> None:
    """The new key file takes the old one's place (rename: one or the other, never none),
    then ``vault.json`` gets the new key check, the recovery blob of a new recovery code
    and that code's backup recovery password, and loses the marker, in one atomic write.
    A crash between the two is completed by ``Vault.open``.

    The backup recovery password (``vaultfile.BACKUP_RECOVERY_SECRET``, the restic key a
    recovery code opens a repository with) changes with the code in the same write, so
    the two never disagree; rotation tells the backups nothing more. The backup runner
    sees the new password at its next run and adds it to each repository before that
    run's snapshot, the first one whose ``vault.json`` the new code opens (snapshots taken
    before keep the old code: their key stays in the repository)."""
    pending = new_key_path(key_path)
    if pending.exists():
        if keep_old and key_path.exists():
            stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
            retired = key_path.with_name(f"{key_path.name}.retired-{stamp}")
            os.link(key_path, retired)
            outcome.retired_key_file = str(retired)
        os.replace(pending, key_path)
        fsync_dir(key_path.parent)
    _crash_point("key-file")
    code = keys.new_recovery_code()
    recovery_password = keys.wrap_secret(new, vault_id, vaultfile.BACKUP_RECOVERY_SECRET,
                                         keys.backup_recovery_password(code))

    def change(meta: dict[str, object]) -> None:
        meta["key_check"] = keys.make_key_check(new, vault_id)
        meta["recovery"] = keys.wrap_for_recovery(new, code, vault_id)
        table = meta.setdefault("secrets", {})
        assert isinstance(table, dict)
        table[vaultfile.BACKUP_RECOVERY_SECRET] = recovery_password
        meta.pop(MARKER, None)

    vaultfile.update(layout.meta, change)
    outcome.recovery_code = code
