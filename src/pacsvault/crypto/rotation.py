"""Master key rotation (``pacsvault keys rotate``), online or offline, resumable.

Why: a master key that may have leaked (a copied key file, a departed admin) must become
useless on the live vault without stopping the archive. Everything the master key protects
is moved under a new random master key:

- every wrapped data key (``data_keys``: unwrapped with the old KEK, wrapped with the new;
  data keys themselves, hence every object file, are unchanged);
- the SQLCipher key of the index (``PRAGMA rekey``: works with WAL on this build, measured);
- the PKCS#8 passwords of every ``tls/**/*.key.enc`` (retired CAs included);
- TOTP secrets (sealed under the accounts key): every second factor keeps working;
- ``vault.json``: key check, a NEW recovery code, every named secret re-wrapped (values
  unchanged: a backup repository keeps its password) and the old *events* key kept as the
  named secret ``audit-events-retired/<time>`` so ``audit show`` still unseals the
  references of older trail records;
- the syslog export queue (re-encrypted in place);
- the trail's signing key: a ``keys.rotated`` record signed by the OLD key names the new
  public key; verification follows the hand-over (``audit/trail.py``).

Crash safety: the new key goes first to ``<key>.new`` (0600, fsync'ed) and a ``rotation``
marker into ``vault.json``; every step is idempotent (a data key that opens with the new KEK
is done, a TLS key that opens with the new password is done, the index opens with one key or
the other...). ``Vault.open`` finding the marker completes the rotation with whichever key
file opens the vault before anything else. Last, ``<key>.new`` replaces the key file
(rename) and ``vault.json`` gets the new key check and recovery blob in one atomic write.

Residuals (documented in ARCHITECTURE.md): the old key file still opens *copies* taken
before the rotation (backups: that is what keeps them restorable with the old recovery
code) and, with the trail, reveals the sealed references of records written before it.
Throttling counters keyed by an HMAC of typed sign-in names restart at rotation.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import text

from pacsvault.crypto import datakeys, keys
from pacsvault.fsutil import fsync_dir, write_atomic, write_private_new

if TYPE_CHECKING:
    from pacsvault.config import Settings
    from pacsvault.crypto.protection import PassphraseProvider
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
    retired_key_file: str = ""
    online: bool = False
    resumed: bool = False
    paused_seconds: float = 0.0  # how long commits waited (the critical part)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {"data_keys": self.data_keys, "totp": self.totp, "tls_keys": self.tls_keys,
                "secrets": self.secrets, "queued": self.queued,
                "retired_key_file": self.retired_key_file, "online": self.online,
                "resumed": self.resumed, "paused_seconds": round(self.paused_seconds, 3)}


def new_key_path(key_path: Path) -> Path:
    return key_path.with_name(key_path.name + ".new")


def _crash_point(step: str) -> None:
    if os.environ.get(CRASH_ENV) == step:
        log.warning("test hook: stopping the rotation after %s", step)
        os._exit(70)


def _crash_after_keys() -> int | None:
    value = os.environ.get(CRASH_ENV, "")
    if value.startswith("data-keys:"):
        return int(value.split(":", 1)[1])
    return None


def public_hex(signing_seed: bytes) -> str:
    return Ed25519PrivateKey.from_private_bytes(signing_seed).public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def retired_event_keys(master: keys.MasterKey, vault_id: str,
                       meta: dict[str, object]) -> tuple[bytes, ...]:
    """The events keys of earlier master keys (named secrets), newest first: the trail
    tries them for records sealed before a rotation."""
    table = meta.get("secrets")
    if not isinstance(table, dict):
        return ()
    found: list[bytes] = []
    for name in sorted(table, reverse=True):
        if name.startswith(RETIRED_EVENTS_PREFIX) and isinstance(table[name], str):
            with contextlib.suppress(keys.VaultKeyError, ValueError):
                found.append(keys.unwrap_secret(master, vault_id, name, table[name]))
    return tuple(found)



def _write_key(old_path: Path, path: Path, master: keys.MasterKey, vault_id: str,
               passphrase: str | None) -> None:
    """The new key file, protected like the old one (``crypto.protection``)."""
    try:
        from pacsvault.crypto.protection import rewrite_key_file_like
    except ImportError:  # pragma: no cover - protection not installed
        path.unlink(missing_ok=True)
        keys.write_key_file(path, master, vault_id)
        return
    rewrite_key_file_like(old_path, path, master, vault_id, passphrase)
    os.chmod(path, 0o600)
    fsync_dir(path.parent)


def _load(path: Path, vault_id: str, passphrase: PassphraseProvider | None) -> keys.MasterKey:
    try:
        from pacsvault.crypto.protection import load_master
    except ImportError:  # pragma: no cover
        master, owner = keys.read_key_file(path)
        if owner != vault_id:
            raise RotationError(f"{path} belongs to another vault") from None
        return master
    return load_master(path, vault_id, passphrase)


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
            exists = conn.execute(text(
                "SELECT name FROM sqlite_master WHERE type='table' AND name='user_totp'")).first()
            if exists is None:
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
        from pacsvault.vault import update_meta

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

        update_meta(self.vault.layout, change)
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
        connection opened with the old key."""
        from pacsvault.index.db import gate_of, opens_with, rekey

        engine = self.vault.engine
        path = self.vault.layout.index
        new_key = self._d(self.new, keys.PURPOSE_INDEX)
        if self.outcome.resumed and opens_with(path, new_key):
            gate_of(engine).set_key(new_key)  # rekeyed already (an interrupted run)
            return
        old_key = self._d(self.old, keys.PURPOSE_INDEX)
        if not rekey(engine, old_key, new_key):
            log.warning("key rotation: a connection to the index was still in use when it "
                        "was re-keyed; that one request may fail once")
        _crash_point("index")
        with contextlib.suppress(Exception), engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")

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
    then ``vault.json`` gets the new key check and recovery blob and loses the marker, in
    one atomic write. A crash between the two is completed by ``Vault.open``."""
    from pacsvault.vault import update_meta

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

    def change(meta: dict[str, object]) -> None:
        meta["key_check"] = keys.make_key_check(new, vault_id)
        meta["recovery"] = keys.wrap_for_recovery(new, code, vault_id)
        meta.pop(MARKER, None)

    update_meta(layout, change)
    outcome.recovery_code = code


# --- driving it ------------------------------------------------------------------------


def _begin(vault: Vault, key_path: Path, passphrase: str | None) -> tuple[keys.MasterKey,
                                                                           dict[str, Any]]:
    """Make the new master key durable (``<key>.new``) and mark the rotation in
    ``vault.json`` before anything is changed."""
    from pacsvault.vault import _read_meta, update_meta

    meta = _read_meta(vault.layout)
    if isinstance(meta.get(MARKER), dict):
        raise RotationError("a key rotation is already in progress on this vault; it is "
                            "completed the next time the vault is opened")
    pending = new_key_path(key_path)
    pending.unlink(missing_ok=True)  # no marker: a leftover of a run that changed nothing
    new = keys.MasterKey.generate()
    try:
        _write_key(key_path, pending, new, vault.vault_id, passphrase)
    except OSError as exc:
        raise RotationError(
            f"cannot write the new key file {pending} ({exc.strerror or exc}); the rotation "
            "needs to write beside the key file: run it as a user who may (with the server "
            "stopped if the server may not). Nothing was changed") from None
    marker: dict[str, Any] = {
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "new_key_check": keys.make_key_check(new, vault.vault_id),
        "new_signing_key": public_hex(new.derive(keys.PURPOSE_AUDIT_SIGNING, vault.vault_id)),
        "old_signing_key": public_hex(vault._master.derive(keys.PURPOSE_AUDIT_SIGNING,
                                                           vault.vault_id)),
    }

    def mark(m: dict[str, object]) -> None:
        m[MARKER] = marker

    update_meta(vault.layout, mark)
    _crash_point("begin")
    return new, marker


@contextlib.contextmanager
def _paused(vault: Vault) -> Iterator[None]:
    """Hold what writes under the keys: named secrets, the archive's commits (group-commit
    lock: stores wait, then continue), and, inside ``AuditTrail.rotate_keys``, the trail."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(vault._secret_lock)
        archive = vault._archive
        if archive is not None:
            stack.enter_context(archive._write_lock)
        yield


def run(vault: Vault, key_path: Path, new: keys.MasterKey, marker: dict[str, Any], *,
        actor: str, keep_old: bool, online: bool, resumed: bool = False) -> Outcome:
    """Every step, idempotent, then the files. ``vault`` ends up on the new key."""
    from pacsvault.audit.events import AuditEvent, EventCode
    from pacsvault.audit.events import Outcome as EventOutcome
    from pacsvault.audit.trail import TrailKeys

    rot = Rotation(vault, key_path, new, marker)
    out = rot.outcome
    out.online, out.resumed = online, resumed
    new_trail = TrailKeys(
        signing_seed=new.derive(keys.PURPOSE_AUDIT_SIGNING, vault.vault_id),
        sealing_key=new.derive(keys.PURPOSE_EVENTS, vault.vault_id),
        retired_sealing=(rot._d(rot.old, keys.PURPOSE_EVENTS),
                         *vault.audit.keys.retired_sealing),
    )
    with _paused(vault):
        began = time.monotonic()
        archive = vault._archive
        if archive is not None:
            archive._keyring.also_accept(rot._d(new, keys.PURPOSE_KEK))
        out.data_keys = rot.data_keys()
        _crash_point("data-keys")
        out.totp = rot.totp()
        out.secrets = rot.secrets()
        out.tls_keys = rot.tls_keys()
        out.queued = rot.syslog_queue()
        _crash_point("files")
        event = None
        if not rot.trail_done():
            event = AuditEvent(
                action=ROTATED_ACTION, outcome=EventOutcome.SUCCESS,
                code=EventCode.SECURITY_ALERT, actor_user=actor,
                message="the master key was rotated: data keys re-wrapped, index re-keyed, "
                        "derived keys replaced; this record is signed by the old audit key "
                        "and names the new one",
                detail={"old_signing_key": str(marker["old_signing_key"]),
                        "new_signing_key": str(marker["new_signing_key"]),
                        "data_keys": out.data_keys, "totp": out.totp,
                        "tls_keys": out.tls_keys, "online": online, "resumed": resumed},
            )
        vault.audit.rotate_keys(new_trail, event, before=rot.index)
        _crash_point("trail")
        rot.memory()
        out.paused_seconds = time.monotonic() - began
    rot.finish(keep_old=keep_old)
    _handed_to_backups(vault, out.recovery_code)
    return out


def _handed_to_backups(vault: Vault, code: str) -> None:
    """Old backups keep their own vault.json (restorable with the old code); the backup
    module may re-key what it derives from the recovery code."""
    try:
        from pacsvault.backup import runner
    except ImportError:
        return
    hook: Callable[[Vault, str], None] | None = getattr(runner, "recovery_code_changed", None)
    if hook is None:
        return
    try:
        hook(vault, code)
    except NotImplementedError:
        pass
    except Exception as exc:  # the rotation is done; say so, don't undo it
        log.error("backup: recovery code change not applied (%s)", type(exc).__name__)


def rotate(vault: Vault, *, actor: str = "local-admin", keep_old: bool = False,
           passphrase: str | None = None, online: bool = False) -> Outcome:
    """Rotate an open vault's master key (the caller holds the vault: offline with the
    vault lock, online inside ``serve``)."""
    key_path = vault.key_path
    if key_path is None:
        raise RotationError("this vault was not opened from a key file")
    new, marker = _begin(vault, key_path, passphrase)
    return run(vault, key_path, new, marker, actor=actor, keep_old=keep_old, online=online)


def complete_pending(layout: Layout, settings: Settings, meta: dict[str, object],
                     key_path: Path, passphrase: PassphraseProvider | None) -> Outcome | None:
    """Called by ``Vault.open`` when ``vault.json`` has a rotation marker: finish it with
    whichever key file opens the vault, before anything else reads or writes."""
    from pacsvault.index.db import IndexOpenError, open_index
    from pacsvault.index.nodes import ensure_tables
    from pacsvault.vault import Vault

    marker = meta.get(MARKER)
    if not isinstance(marker, dict):
        return None
    vid = str(meta["vault_id"])
    current = _load(key_path, vid, passphrase)
    out = Outcome(recovery_code="", resumed=True)
    if keys.verify_key_check(current, vid, str(marker.get("new_key_check", ""))):
        # The key file was replaced already: only vault.json is left to finish.
        finish_files(layout, key_path, current, vid, keep_old=False, outcome=out)
        engine = open_index(layout.index, current.derive(keys.PURPOSE_INDEX, vid))
        vault = Vault(layout, settings, vid, current, engine)
        try:
            _handed_to_backups(vault, out.recovery_code)
        finally:
            vault.close()
    else:
        if not keys.verify_key_check(current, vid, str(meta["key_check"])):
            raise keys.VaultKeyError(f"the key file {key_path} does not open this vault (it "
                                     "belongs to another vault or is damaged); nothing was "
                                     "changed")
        pending = new_key_path(key_path)
        if not pending.exists():
            raise RotationError(
                f"a key rotation was interrupted and its new key file {pending} is missing; "
                "restore that file (or the whole key directory) from where it was copied. "
                "Nothing was changed")
        new = _load(pending, vid, passphrase)
        if not keys.verify_key_check(new, vid, str(marker.get("new_key_check", ""))):
            raise RotationError(f"{pending} is not the key this rotation started with")
        try:
            engine = open_index(layout.index, current.derive(keys.PURPOSE_INDEX, vid))
        except IndexOpenError:
            engine = open_index(layout.index, new.derive(keys.PURPOSE_INDEX, vid))
        ensure_tables(engine)
        vault = Vault(layout, settings, vid, current, engine)
        vault.key_path = key_path
        try:
            out = run(vault, key_path, new, marker, actor="pacsvault", keep_old=False,
                      online=False, resumed=True)
        finally:
            vault.close()
    log.warning("an interrupted master key rotation was completed")
    try:
        where = hand_over_code(key_path, layout.root, out.recovery_code)
        log.warning("the new recovery code was written to %s", where)
    except (OSError, RotationError) as exc:
        log.error("the new recovery code could not be written beside the key (%s): run "
                  "'pacsvault keys rotate' again to get one", type(exc).__name__)
    return out


def hand_over_code(key_path: Path, root: Path, code: str) -> Path:
    """The new recovery code goes to a 0600 file beside the key (never the data dir), as
    ``init`` does; it is printed only when stdout is a terminal."""
    from pacsvault.cli.setup import _private_dir

    folder = _private_dir(key_path.parent)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    body = (
        f"# pacsvault: the NEW recovery code of the vault in {root.resolve()}, after the\n"
        f"# master key rotation of {stamp} UTC. Readable by you only.\n"
        "# Write it down on paper, keep it away from this server, then delete this file.\n"
        "# Backups taken before the rotation still restore with the OLD recovery code.\n"
        f"recovery code: {code}\n"
    )
    path = write_private_new(
        folder, (f"{key_path.stem}.rotated-{stamp}{'' if n == 1 else f'-{n}'}.recovery.txt"
                 for n in range(1, 100)), body)
    if path is None:
        raise RotationError(f"cannot write the new recovery code in {folder}")
    return path



_ONE_AT_A_TIME = threading.Lock()


def control_handler(vault: Vault) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """``serve``'s "rotate" command (``service.control``): the rotation runs in the
    server's process while it keeps storing (commits wait for the critical part)."""
    from pacsvault.service.control import ControlError

    def handle(args: dict[str, Any]) -> dict[str, Any]:
        if not _ONE_AT_A_TIME.acquire(blocking=False):
            raise ControlError("a key rotation is already running")
        try:
            passphrase = args.get("passphrase")
            out = rotate(vault, actor=str(args.get("actor") or "local-admin"),
                         keep_old=bool(args.get("keep_old")),
                         passphrase=passphrase if isinstance(passphrase, str) else None,
                         online=True)
        except keys.VaultKeyError as exc:
            raise ControlError(str(exc)) from None
        except Exception as exc:
            # Part of the vault may be under the new key already: the marker stays, and
            # the next open (a restart) completes the rotation.
            log.critical("the key rotation stopped part-way (%s); restart the server to "
                         "complete it", type(exc).__name__)
            raise ControlError(f"the rotation stopped part-way ({type(exc).__name__}); "
                               "restart the server: it completes the rotation at start") \
                from None
        finally:
            _ONE_AT_A_TIME.release()
        assert vault.key_path is not None
        try:
            where = str(hand_over_code(vault.key_path, vault.layout.root, out.recovery_code))
        except (OSError, RotationError) as exc:  # the CLI writes it then
            log.error("the new recovery code could not be written beside the key (%s)",
                      type(exc).__name__)
            where = ""
        log.warning("the master key was rotated (%d data keys; commits paused %.2f s)%s",
                    out.data_keys, out.paused_seconds,
                    f"; new recovery code written to {where}" if where else "")
        return {**out.summary(), "recovery_code": out.recovery_code, "code_file": where}

    return handle
