"""Erasing a patient for good (GDPR art. 17, end of retention): crypto-shredding + rows.

What goes, in one ``BEGIN IMMEDIATE`` transaction with ``PRAGMA secure_delete`` (freed
index pages are zeroed, so the rows do not linger in the database file's free pages):

* an ``object_actions`` row (action ``erase``, level ``patient``): its id raises the
  *removal generation*, so a running server drops its caches (study rows, unwrapped keys)
  and can never index an object under a destroyed key (``storage.removal``). Its ``uid``
  is the patient's *subject digest* (below), never the ID; ``pending`` lists the files;
* every instance, series, study and the patient row (their stored DICOM JSON with them);
* **every** data key of the patient: the patient row's and every key an instance of theirs
  is encrypted under (a patient may have several: a sealed-mode key, a key made after an
  earlier deletion): ``wrapped = NULL``, ``destroyed`` set. A key another patient still
  uses is never destroyed: the erasure is refused instead (that would be a bug elsewhere);
* earlier removal records naming one of the patient's UIDs lose the UID and the reason.

Then the object files are unlinked (staged places first) and their directories fsync'ed
(``Remover._delete_files``), the signed **tombstone** ``patient.erased`` is written (who
asked, who confirmed, when, the legal basis code, the record numbers, counts; no sealed
references at all: a later holder of the master key could open them back into the ID), and
the backup module is asked to push a keystore without the destroyed keys to every target
and prune the older ones (``pacsvault.backup.runner.keys_destroyed``), so the keys vanish
from every repository, and with them every copy of the objects.

**Subject digest**: HMAC-SHA256(named secret ``erasure-subject``, issuer ‖ 0 ‖ ID). Why
keep anything: a confirmation must be bound to the patient that was requested (a patient
row re-created under the same primary key is another patient), and the practice must be
able to answer "was X erased, when, why?" (recompute the digest of X and look for it).
Without the secret the digest reveals nothing; with the master key a *guessed* ID can be
confirmed (IDs are low-entropy): it is pseudonymous, and documented as such.

**Confirmation** (``ErasureRequest`` rows): an administrator asks (``request``), a
*different* administrator confirms (``confirm``): both signed in with their second factor
(admin page) or authenticated with password + TOTP (``pacsvault patient ... --as``). A solo
practice (``[retention] solo_practice = true`` and a single administrator account) may
erase alone, by typing the patient ID again (``erase_solo``); the mode is recorded.
While the patient's retention runs (``storage.retention``), the erasure is refused unless
a legal basis other than ``retention-ended`` is chosen (GDPR art. 17(3): the obligation to
keep prevails otherwise); the free-text reason is kept in the encrypted index only.

The module is the request and confirmation flow (``Eraser``) and the hand-off afterwards
(the running server told, backups' keystores replaced, the tombstone); the table and
result types are ``erasure_requests``, the destruction in the index ``erasure_destroy``.
Every name callers used from here is still importable from here.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hmac
import json
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import Connection, Table, func, insert, select, update
from sqlalchemy.exc import OperationalError

from pacsvault.audit import AuditEvent, EventCode, Outcome
from pacsvault.deidentify.links import forget_patients
from pacsvault.index import dialect
from pacsvault.index.models import Instance, Patient, Series, Study, utcnow
from pacsvault.sharing.links import forget_studies
from pacsvault.storage import retention
from pacsvault.storage.erasure_destroy import erase_rows, forget_rows, secure_transaction
from pacsvault.storage.erasure_requests import (
    FORGET_COMMAND,
    LEGAL_BASES,
    MAX_ID,
    REQUEST_DAYS,
    RETENTION_ENDED,
    SUBJECT_SECRET,
    Erased,
    ErasureError,
    ErasureRequest,
    ErasureResult,
    RequestInfo,
    RetentionRunning,
    Target,
    check_basis,
    check_issuer,
    check_patient_id,
    ensure_table,
    subject_digest,
)
from pacsvault.storage.removal import RemovalError, Remover, check_reason

if TYPE_CHECKING:
    from pacsvault.accounts.service import Accounts
    from pacsvault.storage.archive import Archive
    from pacsvault.vault import Vault

__all__ = [
    "FORGET_COMMAND", "LEGAL_BASES", "MAX_ID", "REQUEST_DAYS", "RETENTION_ENDED",
    "SUBJECT_SECRET", "Erased", "Eraser", "ErasureError", "ErasureRequest", "ErasureResult",
    "RequestInfo", "RetentionRunning", "Target", "check_basis", "check_issuer",
    "check_patient_id", "ensure_table", "forget_handler", "subject_digest",
]

log = logging.getLogger("pacsvault.erasure")

_instances = cast(Table, Instance.__table__)
_series = cast(Table, Series.__table__)
_studies = cast(Table, Study.__table__)
_patients = cast(Table, Patient.__table__)
_requests = cast(Table, ErasureRequest.__table__)


class Eraser(Remover):
    """Patient erasure for the command line and the admin page (``archive``: this
    process's archive when the server runs in it, so its caches drop at once)."""

    def __init__(self, vault: Vault, archive: Archive | None = None,
                 accounts: Accounts | None = None) -> None:
        super().__init__(vault.engine, vault.store, vault.recorder, archive)
        self.vault = vault
        self._accounts = accounts  # the web application's (else the vault's)
        self.rules = vault.settings.retention
        self._secret = vault.named_secret(SUBJECT_SECRET)

    # --- looking ----------------------------------------------------------------------

    def subject(self, patient_id: str, issuer: str = "") -> str:
        return subject_digest(self._secret, patient_id, issuer)

    def find(self, patient_id: str, issuer: str = "") -> Target:
        patient_id, issuer = check_patient_id(patient_id), check_issuer(issuer)
        with self.vault.engine.connect() as conn:
            pk = conn.execute(select(_patients.c.pk).where(
                _patients.c.patient_id == patient_id, _patients.c.issuer == issuer)).scalar()
            if pk is None:
                raise ErasureError("no patient has this ID (and issuer)")
            return self._target(conn, int(pk))

    def _target(self, conn: Connection, pk: int) -> Target:
        row = conn.execute(select(_patients.c.patient_id, _patients.c.issuer, _patients.c.name,
                                  _patients.c.key_id).where(_patients.c.pk == pk)).first()
        if row is None:
            raise ErasureError("the patient is no longer in the archive")
        studies = [int(s) for s in conn.execute(
            select(_studies.c.pk).where(_studies.c.patient_pk == pk)).scalars()]
        series = [int(s) for s in conn.execute(
            select(_series.c.pk).where(_series.c.study_pk.in_(studies))).scalars()] \
            if studies else []
        instances = int(conn.execute(select(func.count()).select_from(_instances)
                                     .where(_instances.c.series_pk.in_(series))).scalar_one()) \
            if series else 0
        keys = {str(row[3])} | {str(k) for k in conn.execute(
            select(_instances.c.key_id).where(_instances.c.series_pk.in_(series))
            .distinct()).scalars()} if series else {str(row[3])}
        (info,) = retention.patients(self.vault.engine, self.rules, only=[pk]) or (None,)
        if info is None:  # deleted between the two reads
            raise ErasureError("the patient is no longer in the archive")
        return Target(pk, str(row[0]), str(row[1] or ""), str(row[2] or ""),
                      self.subject(str(row[0]), str(row[1] or "")), len(studies), len(series),
                      instances, tuple(sorted(keys)), info)

    def expired(self, within_days: int = 0) -> list[retention.PatientRetention]:
        return retention.expiring(self.vault.engine, self.rules, within_days=within_days)

    def requests(self, *, pending_only: bool = False, limit: int = 50) -> list[RequestInfo]:
        stmt = select(ErasureRequest).order_by(ErasureRequest.id.desc()).limit(limit)
        if pending_only:
            stmt = stmt.where(ErasureRequest.status == "pending")
        with self.vault.sessions() as s:
            found = [RequestInfo(r.id, r.created, r.requested_by, r.kind, r.count, r.reason,
                                 r.legal_basis, self._status(r), r.decided_by, r.decided,
                                 r.mode) for r in s.scalars(stmt)]
        return [r for r in found if r.status == "pending"] if pending_only else found

    @staticmethod
    def _lapsed(created: dt.datetime) -> bool:
        created = created if created.tzinfo else created.replace(tzinfo=dt.UTC)
        return utcnow() - created > dt.timedelta(days=REQUEST_DAYS)

    def _status(self, r: ErasureRequest) -> str:
        return "lapsed" if r.status == "pending" and self._lapsed(r.created) else r.status

    def admins(self) -> list[str]:
        """Enabled administrator accounts (solo practice: exactly one)."""
        accounts = self._accounts or self.vault.accounts
        return [u.name for u in accounts.list_users()
                if "admin" in u.roles and not u.disabled]

    # --- asking -----------------------------------------------------------------------

    def check_grounds(self, targets: Sequence[Target], basis: str, reason: str) -> str:
        basis = check_basis(basis)
        try:
            reason = check_reason(reason)
        except RemovalError as exc:
            raise ErasureError(str(exc).replace("removal", "erasure")) from None
        today = dt.datetime.now(dt.UTC).date()
        if basis == RETENTION_ENDED and not all(t.retention_over(today) for t in targets):
            raise RetentionRunning(
                "the patient's retention period has not ended: erasure needs a legal "
                "reason (GDPR art. 17(3)); choose another legal basis and explain it")
        return reason

    def request(self, patient_id: str, issuer: str, reason: str, basis: str, *, actor: str,
                address: str = "") -> int:
        """Ask for a patient's erasure; another administrator confirms it."""
        target = self.find(patient_id, issuer)
        reason = self.check_grounds([target], basis, reason)
        return self._new_request("patient", [target], reason, basis, actor, address)

    def request_expired(self, reason: str, *, actor: str, address: str = "") -> int:
        """Ask for the erasure of every patient whose retention has ended now."""
        due = self.expired()
        if not due:
            raise ErasureError("no patient's retention period has ended")
        with self.vault.engine.connect() as conn:
            targets = [self._target(conn, p.pk) for p in due]
        reason = self.check_grounds(targets, RETENTION_ENDED, reason)
        return self._new_request("expired", targets, reason, RETENTION_ENDED, actor, address)

    def _new_request(self, kind: str, targets: Sequence[Target], reason: str, basis: str,
                     actor: str, address: str) -> int:
        with self.vault.engine.begin() as conn:
            result = conn.execute(insert(_requests).values(
                created=utcnow(), requested_by=actor[:64], address=address[:64], kind=kind,
                patients=json.dumps([[t.pk, t.subject] for t in targets]),
                count=len(targets), reason=reason, legal_basis=basis,
                retention_over=all(t.retention_over() for t in targets), status="pending"))
            key = result.inserted_primary_key
            assert key is not None
            request_id = int(key[0])
        self.recorder_emit(AuditEvent(
            action="patient.erasure.requested", outcome=Outcome.SUCCESS,
            code=EventCode.APPLICATION_ACTIVITY, actor_user=actor, actor_address=address,
            message=(f"An administrator asked for the erasure of {len(targets)} patient(s) "
                     f"(request {request_id}, legal basis {basis}); a second administrator "
                     "must confirm it."),
            detail={"request": request_id, "patients": len(targets), "legal_basis": basis},
        ))
        return request_id

    def cancel(self, request_id: int, *, actor: str, address: str = "") -> None:
        with self.vault.engine.begin() as conn:
            done = conn.execute(update(_requests).where(
                _requests.c.id == request_id, _requests.c.status == "pending").values(
                status="cancelled", decided_by=actor[:64], decided=utcnow())).rowcount
        if not done:
            raise ErasureError("no pending erasure request has this number")
        self.recorder_emit(AuditEvent(
            action="patient.erasure.cancelled", outcome=Outcome.SUCCESS,
            code=EventCode.APPLICATION_ACTIVITY, actor_user=actor, actor_address=address,
            message=f"An administrator cancelled erasure request {request_id}.",
            detail={"request": request_id}))

    def recorder_emit(self, event: AuditEvent) -> None:
        self.vault.recorder.emit(event, required=True)

    # --- confirming -------------------------------------------------------------------

    def confirm(self, request_id: int, *, actor: str, address: str = "",
                via: str = "web") -> ErasureResult:
        """A second administrator confirms: the erasure happens now."""
        with self.vault.sessions() as s:
            row = s.get(ErasureRequest, request_id)
            if row is None or self._status(row) != "pending":
                raise ErasureError("no pending erasure request has this number (lapsed "
                                   "after a week, done or cancelled?)")
            if hmac.compare_digest(row.requested_by.encode(), actor[:64].encode()):
                raise ErasureError("the administrator who asked cannot confirm: another "
                                   "administrator must (or, in a solo practice, erase "
                                   "with the solo confirmation)")
            pairs = [(int(pk), str(sub)) for pk, sub in json.loads(row.patients)]
            reason, basis, requester = row.reason, row.legal_basis, row.requested_by
        return self._execute(request_id, pairs, reason, basis, requester, actor, address,
                             via, "two-admin")

    def erase_solo(self, patient_id: str, issuer: str, reason: str, basis: str,
                   typed_again: str, *, actor: str, address: str = "",
                   via: str = "cli") -> ErasureResult:
        """A solo practice's erasure: one administrator, the patient ID typed twice."""
        self.solo_allowed()
        if not hmac.compare_digest(typed_again.strip().encode(),
                                   patient_id.strip().encode()):
            raise ErasureError("the patient ID typed again differs; nothing was erased")
        target = self.find(patient_id, issuer)
        reason = self.check_grounds([target], basis, reason)
        request_id = self._new_request("patient", [target], reason, basis, actor, address)
        return self._execute(request_id, [(target.pk, target.subject)], reason, basis, actor,
                             actor, address, via, "solo")

    def erase_expired_solo(self, reason: str, typed_count: str, *, actor: str,
                           address: str = "", via: str = "cli") -> ErasureResult:
        """A solo practice erases every expired patient, typing their number to confirm."""
        self.solo_allowed()
        due = self.expired()
        if not due:
            raise ErasureError("no patient's retention period has ended")
        if typed_count.strip() != str(len(due)):
            raise ErasureError("the number typed differs from the number of patients; "
                               "nothing was erased")
        request_id = self.request_expired(reason, actor=actor, address=address)
        with self.vault.sessions() as s:
            row = s.get(ErasureRequest, request_id)
            assert row is not None
            pairs = [(int(pk), str(sub)) for pk, sub in json.loads(row.patients)]
            reason = row.reason
        return self._execute(request_id, pairs, reason, RETENTION_ENDED, actor, actor,
                             address, via, "solo")

    def solo_allowed(self) -> None:
        if not self.rules.solo_practice:
            raise ErasureError("a second administrator must confirm erasures; a practice "
                               "with a single administrator sets [retention] "
                               "solo_practice = true")
        if len(self.admins()) > 1:
            raise ErasureError("this practice has several administrators: another one must "
                               "confirm the erasure")

    def _execute(self, request_id: int, pairs: list[tuple[int, str]], reason: str,
                 basis: str, requester: str, actor: str, address: str, via: str,
                 mode: str) -> ErasureResult:
        erased: list[Erased] = []
        skipped = 0
        today = dt.datetime.now(dt.UTC).date()
        for pk, subject in pairs:
            if basis == RETENTION_ENDED:
                # the retention may have been extended since (a new exam arrived)
                info = retention.patients(self.vault.engine, self.rules, only=[pk])
                if not info or not info[0].expired(today):
                    skipped += 1
                    continue
            done = self._erase_patient(pk, subject, f"[{basis}] {reason}", actor, address)
            if done is None:
                skipped += 1
                continue
            erased.append(done)
        with self.vault.engine.begin() as conn:
            conn.execute(update(_requests).where(_requests.c.id == request_id).values(
                status="done", decided_by=actor[:64], decided=utcnow(), mode=mode,
                patients=json.dumps([[None, sub] for _, sub in pairs]),
                records=json.dumps([e.record for e in erased])))
        if erased and self._archive is None:
            self._tell_server()
        backups = self._push_keystores() if any(e.keys_destroyed for e in erased) else ""
        for done in erased:
            self._tombstone(done, request_id, basis, requester, actor, address, via, mode,
                            backups)
        return ErasureResult(request_id, tuple(erased), skipped, backups)

    def _erase_patient(self, pk: int, subject: str, reason: str, actor: str,
                       address: str) -> Erased | None:
        """Rows and keys in one transaction, then the files (see the module docstring).
        None when the patient is gone or is not the one requested any more."""
        self.finish_pending()
        engine = self.vault.engine
        with secure_transaction(engine) as conn:
            row = conn.execute(select(_patients.c.patient_id, _patients.c.issuer)
                               .where(_patients.c.pk == pk)).first()
            if row is None or not hmac.compare_digest(
                    self.subject(str(row[0]), str(row[1] or "")), subject):
                return None
            target = self._target(conn, pk)
            # share links to these studies go with them (issue 19)
            forget_studies(conn, {str(u) for u in conn.execute(
                select(_studies.c.study_uid).where(_studies.c.patient_pk == pk)).scalars()})
            record, object_ids = erase_rows(conn, pk, target, subject, reason, actor,
                                            address)
        # the WAL still holds the old pages: copy them back now (best effort: a reader
        # may hold the WAL; the next checkpoint does it then)
        with contextlib.suppress(OperationalError), engine.connect() as conn:
            dialect.checkpoint(conn)
        if self._archive is not None:
            self._archive.forget()
        files = self._delete_files(record, object_ids)
        forget_patients(self.vault, {target.patient_id})  # link tables (issue 19)
        return Erased(record, target.studies, target.series, target.instances,
                      len(target.keys), files)

    def forget_shredded(self, *, actor: str = "restore") -> int:
        """Remove the rows of objects whose data key is destroyed; the patients removed.

        Why: a backup's data snapshot taken before an erasure still holds the patient's
        index rows, but its keystore (replaced after the erasure) has no key for them, so
        a restore marks those keys destroyed. The objects can never be read again; their
        rows (name, ID, headers) must not come back either. Outside a restore no such row
        exists: a deletion destroys a key only once nothing refers to it any more. Rows
        are deleted under ``secure_delete``, files like any removal's, one
        ``object_actions`` row (``forget``) moves the removal generation.
        """
        self.finish_pending()
        with secure_transaction(self.vault.engine) as conn:
            forgotten = forget_rows(conn, actor)
            if forgotten is None:
                return 0
        record, object_ids, removed = forgotten
        if self._archive is not None:
            self._archive.forget()
        self._delete_files(record, object_ids)
        return removed

    def _tell_server(self) -> None:
        """From the command line: a running server drops its unwrapped keys and cached
        rows now (it would anyway at its next commit, through the removal generation)."""
        from pacsvault.service import control

        with contextlib.suppress(control.ControlUnavailable, control.ControlError, OSError,
                                 ValueError):
            control.call(self.vault.layout.root, FORGET_COMMAND, {}, timeout=10)

    def _push_keystores(self) -> str:
        """Ask the backup module to replace the keystore in every repository (the
        destroyed keys must vanish from backups too). Never raises: the erasure is done;
        what happened is recorded in the tombstone and logged."""
        if not self.vault.settings.backup.targets:
            return ""
        try:
            from pacsvault.backup import runner
        except ImportError:
            return "no-backup-module"
        hook = getattr(runner, "keys_destroyed", None)
        if hook is None:
            return "no-hook"
        try:
            result = hook(self.vault)
        except NotImplementedError:
            return "not-implemented"
        except Exception as exc:  # the erasure stands; the admin must re-run the backup
            log.error("after an erasure, the backup keystores could not be updated: %s",
                      type(exc).__name__)
            return "failed"
        if isinstance(result, dict):
            bad = [name for name, status in result.items() if status not in ("ok", "done")]
            return "ok" if not bad else "failed:" + ",".join(sorted(bad))[:120]
        return "ok"

    def _tombstone(self, done: Erased, request_id: int, basis: str, requester: str,
                   actor: str, address: str, via: str, mode: str, backups: str) -> None:
        detail: dict[str, str | int | bool] = {
            "record": done.record, "request": request_id, "legal_basis": basis,
            "requested_by": requester, "confirmed_by": actor, "mode": mode, "via": via,
            "studies": done.studies, "series": done.series, "instances": done.instances,
            "keys_destroyed": done.keys_destroyed, "files_deleted": done.files_deleted,
        }
        if backups:
            detail["backups"] = backups
        self.vault.recorder.emit(AuditEvent(
            action="patient.erased", outcome=Outcome.SUCCESS,
            code=EventCode.INSTANCES_ACCESSED, actor_user=actor, actor_address=address,
            message=(f"A patient was erased ({done.instances} instance(s) in {done.studies} "
                     f"study(ies); {done.keys_destroyed} data key(s) destroyed): asked by "
                     f"{requester}, confirmed by {actor} ({mode}), legal basis {basis}; the "
                     f"reason is kept with removal record {done.record}."),
            detail=detail,
        ), required=True)



def forget_handler(vault: Vault) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """The running server's ``erasure.forget`` control command (``cli/serve``)."""

    def handle(_args: dict[str, Any]) -> dict[str, Any]:
        vault.archive.forget()
        return {"forgotten": True}

    return handle
