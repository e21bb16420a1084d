"""The server's state while sealed, and the switch to normal service (unseal).

While sealed the DICOM service and the web gate run on ``SealedView``: the same settings
(``pacsvault.toml`` holds no secret), the node registry from the signed snapshot, the
listener TLS keys from their boot copy, a recorder whose durable sink is the sealed event
journal, and ``SealedArchive`` in place of the archive. Unsealing opens the real vault,
merges the journals (``merge``), and hands every listener the real vault: nothing restarts,
no connection is dropped; stores arriving meanwhile wait for the merge, then go to the
normal archive.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import json
import logging
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pacsvault import config
from pacsvault.audit.events import AuditEvent, LogSink, Recorder, Sink
from pacsvault.crypto import datakeys
from pacsvault.crypto import objects as objfmt
from pacsvault.crypto.tls import TlsPaths
from pacsvault.sealed import journal, material
from pacsvault.sealed.material import SealedKeys, SnapshotRegistry
from pacsvault.sealed.merge import event_record, parsed_record
from pacsvault.storage.backends import open_store
from pacsvault.storage.objects import ObjectBackend
from pacsvault.vault import Layout

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

    from pacsvault.storage.archive import Archive, StoreResult
    from pacsvault.vault import Vault

log = logging.getLogger("pacsvault.sealed")

SEALED_MESSAGE = "archive sealed: an administrator must unlock it"
_HEADER_OVERHEAD = 4096


class UnsealError(Exception):
    """Unsealing failed or was refused (message is user-facing, never a secret)."""


@dataclass(frozen=True)
class SealedLayout(Layout):
    """The vault layout, with the listener-only TLS copy in place of ``DATA/tls``."""

    @property
    def tls(self) -> TlsPaths:
        return material.tls_paths(self.root)


class SealedEventSink:
    """The recorder's durable sink: the sealed event journal until unsealed, then the
    trail (``switch``); events emitted while the switch merges wait for it."""

    durable = True

    def __init__(self, writer: journal.JournalWriter) -> None:
        self._writer = writer
        self._target: Sink | None = None
        self._lock = threading.Lock()
        # study UID -> patient ID of what was stored while sealed: the trail groups an
        # event's references per patient, and at the merge the index does not know these
        # studies yet (``SealedArchive`` fills it).
        self.study_patients: dict[str, str] = {}

    def write(self, event: AuditEvent) -> None:
        with self._lock:
            target = self._target
            if target is None:
                record = event_record(event)
                known = {uid: self.study_patients[uid] for uid in event.study_uids
                         if uid in self.study_patients and uid not in event.study_patients}
                if known:
                    record["study_patients"] = {**record["study_patients"], **known}
                self._writer.append(record)
                return
        target.write(event)

    def switch(self, target: Sink, merge: Callable[[], None]) -> None:
        """Run ``merge`` (the journaled events into the trail) and send every later event
        to ``target``, with no event in between."""
        with self._lock:
            self._writer.close()
            merge()
            self._target = target

    def close(self) -> None:
        with self._lock:
            self._writer.close()

    def reopen(self, writer: journal.JournalWriter) -> None:
        """An unseal that failed half-way: journal again (a new session's file)."""
        with self._lock:
            self._writer = writer
            self._target = None


class SealedArchive:
    """``Archive.store``'s contract while sealed: parse and validate as usual, encrypt
    under a new data key per (sealed session, patient) sealed with HPKE (algorithm 2), stage
    the object durably, append its index rows to the stores journal (fsync'ed), and only
    then return (the success status follows). Duplicates cannot be checked without the
    index: the merge settles them as ``store`` would have."""

    def __init__(self, objects: ObjectBackend, writer: journal.JournalWriter,
                 public: X25519PublicKey, study_patients: dict[str, str] | None = None) -> None:
        self.objects = objects
        self._study_patients = study_patients if study_patients is not None else {}
        self._writer = writer
        self._public = public
        self._keys: dict[tuple[str, str], tuple[uuid.UUID, bytes, bytes]] = {}
        self._keys_lock = threading.Lock()
        # Held by each store from staging to publishing, and by the unseal around the
        # merge: a store is either in the journal the merge reads or in the real archive.
        self.gate = threading.Lock()
        self.delegate: Archive | None = None

    def rotate(self, writer: journal.JournalWriter) -> None:
        """Caller holds ``gate``: later stores go to a new session's journal (and keys)."""
        self._writer.close()
        self._writer = writer
        with self._keys_lock:
            self._keys.clear()

    def _key_for(self, patient_id: str, issuer: str) -> tuple[uuid.UUID, bytes, bytes]:
        with self._keys_lock:
            found = self._keys.get((patient_id, issuer))
            if found is None:
                key_id, key = datakeys.new_data_key()
                found = (key_id, key, datakeys.wrap_sealed(self._public, key_id, key))
                self._keys[(patient_id, issuer)] = found
            return found

    def store(self, raw: bytes, *, source_ae: str = "", expected_sop_uid: str | None = None,
              expected_sop_class: str | None = None, actor_address: str = "",
              actor_user: str = "") -> StoreResult:
        from pacsvault.dicomfile import parse as dicom_parse
        from pacsvault.dicomfile.parse import InvalidObject
        from pacsvault.storage.archive import StoreResult, StoreStatus

        def normal() -> StoreResult:
            assert self.delegate is not None
            return self.delegate.store(raw, source_ae=source_ae,
                                       expected_sop_uid=expected_sop_uid,
                                       expected_sop_class=expected_sop_class,
                                       actor_address=actor_address, actor_user=actor_user)

        if self.delegate is not None:
            return normal()
        parsed = dicom_parse.describe(dicom_parse.read_received(raw), raw)
        if expected_sop_uid and parsed.sop_uid != expected_sop_uid.strip():
            raise InvalidObject("SOP Instance UID differs from the C-STORE request")
        if expected_sop_class and parsed.sop_class_uid != expected_sop_class.strip():
            raise InvalidObject("SOP Class UID differs from the C-STORE request")
        self.objects.check_space(len(raw) + _HEADER_OVERHEAD)
        with self.gate:
            if self.delegate is not None:
                unsealed = True
            else:
                unsealed = False
                key_id, key, wrapped = self._key_for(parsed.patient_id, parsed.issuer)
                object_id = self.objects.stage_spare(
                    objfmt.encrypt(raw, key, key_id, parsed.sop_uid))
                try:
                    self._writer.append({
                        "object_id": object_id, "key_id": str(key_id),
                        "wrapped": base64.b64encode(wrapped).decode("ascii"),
                        "parsed": parsed_record(parsed), "source_ae": source_ae,
                        "address": actor_address, "user": actor_user,
                        "received": dt.datetime.now(dt.UTC).isoformat(),
                    })
                except BaseException:
                    self.objects.discard(object_id)
                    raise
                # not fsync'ed: a crash leaves it staged, the merge publishes it
                with contextlib.suppress(OSError):
                    self.objects.publish(object_id, durable=False)
        if unsealed:
            return normal()
        self._study_patients[parsed.study_uid] = parsed.patient_id
        return StoreResult(StoreStatus.STORED, parsed.sop_uid, parsed.study_uid)

    def settle(self) -> None:
        """(``Archive.settle``'s counterpart: publishing here is synchronous.)"""

    def close(self) -> None:
        with self.gate:
            self._writer.close()


class SealedView:
    """What the DICOM service and the web gate use of a ``Vault``, while sealed."""

    sessions: Any = None  # no index while sealed (Q/R is refused before reaching it)

    def __init__(self, layout: SealedLayout, settings: config.Settings, vault_id: str,
                 recorder: Recorder, nodes: SnapshotRegistry, archive: SealedArchive,
                 boot_password: bytes | None) -> None:
        self.layout = layout
        self.settings = settings
        self.vault_id = vault_id
        self.recorder = recorder
        self.nodes = nodes
        self.archive = archive
        self._boot_password = boot_password

    def tls_password(self) -> bytes:
        if self._boot_password is None:
            raise material.SealedUnavailable("the listener TLS keys' boot secret is missing")
        return self._boot_password


class SealedRuntime:
    """Everything sealed-mode ``serve`` holds; ``unseal`` switches it to normal."""

    def __init__(self, root: Path, settings: config.Settings, key_path: Path) -> None:
        from pacsvault.dicomfile import inflate

        self.root = root
        self.settings = settings
        self.key_path = key_path
        layout = SealedLayout(root)
        meta = json.loads(layout.meta.read_text("utf-8"))
        self.vault_id = str(meta["vault_id"])
        self.keys: SealedKeys = material.load_public(layout)
        self.snapshot_problem = ""
        try:
            nodes = SnapshotRegistry.load(layout, self.keys, self.vault_id)
        except material.SealedUnavailable as exc:
            self.snapshot_problem = str(exc)
            nodes = SnapshotRegistry.empty()
        self.journal_dir = journal.journal_dir(material.sealed_dir(root))
        session = journal.new_session()
        self.events = SealedEventSink(self._writer(session, journal.EVENTS))
        self.recorder = Recorder([LogSink(), self.events])
        inflate.set_limit(settings.storage.max_inflated_mb * inflate.MIB)
        objects = open_store(settings.storage, layout.objects)  # the vault's (S3: its bucket)
        self.archive = SealedArchive(objects, self._writer(session, journal.STORES),
                                     self.keys.hpke_public, self.events.study_patients)
        self.boot_password = material.boot_password(key_path)
        self.view = SealedView(layout, settings, self.vault_id, self.recorder, nodes,
                               self.archive, self.boot_password)
        self.vault: Vault | None = None
        self._unseal_lock = threading.Lock()
        # Called with the open vault once merged (the server switches its listeners).
        self.on_unsealed: list[Callable[[Vault], None]] = []

    def close(self) -> None:
        self.archive.close()
        self.events.close()

    def _writer(self, session: str, kind: str) -> journal.JournalWriter:
        return journal.JournalWriter(self.journal_dir, session, kind, self.keys.hpke_public)

    @property
    def sealed(self) -> bool:
        return self.vault is None

    def unseal(self, passphrase: str | None = None, *, actor_user: str = "",
               actor_address: str = "", channel: str = "cli") -> dict[str, Any]:
        """Open the vault with the key (and passphrase), merge, switch. Idempotent."""
        from pacsvault.audit.events import EventCode, Outcome
        from pacsvault.audit.trail import TrailSink
        from pacsvault.audit.watch import repair_at_start
        from pacsvault.crypto import keys
        from pacsvault.sealed.merge import MergeReport, merge_events, merge_stores, record_merge

        with self._unseal_lock:
            if self.vault is not None:
                return {"already": True}
            try:
                vault = self._open(passphrase)
            except keys.VaultKeyError as exc:
                self.recorder.emit(AuditEvent(
                    action="sealed.unseal", outcome=Outcome.SERIOUS_FAILURE,
                    code=EventCode.SECURITY_ALERT, actor_user=actor_user,
                    actor_address=actor_address,
                    message=f"unseal refused ({channel}): the master key could not be "
                    "loaded", detail={"channel": channel,
                                      "unavailable": isinstance(exc, keys.KeyUnavailable)},
                ), required=False)
                raise UnsealError(str(exc)) from None
            except Exception as exc:  # a damaged index, a full disk...: stay sealed
                log.error("unseal: the vault could not be opened (%s)", type(exc).__name__)
                raise UnsealError(f"the vault could not be opened ({type(exc).__name__}); "
                                  "the archive stays sealed and keeps receiving") from None
            report = MergeReport()
            # From now on this process's events are the vault's (one recorder: the
            # alert sink and the listeners' recorders stay wired).
            vault.recorder = self.recorder
            session = journal.new_session()
            switched = False
            try:
                repair_at_start(vault.audit)
                # 1. stores go on into a new session's journal; events go to the trail
                # (the journaled ones first, in order)
                with self.archive.gate:
                    self.archive.rotate(self._writer(session, journal.STORES))
                    self.events.switch(TrailSink(vault.audit),
                                       lambda: merge_events(vault, report))
                    switched = True
                # 2. the long part, while modalities keep storing (sealed, into `session`)
                live = frozenset({session})
                merge_stores(vault, report, skip=live)
                # 3. stores paused: what arrived meanwhile, recovery, then the real archive
                with self.archive.gate:
                    merge_stores(vault, report, only=live)
                    recovery = vault.archive.recover()
                    self.archive.delegate = vault.archive
            except Exception as exc:
                if switched:
                    self.events.reopen(self._writer(session, journal.EVENTS))
                log.error("unseal failed while merging the sealed journals (%s)",
                          type(exc).__name__)
                vault.close()
                raise UnsealError("the sealed journals could not be merged "
                                  f"({type(exc).__name__}); the archive stays sealed and "
                                  "keeps receiving, nothing was lost") from None
            if vault.syslog is not None:
                self.recorder.add_sink(vault.syslog)
            self.vault = vault
            for callback in self.on_unsealed:
                callback(vault)
            record_merge(vault, report, actor_user=actor_user, actor_address=actor_address)
            vault.recorder.emit(AuditEvent(
                action="sealed.unseal", outcome=Outcome.SUCCESS,
                code=EventCode.APPLICATION_ACTIVITY, actor_user=actor_user,
                actor_address=actor_address,
                message=f"archive unsealed ({channel}): normal service resumed",
                detail={"channel": channel, "published": recovery.published,
                        "discarded": recovery.discarded},
            ), required=False)
            log.warning("archive unsealed: %d object(s) and %d event(s) merged, normal "
                        "service resumed", report.stored, report.events)
            return report.as_dict()

    def _open(self, passphrase: str | None) -> Vault:
        from pacsvault.vault import Vault

        if passphrase is None:
            return Vault.open(self.root, self.key_path)
        given = passphrase
        return Vault.open(self.root, self.key_path, passphrase=lambda: given)
