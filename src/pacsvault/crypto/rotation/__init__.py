"""Master key rotation (``pacsvault keys rotate``), online or offline, resumable.

Why: a master key that may have leaked (a copied key file, a departed admin) must become
useless on the live vault without stopping the archive. Everything the master key protects
is moved under a new random master key:

- every wrapped data key (``data_keys``: unwrapped with the old KEK, wrapped with the new;
  data keys themselves, hence every object file, are unchanged);
- the SQLCipher key of the index (``PRAGMA rekey``: works with WAL on this build, measured);
  on a PostgreSQL index every sealed column and blind token instead, in chunks
  (``sealed_index``; refused while another instance shares the index);
- the PKCS#8 passwords of every ``tls/**/*.key.enc`` (retired CAs included);
- TOTP secrets (sealed under the accounts key): every second factor keeps working;
- ``vault.json``: key check, a NEW recovery code and its backup recovery password (the
  named secret the backup runner adds to each repository at its next run), every other
  named secret re-wrapped (values unchanged: a backup repository keeps its password) and
  the old *events* key kept as the named secret ``audit-events-retired/<time>`` so
  ``audit show`` still unseals the references of older trail records;
- the syslog export queue (re-encrypted in place);
- the trail's signing key: a ``keys.rotated`` record signed by the OLD key names the new
  public key; verification follows the hand-over (``audit/trail.py``).

Crash safety: the new key goes first to ``<key>.new`` (0600, fsync'ed) and a ``rotation``
marker into ``vault.json``; every step is idempotent (a data key that opens with the new KEK
is done, a TLS key that opens with the new password is done, the index opens with one key or
the other...). ``Vault.open`` finding the marker completes the rotation with whichever key
file opens the vault before anything else. Last, ``<key>.new`` replaces the key file
(rename) and ``vault.json`` gets the new key check and recovery blob in one atomic write.

Residuals (documented in docs/keys.md): the old key file still opens *copies* taken
before the rotation (backups: that is what keeps them restorable with the old recovery
code) and, with the trail, reveals the sealed references of records written before it.
Throttling counters keyed by an HMAC of typed sign-in names restart at rotation.

This module drives a rotation (begin, pause the writers, run the steps, hand the new
recovery code over, complete an interrupted one at open, the online control command); the
steps themselves are ``steps`` (one per store the master key protects). It calls nothing
in ``backup/``: it sits with ``vault.py`` in the import layers (``Vault.open`` completes an
interrupted rotation), below the workflows, and the backups find the new recovery
password in ``vault.json`` themselves.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from pacsvault import vaultfile
from pacsvault.crypto import keys

# The steps and the names they share (``steps``), importable from here as before.
from pacsvault.crypto.rotation.steps import CRASH_ENV as CRASH_ENV
from pacsvault.crypto.rotation.steps import MARKER as MARKER
from pacsvault.crypto.rotation.steps import RETIRED_EVENTS_PREFIX as RETIRED_EVENTS_PREFIX
from pacsvault.crypto.rotation.steps import ROTATED_ACTION as ROTATED_ACTION
from pacsvault.crypto.rotation.steps import Outcome as Outcome
from pacsvault.crypto.rotation.steps import Rotation as Rotation
from pacsvault.crypto.rotation.steps import RotationError as RotationError
from pacsvault.crypto.rotation.steps import _crash_point
from pacsvault.crypto.rotation.steps import finish_files as finish_files
from pacsvault.crypto.rotation.steps import new_key_path as new_key_path
from pacsvault.fsutil import fsync_dir, private_dir, write_private_new

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from pacsvault.config import Settings
    from pacsvault.crypto.protection import PassphraseProvider
    from pacsvault.vault import Layout, Vault

log = logging.getLogger("pacsvault.rotation")


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


# --- driving it ------------------------------------------------------------------------


def _begin(vault: Vault, key_path: Path, passphrase: str | None) -> tuple[keys.MasterKey,
                                                                           dict[str, Any]]:
    """Make the new master key durable (``<key>.new``) and mark the rotation in
    ``vault.json`` before anything is changed."""
    meta = vaultfile.read(vault.layout.meta)
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

    vaultfile.update(vault.layout.meta, mark)
    _crash_point("begin")
    return new, marker


@contextlib.contextmanager
def _paused(vault: Vault) -> Iterator[None]:
    """Hold what writes under the keys: named secrets, the archive's commits (group-commit
    lock: stores wait, then continue), and, inside ``AuditTrail.rotate_keys``, the trail."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(vault._secrets.lock)
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
    return out


def rotate(vault: Vault, *, actor: str = "local-admin", keep_old: bool = False,
           passphrase: str | None = None, online: bool = False) -> Outcome:
    """Rotate an open vault's master key (the caller holds the vault: offline with the
    vault lock, online inside ``serve``)."""
    key_path = vault.key_path
    if key_path is None:
        raise RotationError("this vault was not opened from a key file")
    if vault.settings.index.is_postgres:
        _alone_on_index(vault)
    new, marker = _begin(vault, key_path, passphrase)
    return run(vault, key_path, new, marker, actor=actor, keep_old=keep_old, online=online)


def _alone_on_index(vault: Vault) -> None:
    """A shared PostgreSQL index is rotated from its only instance: another instance
    (``instances add``: its own copy of the key file, its own trail) still running on the
    old key would write rows no key opens after the rotation, and its trail has no
    hand-over record. Refused, online and offline, before anything changes."""
    from pacsvault.crypto.rotation.sealed_index import other_instances

    others = other_instances(vault.engine, vaultfile.instance(vault.layout.meta))
    if others:
        raise RotationError(
            f"this PostgreSQL index is shared with {len(others)} other instance(s) "
            f"({', '.join(others)}): each holds a copy of the master key and would go on "
            "writing under the old one; a master key rotation is run on a vault with one "
            "instance only (not yet across instances). Nothing was changed")


def _open_pending_postgres(settings: Settings, current: keys.MasterKey,
                           new: keys.MasterKey, vid: str) -> Engine:
    """The PostgreSQL index of an interrupted rotation: its owner row names the old keys
    until the index step ends, the new ones after; rows may be under either meanwhile,
    so the engine opens both (binding with the old until the step attaches the new)."""
    from pacsvault.index import postgres
    from pacsvault.index.db import IndexOpenError
    from pacsvault.index.sealing import attach, sealer_for

    old_sealer, new_sealer = sealer_for(current, vid), sealer_for(new, vid)
    try:
        engine = postgres.open_postgres(settings.index, old_sealer, vid)
    except postgres.IndexUnreachable:
        raise
    except IndexOpenError:
        engine = postgres.open_postgres(settings.index, new_sealer, vid)
    attach(engine, old_sealer.reading_also(new_sealer))
    return engine


def complete_pending(layout: Layout, settings: Settings, meta: dict[str, object],
                     key_path: Path, passphrase: PassphraseProvider | None,
                     vault_class: type[Vault]) -> Outcome | None:
    """Called by ``Vault.open`` when ``vault.json`` has a rotation marker: finish it with
    whichever key file opens the vault, before anything else reads or writes. The ``Vault``
    class is handed in by its caller: this module does not import ``vault`` (no circle)."""
    from pacsvault.index.db import IndexOpenError, open_index
    from pacsvault.index.nodes import ensure_tables

    marker = meta.get(MARKER)
    if not isinstance(marker, dict):
        return None
    vid = str(meta["vault_id"])
    current = _load(key_path, vid, passphrase)
    out = Outcome(recovery_code="", resumed=True)
    if keys.verify_key_check(current, vid, str(marker.get("new_key_check", ""))):
        # The key file was replaced already: only vault.json is left to finish.
        finish_files(layout, key_path, current, vid, keep_old=False, outcome=out)
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
        if settings.index.is_postgres:
            engine = _open_pending_postgres(settings, current, new, vid)
        else:
            try:
                engine = open_index(layout.index, current.derive(keys.PURPOSE_INDEX, vid))
            except IndexOpenError:
                engine = open_index(layout.index, new.derive(keys.PURPOSE_INDEX, vid))
            ensure_tables(engine)
        vault = vault_class(layout, settings, vid, current, engine)
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
    folder = private_dir(key_path.parent)
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
