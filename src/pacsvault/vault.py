"""A vault on disk: its layout, and how it is created and opened.

``DATA/`` holds only ciphertext and non-secret metadata::

    pacsvault.toml   settings (no secrets)
    vault.json       vault id, format, key check, master key sealed by the recovery code
    index.db         SQLCipher index (+ -wal/-shm while open)
    audit/           hash-chained, signed audit trail (patient references sealed)
    objects/         encrypted objects, objects/ab/cd/<random id>.pvo
    tls/             CA, server and outbound client certificates (private keys
                     PKCS#8-encrypted), crl.pem (revoked node certificates, public)
    serve.lock       flock'ed by the running server: one server per vault (issue 12)

The master key file lives elsewhere (user config dir by default).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

import pacsvault.accounts.models  # noqa: F401  (registers the account tables)
from pacsvault import config, vaultfile
from pacsvault.audit import Recorder
from pacsvault.audit.events import LogSink
from pacsvault.audit.stores import StoreJournal
from pacsvault.audit.syslog import QUEUE_DIR_NAME, SyslogSink
from pacsvault.audit.trail import AuditTrail, TrailKeys, TrailSink
from pacsvault.crypto import keys, protection, tls
from pacsvault.crypto.keyring import Keyring
from pacsvault.crypto.protection import PassphraseProvider
from pacsvault.index import schema  # deployment_state: its tables too
from pacsvault.index import shared_state as _shared_state  # noqa: F401  (registers its tables)
from pacsvault.index.db import INDEX_NAME, open_index, session_factory
from pacsvault.index.keyrows import DataKeyRows
from pacsvault.index.nodes import NodeRegistry
from pacsvault.service import lock as instance_lock
from pacsvault.storage.backends import open_store
from pacsvault.storage.objects import ObjectBackend, ObjectStore
from pacsvault.vaultfile import BACKUP_RECOVERY_SECRET as BACKUP_RECOVERY_SECRET
from pacsvault.vaultfile import META_NAME as META_NAME
from pacsvault.vaultfile import VAULT_FORMAT as VAULT_FORMAT
from pacsvault.vaultfile import VaultError as VaultError
from pacsvault.vaultfile import default_key_path as default_key_path
from pacsvault.vaultindex import UpgradeConfirm as UpgradeConfirm
from pacsvault.vaultindex import confirm_upgrade as confirm_upgrade
from pacsvault.vaultindex import layout_tables, upgrade_index
from pacsvault.vaultindex import upgrade_without_asking as upgrade_without_asking
from pacsvault.vaultsecrets import NamedSecrets

if TYPE_CHECKING:  # imported when first used: a CLI command must not pay for pydicom,
    # numpy and argon2 it does not need (issue 12, defect 7)
    from pacsvault.accounts.service import Accounts
    from pacsvault.accounts.token_service import TokenPolicy
    from pacsvault.storage.archive import Archive



@dataclass(frozen=True)
class Layout:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / config.CONFIG_NAME

    @property
    def meta(self) -> Path:
        return self.root / META_NAME

    @property
    def index(self) -> Path:
        return self.root / INDEX_NAME

    @property
    def objects(self) -> Path:
        return self.root / "objects"

    @property
    def audit(self) -> Path:
        return self.root / "audit"

    @property
    def tls(self) -> tls.TlsPaths:
        return tls.TlsPaths(self.root / "tls")

    @property
    def lock(self) -> Path:
        """``flock``'ed by the running server (``service.lock``), never written."""
        return self.root / instance_lock.LOCK_NAME

    @property
    def state(self) -> Path:
        """Written by a running server: pid and ports, for status and tests."""
        return self.root / "serve.json"

    def exists(self) -> bool:
        return self.meta.exists() or self.config.exists()

    def is_empty(self) -> bool:
        """Nothing there yet (the lock of a first ``serve`` about to create it aside)."""
        return not self.root.exists() or not any(
            p.name != instance_lock.LOCK_NAME for p in self.root.iterdir())


def _read_meta(layout: Layout) -> dict[str, object]:
    return vaultfile.read(layout.meta)


def open_engine(layout: Layout, settings: config.Settings, master: keys.MasterKey,
                vault_id: str, *, create: bool = False) -> Engine:
    """The vault's one index engine: the embedded SQLCipher file (its key derived from the
    master key), or the PostgreSQL database of ``[index] url`` with the column sealer
    attached (``index.postgres``, issue 16). ``create``: a new vault's (empty) index."""
    if settings.index.is_postgres:
        from pacsvault.index import postgres
        from pacsvault.index.sealing import sealer_for

        return postgres.open_postgres(settings.index, sealer_for(master, vault_id),
                                      vault_id, create=create)
    return open_index(layout.index, master.derive(keys.PURPOSE_INDEX, vault_id),
                      create=create)


def _record_upgrade(vault: Vault, done: schema.Plan) -> None:
    from pacsvault.audit.events import AuditEvent, EventCode
    from pacsvault.audit.events import Outcome as EventOutcome

    vault.recorder.emit(AuditEvent(
        action="index.upgraded", outcome=EventOutcome.SUCCESS,
        code=EventCode.APPLICATION_ACTIVITY,
        message=done.describe().split(";")[0],
        detail={"from": done.current or "none", "to": done.head, "layout": schema.LAYOUT},
    ))


def update_meta(layout: Layout, change: Callable[[dict[str, object]], None]) -> dict[str, object]:
    """``vaultfile.update`` of this layout's ``vault.json``."""
    return vaultfile.update(layout.meta, change)


def _write_private_json(path: Path, value: object) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(value, fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())


def create(data_dir: Path, *, key_file: Path | None = None, ae_title: str = "PACSVAULT",
           index: config.IndexSettings | None = None,
           storage: config.StorageSettings | None = None) -> str:
    """Create a vault; returns the recovery code, which must be shown once and never stored.
    ``index``: a PostgreSQL index (a new, empty database) instead of the embedded one;
    ``storage``: objects in an S3 bucket (checked reachable before anything is written)."""
    layout = Layout(data_dir)
    if layout.exists():
        raise VaultError(f"a vault already exists at {data_dir}; refusing to overwrite it")
    try:
        config.ServerSettings(ae_title=ae_title)  # validate before touching the disk
    except ValidationError:
        raise VaultError(
            "an AE title is 1 to 16 printable ASCII characters, no backslash"
        ) from None
    index = index or config.IndexSettings()
    vault_id = str(uuid.uuid4())
    key_path = key_file or default_key_path(vault_id)
    if key_path.exists():
        raise VaultError(f"key file {key_path} already exists; refusing to overwrite it")
    if key_path.resolve().is_relative_to(data_dir.resolve()):
        raise VaultError("the key file must not be inside the data directory")
    if storage is not None and storage.url:
        _check_bucket(storage)
    created_dir = not data_dir.exists()
    reached: set[str] = set()  # "claimed": the database is this vault's (undo it too)
    try:
        code = _populate(layout, vault_id, key_path, key_file, ae_title, index, reached)
        if storage is not None and storage.url:
            layout.config.write_text(
                config.with_storage(layout.config.read_text("utf-8"), storage), "utf-8")
        return code
    except BaseException:
        _discard(layout, key_path, index, vault_id, created_dir=created_dir,
                 claimed="claimed" in reached)
        raise


def _discard(layout: Layout, key_path: Path, index: config.IndexSettings, vault_id: str,
             *, created_dir: bool, claimed: bool = True) -> None:
    """Leave nothing half-made behind: a partial vault would block a retry, and so would
    a PostgreSQL database still claimed by it (its tables dropped in one transaction, only
    if its owner row names this vault)."""
    if index.is_postgres and claimed:
        from pacsvault.index import postgres

        try:
            postgres.release(index, vault_id)
        except Exception as exc:  # the vault's files go anyway; say what stays
            import logging

            logging.getLogger("pacsvault.vault").warning(
                "the PostgreSQL index this init claimed could not be dropped (%s): empty "
                "the database before trying again", type(exc).__name__)
    key_path.unlink(missing_ok=True)
    layout.lock.unlink(missing_ok=True)
    for part in (layout.meta, layout.config, layout.index):
        for suffix in ("", "-wal", "-shm"):
            Path(f"{part}{suffix}").unlink(missing_ok=True)
    shutil.rmtree(layout.root / "tls", ignore_errors=True)
    shutil.rmtree(layout.objects, ignore_errors=True)
    shutil.rmtree(layout.audit, ignore_errors=True)
    if created_dir:
        shutil.rmtree(layout.root, ignore_errors=True)


def undo_create(data_dir: Path, key_file: Path | None = None) -> None:
    """Remove a vault ``create`` just made, when ``init`` fails after it (its first
    administrator, the secrets file): files, key file and, on PostgreSQL, its tables."""
    layout = Layout(data_dir)
    vault_id = str(_read_meta(layout)["vault_id"])
    settings = config.load(data_dir)
    key_path = resolve_key_path(layout, settings, key_file)
    _discard(layout, key_path, settings.index, vault_id, created_dir=False)


def _check_bucket(storage: config.StorageSettings) -> None:
    """The bucket answers with these settings (TLS, credentials), or nothing is made."""
    from pacsvault.storage.backends import StorageConfigError, open_s3

    try:
        open_s3(storage).create()
    except StorageConfigError as exc:
        raise VaultError(str(exc)) from None
    except OSError as exc:
        raise VaultError(f"the S3 bucket of {storage.url} cannot be reached with these "
                         f"settings ({exc}); nothing was created") from None


def _populate(
    layout: Layout, vault_id: str, key_path: Path, key_file: Path | None, ae_title: str,
    index: config.IndexSettings, reached: set[str] | None = None,
) -> str:
    data_dir = layout.root
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(data_dir, 0o700)

    master = keys.MasterKey.generate()
    recovery_code = keys.new_recovery_code()
    keys.write_key_file(key_path, master, vault_id)
    tls.create_authority(layout.tls, _tls_password(master, vault_id), ae_title)
    ObjectStore(layout.objects).create()
    settings = config.Settings(server=config.ServerSettings(ae_title=ae_title), index=index)
    engine = open_engine(layout, settings, master, vault_id, create=True)
    if reached is not None:
        reached.add("claimed")
    try:
        if index.is_postgres:  # the same revisions as an upgrade, from an empty database
            schema.upgrade(engine, layout_tables())
        else:
            for table in layout_tables():
                table.create(engine, checkfirst=True)
            schema.stamp_head(engine)  # a new index is at the newest revision
    except BaseException:
        if index.is_postgres:  # leave the database empty for a retry
            from pacsvault.index import postgres

            with contextlib.suppress(Exception):
                postgres.drop_claim(engine)
        raise
    finally:
        engine.dispose()
    layout.audit.mkdir(mode=0o700)
    (layout.audit / "trail.jsonl").touch(mode=0o600)
    layout.config.write_text(
        config.render(ae_title, key_file.resolve() if key_file else None, index), "utf-8"
    )
    instance_lock.create_lock_file(data_dir)
    # vault.json last: its presence marks a complete vault.
    _write_private_json(
        layout.meta,
        {
            "format": VAULT_FORMAT,
            "layout": schema.LAYOUT,
            "vault_id": vault_id,
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "key_check": keys.make_key_check(master, vault_id),
            "recovery": keys.wrap_for_recovery(master, recovery_code, vault_id),
            # The backup repositories' second key (restore with the recovery code alone).
            "secrets": {BACKUP_RECOVERY_SECRET: keys.wrap_secret(
                master, vault_id, BACKUP_RECOVERY_SECRET,
                keys.backup_recovery_password(recovery_code))},
        },
    )
    return recovery_code


def _tls_password(master: keys.MasterKey, vault_id: str) -> bytes:
    return master.derive(keys.PURPOSE_TLS, vault_id).hex().encode("ascii")


def _retired_event_keys(layout: Layout, master: keys.MasterKey,
                        vault_id: str) -> tuple[bytes, ...]:
    """Events keys of master keys rotated away: older trail records' references."""
    from pacsvault.crypto.rotation import retired_event_keys

    try:
        return retired_event_keys(master, vault_id, _read_meta(layout))
    except VaultError:
        return ()


def resolve_key_path(layout: Layout, settings: config.Settings, override: Path | None) -> Path:
    if override is not None:
        return override
    if settings.server.key_file:
        return Path(settings.server.key_file)
    return default_key_path(str(_read_meta(layout)["vault_id"]))


def recover(data_dir: Path, code: str, key_file: Path | None = None) -> Path:
    """Rebuild a lost key file from the recovery code; never overwrites an existing file."""
    layout = Layout(data_dir)
    meta = _read_meta(layout)
    settings = config.load(data_dir)
    vault_id = str(meta["vault_id"])
    recovery = meta["recovery"]
    if not isinstance(recovery, dict):
        raise VaultError("vault.json has no recovery data")
    master = keys.unwrap_with_recovery(recovery, code, vault_id)
    path = resolve_key_path(layout, settings, key_file)
    if path.exists():
        raise VaultError(f"{path} exists; move it away first (nothing was overwritten)")
    keys.write_key_file(path, master, vault_id)
    return path


class Vault:
    """An open vault: settings, index, archive, node registry and event recorder."""

    def __init__(
        self,
        layout: Layout,
        settings: config.Settings,
        vault_id: str,
        master: keys.MasterKey,
        engine: Engine,
    ) -> None:
        self.layout = layout
        self.settings = settings
        self.vault_id = vault_id
        self._master = master
        self.engine = engine
        self.sessions: sessionmaker[Session] = session_factory(engine)
        self._secrets = NamedSecrets(layout.meta, master, vault_id, self.sessions)
        # ``objects``: the local directory store (DATA/objects); ``store``: where objects
        # really go, the same store by default, a bucket with ``[storage] url = s3://``.
        self.objects = ObjectStore(layout.objects, settings.storage.min_free_mb * 1024 * 1024)
        self.store: ObjectBackend = (open_store(settings.storage, layout.objects)
                                     if settings.storage.url else self.objects)
        self._archive: Archive | None = None
        self._archive_lock = threading.Lock()
        self.nodes = NodeRegistry(self.sessions, on_revoke=self.publish_crl)
        self.audit = AuditTrail(
            layout.audit,
            TrailKeys(
                signing_seed=master.derive(keys.PURPOSE_AUDIT_SIGNING, vault_id),
                sealing_key=master.derive(keys.PURPOSE_EVENTS, vault_id),
                retired_sealing=_retired_event_keys(layout, master, vault_id),
            ),
            self.sessions,
            instance=vaultfile.instance(layout.meta),  # several data dirs, one index
        )
        self.recorder = Recorder([LogSink(), TrailSink(self.audit)])
        self.syslog: SyslogSink | None = None
        if settings.audit.syslog.enabled:
            self.syslog = SyslogSink(
                settings.audit.syslog,
                layout.audit / QUEUE_DIR_NAME,
                master.derive(keys.PURPOSE_AUDIT_EXPORT, vault_id),
                archive_ae=settings.server.ae_title,
            )
            self.recorder.add_sink(self.syslog)

    # The key file this vault was opened with (None for a copy opened in memory).
    key_path: Path | None = None

    @classmethod
    def open(cls, data_dir: Path, key_file: Path | None = None,
             passphrase: PassphraseProvider | None = None,
             confirm: UpgradeConfirm | None = None) -> Vault:
        """Open with the key file, whatever its protection (``crypto.protection``):
        ``passphrase`` is asked only for a passphrase-protected file; without one that file
        raises ``keys.KeyUnavailable``. An older index is upgraded first (``index.schema``;
        ``confirm``, by default ``confirm_upgrade``, is asked before anything changes)."""
        layout = Layout(data_dir)
        meta = _read_meta(layout)
        settings = config.load(data_dir)
        vault_id = str(meta["vault_id"])
        key_path = resolve_key_path(layout, settings, key_file)
        if isinstance(meta.get("rotation"), dict):  # a key rotation was interrupted:
            from pacsvault.crypto import rotation  # complete it before anything else

            rotation.complete_pending(layout, settings, meta, key_path, passphrase, Vault)
            meta = _read_meta(layout)
        master = protection.load_master(key_path, vault_id, passphrase)
        if not keys.verify_key_check(master, vault_id, str(meta["key_check"])):
            raise keys.VaultKeyError(
                f"the key file {key_path} does not open this vault (it belongs to another "
                "vault or is damaged); nothing was changed"
            )
        engine = open_engine(layout, settings, master, vault_id)
        upgraded = upgrade_index(layout.meta, engine, confirm)
        vault = cls(layout, settings, vault_id, master, engine)
        vault.key_path = key_path
        if upgraded is not None:
            _record_upgrade(vault, upgraded)
        vault._tls_upkeep()
        vault._sealed_upkeep()
        vault._secrets.publish_shared()
        return vault

    def _sealed_upkeep(self) -> None:
        """What a start without the master key will need (``sealed.material``): the HPKE
        key pair, the signed node snapshot (rewritten after every node change) and the
        listener TLS keys' boot copy. A vault on a read-only disk still opens."""
        import logging

        from pacsvault.sealed import material

        log = logging.getLogger("pacsvault.sealed")

        def snapshot() -> None:
            try:
                material.write_snapshot(self)
            except OSError as exc:
                log.warning("the sealed-mode node snapshot could not be written (%s)",
                            type(exc).__name__)

        self.nodes.on_change = snapshot
        try:
            material.ensure(self, self.key_path)
        except OSError as exc:
            log.warning("the sealed-mode material could not be written (%s)",
                        type(exc).__name__)

    def _tls_upkeep(self) -> None:
        """Bring an older vault's TLS material up to date: its outbound client certificate
        (clientAuth only), its RSA server certificate, and a current CRL (``crl.pem`` must
        always exist). A vault on a read-only disk still opens."""
        paths = self.layout.tls
        try:
            if not paths.client_cert.exists() and paths.ca_key.exists():
                tls.create_client_cert(paths, self.tls_password(), self.settings.server.ae_title)
            if not paths.server_rsa_cert.exists() and paths.ca_key.exists() \
                    and paths.server_cert.exists():  # for RSA-only modalities (issue 13)
                tls.create_rsa_server_cert(paths, self.tls_password())
            if paths.ca_key.exists() and tls.crl_needs_refresh(
                paths, {serial for serial, _ in self.nodes.revoked()}
            ):
                self.publish_crl()
        except OSError:
            pass

    def publish_crl(self) -> None:
        """Re-sign ``tls/crl.pem`` from the index's revocations (the index is what the
        server checks; the file is for every other verifier)."""
        tls.write_crl(self.layout.tls, self.tls_password(),
                      [tls.Revoked(serial, when) for serial, when in self.nodes.revoked()])

    @property
    def archive(self) -> Archive:
        """The archive, made at first use (it brings pydicom): one per vault, whichever
        thread asks first (``serve`` makes it at start, for recovery)."""
        archive = self._archive
        if archive is None:
            with self._archive_lock:
                archive = self._archive
                if archive is None:
                    archive = self._archive = self._make_archive()
        return archive

    def _make_archive(self) -> Archive:
        from pacsvault.dicomfile import inflate
        from pacsvault.storage.archive import Archive

        # Every parse of a received or stored object inflates within this (issue 11).
        inflate.set_limit(self.settings.storage.max_inflated_mb * inflate.MIB)
        archive = Archive(self.sessions, self.store,
                          Keyring(self._master.derive(keys.PURPOSE_KEK, self.vault_id),
                                  DataKeyRows()))
        # Every committed store batch is recorded with its rows (an acknowledged image
        # always has its record, even after a crash).
        archive.journal = StoreJournal(self.audit, self.recorder)
        return archive

    _accounts: Accounts | None = None

    @property
    def accounts(self) -> Accounts:
        """Users, second factors and tokens (one instance per process: it holds sign-ins
        in progress)."""
        if self._accounts is None:
            from pacsvault.accounts.service import Accounts

            self._accounts = Accounts(
                self.sessions, self.recorder,
                secret_key=self._master.derive(keys.PURPOSE_ACCOUNTS, self.vault_id),
                issuer=f"pacsvault {self.settings.server.ae_title}",
            )
            self._accounts.use_token_policy(self.token_policy)
        return self._accounts

    def token_policy(self) -> TokenPolicy:
        """The API token policy of the current settings (read at each use: a reload of
        the settings applies to the next token check)."""
        from pacsvault.accounts.token_service import TokenPolicy

        return TokenPolicy.from_settings(self.settings)

    def tls_password(self) -> bytes:
        return _tls_password(self._master, self.vault_id)

    def update_meta(self, change: Callable[[dict[str, object]], None]) -> dict[str, object]:
        """``update_meta`` of this vault, for the jobs below this layer that hold one."""
        return update_meta(self.layout, change)

    def named_secret(self, name: str, *, size: int = 32) -> bytes:
        """``vaultsecrets.NamedSecrets.get``: a random secret made on first use."""
        return self._secrets.get(name, size=size)

    def file_secret(self, name: str) -> bytes | None:
        """``vaultsecrets.NamedSecrets.file_secret``."""
        return self._secrets.file_secret(name)

    def set_named_secret(self, name: str, secret: bytes) -> None:
        """``vaultsecrets.NamedSecrets.set``: a secret whose value is not random."""
        self._secrets.set(name, secret)

    def open_copy(self, data_dir: Path) -> Vault:
        """Open a restored copy of this vault (a restore drill) with this vault's master
        key, held in memory: no key file is read or written for the copy. Refused unless
        the copy's ``key_check`` verifies under this key (it is this vault's backup).
        Nothing outside ``data_dir`` is touched: no syslog export, no TLS upkeep."""
        layout = Layout(data_dir)
        meta = _read_meta(layout)
        try:
            same = str(meta.get("vault_id")) == self.vault_id and keys.verify_key_check(
                self._master, self.vault_id, str(meta.get("key_check", "")))
        except ValueError:  # a damaged key_check (bad base64, short blob)
            same = False
        if not same:
            raise keys.VaultKeyError("the restored copy is not this vault's, or its key "
                                     "check does not verify under the live master key")
        settings = config.load(data_dir)
        syslog = settings.audit.syslog.model_copy(update={"enabled": False})
        settings = settings.model_copy(
            update={"audit": settings.audit.model_copy(update={"syslog": syslog})})
        engine = open_engine(layout, settings, self._master, self.vault_id)
        # A restored copy may be older than this code (a drill, a restore): upgraded
        # without asking or recording (it is a copy).
        upgrade_index(layout.meta, engine, lambda _plan: True)
        return Vault(layout, settings, self.vault_id, self._master, engine)

    def close(self) -> None:
        self.audit.close()  # deferred records (``AuditTrail.defer``) written first
        if self.syslog is not None:
            # Give this process's last events a chance to leave; the rest stays queued.
            self.syslog.flush(2.0)
            self.syslog.close()
        self.engine.dispose()
