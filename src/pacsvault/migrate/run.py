"""One migration run: objects, then index rows, then verification, then the switch.

Order and why:

1. **Objects** first (when the object store moves): the durability rule of the scale-out
   store is "no index row without its object", so every object is in the target before
   any row naming it is.
2. **Index rows** (when the index moves): every table, keys kept, the audit anchor last.
3. **Verification**: per table, the target holds as many rows as the source; per
   instance, the target index finds it by its SOP Instance UID, names the same object and
   data key, and its object decrypts (through the target's own store and keys) to the same
   DICOM bytes as the source's.
4. **Switch**: the anchor copied again (it must name the trail's last record), the
   embedded index file put in place or set aside, the settings file rewritten
   atomically, then the vault opened on the new backends records ``vault.migrated`` and
   its trail is verified. The old index and objects are left where they were.

It runs offline: the vault's lock (the one ``serve`` holds) is taken for the whole run,
and each phase saves its progress (``migrate.state``) so that a run cut short continues.
A vault that changed between two runs (its audit anchor moved: the server ran on the old
backends meanwhile) is refused: rows already copied might be stale; ``--restart``.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO, cast

from sqlalchemy import Engine, Table, select

from pacsvault import vault as vaultmod
from pacsvault import vaultindex
from pacsvault.audit.events import AuditEvent, EventCode, Outcome
from pacsvault.crypto import keys
from pacsvault.crypto.keyring import KeyDestroyed
from pacsvault.crypto.protection import PassphraseProvider
from pacsvault.index import schema
from pacsvault.index.db import IndexOpenError, open_index
from pacsvault.index.models import Instance
from pacsvault.migrate import objects, rows, state, switch
from pacsvault.migrate.progress import Progress
from pacsvault.migrate.targets import EMBEDDED, POSTGRESQL, S3, Target, index_kind, storage_kind
from pacsvault.service import lock as instance_lock
from pacsvault.storage.objects import ObjectStore
from pacsvault.vault import Layout, Vault

_instances = cast(Table, Instance.__table__)
_SAVE_EVERY = 1.0  # seconds between state saves while copying objects


class MigrationError(Exception):
    """A migration that cannot go on (message is user-facing, one line; never a patient
    attribute, a UID or a credential)."""


@dataclass
class Summary:
    source_index: str
    source_storage: str
    target_index: str
    target_storage: str
    objects: int = 0
    erased: int = 0
    bytes: int = 0
    rows: dict[str, int] = field(default_factory=dict)
    verified: int = 0
    dry_run: bool = False
    notes: list[str] = field(default_factory=list)


@dataclass
class Options:
    dry_run: bool = False
    restart: bool = False
    stop_after: int | None = None  # tests: end the process after N objects (a crash)
    # tests: kill -9 of this process right after the first chunk of this table is
    # committed in the target, before its progress is saved (the row copy's crash window)
    kill_in_table: str | None = None
    stream: TextIO | None = None  # progress bars (default stderr)
    # Tables defined outside the index layout (on their own metadata, made on first use
    # by the layer that owns them: the forward queue and cursor): copied when the source
    # holds them. The command line passes them (this layer may not import those above).
    side_tables: Sequence[Table] = ()


def migrate(data_dir: Path, key_file: Path | None, passphrase: PassphraseProvider | None,
            choose: Callable[[Vault], Target], options: Options) -> Summary:
    """Run (or resume) a migration of the vault at ``data_dir``; ``choose`` names the
    target from the opened vault's settings."""
    try:
        held = instance_lock.acquire(data_dir)
    except instance_lock.AlreadyRunning as exc:
        who = f" (pid {exc.pid})" if exc.pid else ""
        raise MigrationError(f"pacsvault is running{who} on {data_dir.absolute()}: stop "
                             "the server before migrating; nothing was changed") from None
    if passphrase is not None:  # asked once: the vault is opened again at the switch
        passphrase = _asked_once(passphrase)
    try:
        vault = Vault.open(data_dir, key_file, passphrase)
        try:
            target = choose(vault)
            return _Run(vault, target, options, passphrase).run()
        finally:
            with contextlib.suppress(Exception):
                vault.close()
    finally:
        held.release()


def _asked_once(ask: PassphraseProvider) -> PassphraseProvider:
    remembered: list[str | None] = []

    def provide() -> str | None:
        if not remembered:
            remembered.append(ask())
        return remembered[0]

    return provide


class _Run:
    def __init__(self, vault: Vault, target: Target, options: Options,
                 passphrase: PassphraseProvider | None = None) -> None:
        self.vault = vault
        self.passphrase = passphrase
        self.layout: Layout = vault.layout
        self.root = vault.layout.root
        self.target = target
        self.options = options
        self.master: keys.MasterKey = vault._master  # (the migration re-opens the index)
        layout = vaultindex.layout_tables()
        held = rows.present(vault.engine)
        self.side = [t for t in options.side_tables if t.name in held]
        self.tables = rows.tables_in_order(layout, self.side)
        # Every table the source holds must be one the copy carries (or regenerates).
        self.unknown = rows.unknown(vault.engine, [*layout, *self.side])
        self.summary = Summary(index_kind(vault.settings.index),
                               storage_kind(vault.settings.storage),
                               target.index_kind, target.storage_kind)

    # --- driver -----------------------------------------------------------------------

    def run(self) -> Summary:
        if self.unknown and self.target.moves_index:
            raise MigrationError(
                f"the index holds table(s) this migration does not know how to carry "
                f"({', '.join(self.unknown)}); nothing was changed (a newer pacsvault, or "
                "a table another version made?)")
        if self.options.dry_run:
            return self._dry_run()
        if self.vault.engine.dialect.name == "sqlite":
            # Records a store batch left journaled in the index (``audit.trail_journal``:
            # the server was killed before the file's fsync) synced into the file first:
            # a shared index's ``audit_lines`` holds every line, not a tail.
            self.vault.audit.anchor_all()
        current = self._start()
        if current.phase == "switch" and self.target.moves_index \
                and self.target.index_kind == EMBEDDED \
                and not (self.root / switch.NEW_INDEX_NAME).exists():
            # interrupted after the new index was put in place: the settings are left
            self._switch(current)
            return self.summary
        # Both targets are reached before anything is copied: a wrong url, a database that
        # is not empty or a bucket that does not answer stops the run at once.
        sink = (objects.sink_for(self.target.storage, ObjectStore(self.layout.objects))
                if self.target.moves_storage else None)
        target_engine = self._target_engine(current)
        try:
            if current.phase == "objects":
                if sink is not None:
                    self._copy_objects(current, sink)
                current.phase = "index"
                state.save(self.root, current)
            if current.phase == "index":
                if self.target.moves_index:
                    self._copy_rows(current, target_engine)
                current.phase = "verify"
                state.save(self.root, current)
            if current.phase == "verify":
                self._verify(current, target_engine)
                current.phase = "switch"
                state.save(self.root, current)
            self._check_unchanged(current)
            if self.target.moves_index:
                rows.replace_anchor(self.vault.engine, target_engine,
                                    self._table(rows.ANCHOR_TABLE))
        finally:
            target_engine.dispose()
        self._switch(current)
        return self.summary

    def _start(self) -> state.MigrationState:
        """The interrupted migration's state, or a new one (saved once the targets have
        answered: a target refused at once leaves nothing behind)."""
        found = state.load(self.root)
        fingerprint = self.target.fingerprint()
        if found is not None and self.options.restart:
            self._clear_target(found)
            state.remove(self.root)
            found = None
        if found is not None:
            if not hmac.compare_digest(found.target, fingerprint):
                raise MigrationError(
                    "a migration to other backends was interrupted; finish it with the same "
                    "--to-index/--to-storage, or start over with --restart")
            self._check_unchanged(found)
            return found
        switch.remove_new_index(self.root)  # a left-over of a run without state
        seq, digest = self._anchor()
        return state.MigrationState(target=fingerprint, anchor_seq=seq, anchor_digest=digest)

    def _anchor(self) -> tuple[int, str]:
        found = self.vault.audit.anchor()
        return (found[0], found[1]) if found else (0, "")

    def _check_unchanged(self, current: state.MigrationState) -> None:
        seq, digest = self._anchor()
        if seq != current.anchor_seq or not hmac.compare_digest(digest,
                                                                current.anchor_digest):
            raise MigrationError(
                "the vault changed since this migration started (was the server run on the "
                "old backends?): rows already copied may be stale; run again with --restart")

    def _table(self, name: str) -> Table:
        return next(t for t in self.tables if t.name == name)

    # --- dry run ----------------------------------------------------------------------

    def _dry_run(self) -> Summary:
        self.summary.dry_run = True
        if self.target.moves_storage:
            with self.vault.engine.connect() as conn:
                found = conn.execute(select(_instances.c.size)).scalars().all()
            self.summary.objects = len(found)
            self.summary.bytes = sum(int(size or 0) for size in found)
        if self.target.moves_index:
            for table in self.tables:
                self.summary.rows[table.name] = rows.count(self.vault.engine, table)
        return self.summary

    # --- objects ----------------------------------------------------------------------

    def _copy_objects(self, current: state.MigrationState, sink: objects.Sink) -> None:
        total = objects.instance_total(self.vault.engine)
        bar = Progress("objects", total, done=current.objects_copied + current.objects_skipped,
                       stream=self.options.stream)
        saved_at = time.monotonic()
        this_run = 0

        def saved(pk: int, object_id: str, size: int | None) -> None:
            nonlocal saved_at, this_run
            current.last_instance_pk, current.last_object_id = pk, object_id
            if size is None:
                current.objects_skipped += 1
            else:
                current.objects_copied += 1
                current.bytes_copied += size
            this_run += 1
            bar.advance()
            stop = self.options.stop_after is not None and this_run >= self.options.stop_after
            if stop or time.monotonic() - saved_at >= _SAVE_EVERY:
                state.save(self.root, current)
                saved_at = time.monotonic()
            if stop:
                os._exit(75)  # as if killed: no clean-up, the state saved just above

        objects.copy_all(self.vault.engine, self.vault.store, sink,
                         current.last_instance_pk, saved)
        bar.close()
        state.save(self.root, current)

    # --- index ------------------------------------------------------------------------

    def _target_engine(self, current: state.MigrationState) -> Engine:
        """The target index's engine (the live one's twin when the index stays)."""
        settings = self.target.settings(self.vault.settings)
        vault_id = self.vault.vault_id
        if not self.target.moves_index:
            twin = vaultmod.open_engine(self.layout, settings, self.master, vault_id)
            state.save(self.root, current)
            return twin
        if self.target.index_kind == POSTGRESQL:
            create = not current.index_created
            engine = vaultmod.open_engine(self.layout, settings, self.master, vault_id,
                                          create=create)
        else:
            path = self.root / switch.NEW_INDEX_NAME
            create = not path.exists()
            engine = open_index(path, self.master.derive(keys.PURPOSE_INDEX, vault_id),
                                create=create)
        if not current.index_created:
            if self.target.index_kind == POSTGRESQL:
                schema.upgrade(engine, vaultindex.layout_tables())
            else:
                for table in vaultindex.layout_tables():
                    table.create(engine, checkfirst=True)
                schema.stamp_head(engine)
            current.index_created = True
        for table in self.side:  # as their owner makes them on first use
            table.create(engine, checkfirst=True)
        state.save(self.root, current)
        return engine

    def _clear_target(self, found: state.MigrationState) -> None:
        """``--restart``: the index a previous attempt made is removed (objects stay: the
        same ids are written again with the same bytes)."""
        switch.remove_new_index(self.root)
        if found.index_created and self.target.moves_index \
                and self.target.index_kind == POSTGRESQL:
            from pacsvault.index import postgres

            settings = self.target.settings(self.vault.settings)
            try:
                engine = vaultmod.open_engine(self.layout, settings, self.master,
                                              self.vault.vault_id)
            except IndexOpenError:
                return  # not ours (or not there): left alone, the claim below says so
            try:
                with engine.begin() as conn:  # the side tables too: stale rows otherwise
                    for table in reversed(self.side):
                        table.drop(conn, checkfirst=True)
                postgres.drop_claim(engine)
            finally:
                engine.dispose()

    def _copy_rows(self, current: state.MigrationState, target: Engine) -> None:
        totals = {t.name: rows.count(self.vault.engine, t) for t in self.tables}
        bar = Progress("index rows", sum(totals.values()),
                       done=sum(p.copied for p in current.tables.values()),
                       stream=self.options.stream)
        for table in self.tables:
            progress = current.table(table.name)
            if progress.done:
                continue

            def saved(count: int, progress: state.TableProgress = progress,
                      name: str = table.name) -> None:
                if name == self.options.kill_in_table:
                    os.kill(os.getpid(), signal.SIGKILL)  # committed, progress not saved
                bar.advance(count)
                state.save(self.root, current)

            rows.copy_table(self.vault.engine, target, table, progress, saved)
            progress.done = True
            state.save(self.root, current)
        rows.reset_sequences(target, self.tables)
        bar.close()

    # --- verification -----------------------------------------------------------------

    def _verify(self, current: state.MigrationState, target_engine: Engine) -> None:
        for table in self.tables:
            want = rows.count(self.vault.engine, table)
            have = rows.count(target_engine, table)
            self.summary.rows[table.name] = have
            if want != have:
                raise MigrationError(f"table {table.name}: {want} rows in the source, {have} "
                                     "in the target; nothing was switched")
        settings = self.target.settings(self.vault.settings)
        quiet = settings.audit.syslog.model_copy(update={"enabled": False})
        settings = settings.model_copy(
            update={"audit": settings.audit.model_copy(update={"syslog": quiet})})
        other = Vault(self.layout, settings, self.vault.vault_id, self.master, target_engine)
        source, copy = self.vault.archive, other.archive
        bar = Progress("verify", objects.instance_total(self.vault.engine),
                       done=current.verified, stream=self.options.stream)
        last = current.last_verified_pk
        while True:
            with self.vault.engine.connect() as conn:
                chunk = conn.execute(
                    select(_instances.c.pk, _instances.c.sop_uid).where(_instances.c.pk > last)
                    .order_by(_instances.c.pk).limit(objects.CHUNK)).all()
            if not chunk:
                break
            for pk, sop_uid in chunk:
                self._verify_one(source, copy, str(sop_uid), int(pk))
                current.verified += 1
                bar.advance()
            last = current.last_verified_pk = int(chunk[-1][0])
            state.save(self.root, current)
        bar.close()

    def _verify_one(self, source: object, copy: object, sop_uid: str, pk: int) -> None:
        from pacsvault.storage.archive import Archive

        assert isinstance(source, Archive) and isinstance(copy, Archive)
        mine = list(source.locate(sop_uid=sop_uid))
        theirs = list(copy.locate(sop_uid=sop_uid))
        where = f"instance row {pk}"
        if len(mine) != 1 or len(theirs) != 1:
            raise MigrationError(f"{where}: the target index does not find it by its SOP "
                                 "Instance UID; nothing was switched")
        a, b = mine[0], theirs[0]
        if a.object_id != b.object_id or a.key_id != b.key_id:
            raise MigrationError(f"{where}: the target names another object or key; "
                                 "nothing was switched")
        try:
            source.data_key(a.key_id)
        except KeyDestroyed:
            return  # erased on purpose: unreadable on both sides by design
        left, right = source.read(a), copy.read(b)
        if not hmac.compare_digest(hashlib.sha256(left).digest(),
                                   hashlib.sha256(right).digest()):
            raise MigrationError(f"{where} (object {a.object_id}): the copy does not "
                                 "decrypt to the same DICOM bytes; nothing was switched")

    # --- switch -----------------------------------------------------------------------

    def _switch(self, current: state.MigrationState) -> None:
        self.summary.verified = current.verified
        self.summary.objects = current.objects_copied
        self.summary.erased = current.objects_skipped
        self.summary.bytes = current.bytes_copied
        old = self.vault.settings
        moved_at = switch.stamp()
        self.vault.close()
        # Order: at every instant the settings name an index that is complete, so an
        # interruption here leaves a vault that opens (and a rerun finishes the switch).
        kept_index: Path | None = None
        to_embedded = self.target.moves_index and self.target.index_kind == EMBEDDED
        if to_embedded and (self.root / switch.NEW_INDEX_NAME).exists():
            kept_index = switch.set_aside(self.root, moved_at)  # an older embedded index
            switch.put_in_place(self.root)
        switch.write_settings(self.root, self.target.index, self.target.storage)
        if self.target.moves_index and self.summary.source_index == EMBEDDED:
            kept_index = switch.set_aside(self.root, moved_at)  # no longer named
        self._notes(old, kept_index)
        opened = Vault.open(self.root, self.vault.key_path, self.passphrase)
        try:
            opened.recorder.emit(AuditEvent(
                action="vault.migrated", outcome=Outcome.SUCCESS,
                code=EventCode.APPLICATION_ACTIVITY,
                message=(f"vault migrated: index {self.summary.source_index} -> "
                         f"{self.summary.target_index}, objects {self.summary.source_storage}"
                         f" -> {self.summary.target_storage}"),
                detail={"from_index": self.summary.source_index,
                        "to_index": self.summary.target_index,
                        "from_storage": self.summary.source_storage,
                        "to_storage": self.summary.target_storage,
                        "instances": current.verified, "objects": current.objects_copied,
                        "erased": current.objects_skipped},
            ))
            verdict = opened.audit.verify()
        finally:
            opened.close()
        if not verdict.ok:
            raise MigrationError(f"the audit trail does not verify after the migration: "
                                 f"{verdict.problem[:200]}")
        state.remove(self.root)

    def _notes(self, old: object, kept_index: Path | None) -> None:
        from pacsvault.config import Settings

        assert isinstance(old, Settings)
        notes = self.summary.notes
        if self.target.moves_index:
            if kept_index is not None and self.summary.source_index == EMBEDDED:
                notes.append(f"the old embedded index is kept as {kept_index}; once the "
                             f"vault is checked, remove it: rm {kept_index}*")
            elif kept_index is not None:
                notes.append(f"an older embedded index was set aside as {kept_index}; "
                             f"remove it once checked: rm {kept_index}*")
            if self.summary.source_index == POSTGRESQL:
                from pacsvault.index import postgres

                place = postgres.where(postgres.engine_url(old.index))
                notes.append(f"the old PostgreSQL index at {place} is kept; once the vault "
                             "is checked, drop that database (dropdb)")
        if self.target.moves_storage:
            if self.summary.source_storage == S3:
                notes.append(f"the old objects under {old.storage.url} are kept; once the "
                             "vault is checked, delete them (e.g. aws s3 rm --recursive)")
            else:
                notes.append(f"the old object files under {self.layout.objects} are kept; "
                             f"once the vault is checked, remove them: rm -r "
                             f"{self.layout.objects}/??")
