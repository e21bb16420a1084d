"""Query/Retrieve SCP: C-FIND, C-MOVE and C-GET, each for the roles a node was granted.

Least privilege is enforced twice: the association policy removes the FIND contexts from a
node without ``query`` and the MOVE/GET contexts from a node without ``retrieve`` (so they
are rejected at negotiation, result "abstract syntax not supported"), and each handler
checks again. A C-MOVE destination comes only from the node registry, never from the
request's address, and must itself hold ``retrieve``: nothing leaves for an unknown peer.
"""

from __future__ import annotations

import itertools
import logging
import socket
from collections import Counter
from collections.abc import Iterator
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import build_context, evt
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from pacsvault.audit import AuditEvent, AuditUnavailable, EventCode, Outcome
from pacsvault.crypto.objects import ObjectFormatError
from pacsvault.crypto.tls import client_context
from pacsvault.dicom import findwire, patches, reactor, retrieve, sendpath, status, transcode
from pacsvault.dicom.answers import Answer, install
from pacsvault.dicom.assoc import AssocState as _AssocState
from pacsvault.dicom.assoc import ServiceView
from pacsvault.dicomfile import inflate
from pacsvault.index.levels import Level
from pacsvault.index.query import Accessed, QueryEngine, QueryError
from pacsvault.index.records import StoredInstance

log = logging.getLogger("pacsvault.dicom.qr")

FIND_CLASSES = frozenset({
    str(PatientRootQueryRetrieveInformationModelFind),
    str(StudyRootQueryRetrieveInformationModelFind),
})
MOVE_CLASSES = frozenset({
    str(PatientRootQueryRetrieveInformationModelMove),
    str(StudyRootQueryRetrieveInformationModelMove),
})
GET_CLASSES = frozenset({
    str(PatientRootQueryRetrieveInformationModelGet),
    str(StudyRootQueryRetrieveInformationModelGet),
})
PATIENT_ROOT = frozenset({
    str(PatientRootQueryRetrieveInformationModelFind),
    str(PatientRootQueryRetrieveInformationModelMove),
    str(PatientRootQueryRetrieveInformationModelGet),
})

# Statuses from the one table (``dicom/status``), under the names this module uses.
STATUS_PENDING = status.PENDING
STATUS_CANCEL = status.CANCEL
STATUS_NOT_AUTHORIZED = status.NOT_AUTHORIZED
STATUS_IDENTIFIER_MISMATCH = status.DOES_NOT_MATCH
STATUS_UNABLE = status.CANNOT_UNDERSTAND
STATUS_OUT_OF_RESOURCES = status.OUT_OF_RESOURCES
STATUS_REFUSED_RESOURCES = status.OUT_OF_RESOURCES_SUBOPERATIONS  # C-MOVE/C-GET
FIND_CHUNK = 1000  # C-FIND answers per record (each record precedes its answers)
FIND_FIRST_CHUNK = 20  # the first record covers fewer: first answers out sooner
_MAX_CONTEXTS = 120


def store_outcome(message: Any) -> str:
    """Classify a C-STORE-RSP (sub-operation result) as completed, warning or failed."""
    return status_outcome(int(getattr(message.command_set, "Status", 0xC000)))


def status_outcome(status: int) -> str:
    """``store_outcome`` of a C-STORE-RSP's status."""
    if status == 0x0000:
        return "completed"
    if status in (0xB000, 0xB006, 0xB007):
        return "warning"
    return "failed"


def denied_contexts(roles: tuple[str, ...]) -> frozenset[str]:
    """Q/R abstract syntaxes a node with these roles must not negotiate."""
    denied: set[str] = set()
    if "query" not in roles:
        denied |= FIND_CLASSES
    if "retrieve" not in roles:
        denied |= MOVE_CLASSES | GET_CLASSES
    return frozenset(denied)


class QueryRetrieve:
    def __init__(self, service: ServiceView) -> None:
        install()
        findwire.install()
        retrieve.install()
        _install_link(service.ae)
        self._service = service
        self._vault = service.vault
        self.engine = QueryEngine(service.vault.sessions, service.vault.settings.server.ae_title,
                                  time_budget=service.vault.settings.query.time_budget_seconds)

    # --- helpers ----------------------------------------------------------------------

    def _refuse(self, state: _AssocState, what: str) -> None:
        self._vault.recorder.emit(AuditEvent(
            action=f"dicom.{what}.refused", outcome=Outcome.SERIOUS_FAILURE,
            code=EventCode.SECURITY_ALERT,
            actor_ae=state.node.ae_title if state.node else "",
            actor_address=state.peer.address,
            message=f"node lacks the role for {what}",
        ))

    @staticmethod
    def _root(event: evt.Event) -> Level:
        sop_class = str(getattr(event.request, "AffectedSOPClassUID", ""))
        return Level.PATIENT if sop_class in PATIENT_ROOT else Level.STUDY

    @staticmethod
    def _identifier(event: evt.Event) -> tuple[Dataset, str]:
        identifier: Dataset = event.identifier
        level = str(identifier.get("QueryRetrieveLevel", "")).strip().upper()
        return identifier, level

    # --- C-FIND -----------------------------------------------------------------------

    def on_find(self, event: evt.Event) -> Iterator[tuple[int, Dataset | None]]:
        """Answers leave in chunks, each after the record naming what it discloses.

        The record is durable before the first answer of its chunk is yielded (most
        queries: one chunk, one record); when it cannot be written the query is refused
        with A700 and nothing leaves.
        """
        state = self._service.state(event.assoc)
        if state.node is None or not state.node.may("query"):
            self._refuse(state, "find")
            yield STATUS_NOT_AUTHORIZED, None
            return
        accessed = Accessed()
        cancelled = False
        try:
            identifier, level = self._identifier(event)
            # Answers stay DICOM JSON until pynetdicom encodes them (``answers``).
            answers = (Answer(a) for a in self.engine.find_json(
                level, identifier, root=self._root(event), accessed=accessed, for_dimse=True))
            part = 0
            while not cancelled:
                if part:
                    # The answers held for one write (``findwire``) leave before the next
                    # chunk is read and recorded: never held while slow work runs.
                    findwire.flush(event.assoc.dimse)
                # A small first chunk: the first answers leave sooner, and a C-CANCEL sent
                # on seeing them arrives while the rest is being built.
                chunk = list(itertools.islice(answers, FIND_FIRST_CHUNK if not part
                                              else FIND_CHUNK))
                if part and not chunk:
                    break
                if part and event.is_cancelled:  # nothing of this chunk disclosed
                    cancelled = True
                    break
                part += 1
                self._record_query(state, level, len(chunk), Outcome.SUCCESS,
                                   "" if part == 1 else f"continued (part {part})", accessed,
                                   required=True)
                accessed.patient_ids, accessed.study_uids = set(), set()
                accessed.study_patients = {}
                accessed.truncated = False
                for answer in chunk:
                    if event.is_cancelled:
                        cancelled = True
                        break
                    yield STATUS_PENDING, answer
                if len(chunk) < (FIND_FIRST_CHUNK if part == 1 else FIND_CHUNK):
                    break
        except Exception as exc:
            # One table (``status.FIND_FAILURES``): A700 for an unwritable trail or a spent
            # time budget (PS3.4 C.4.1.1.4), A900 for an identifier we cannot process, C000
            # for anything else (decoding errors etc.: named by type, never by message).
            failed = status.failure(status.FIND_FAILURES, exc)
            if not isinstance(exc, AuditUnavailable):  # else no durable record, no answer
                self._record_query(
                    state, "", 0,
                    Outcome.SERIOUS_FAILURE if failed.unexpected else Outcome.MINOR_FAILURE,
                    failed.comment, accessed)
            yield failed.status, None
            return
        if cancelled:
            yield STATUS_CANCEL, None

    def _record_query(
        self, state: _AssocState, level: str, matches: int, outcome: Outcome, note: str,
        accessed: Accessed, *, required: bool = False,
    ) -> None:
        self._vault.recorder.emit(AuditEvent(
            action="dicom.find", outcome=outcome, code=EventCode.QUERY,
            actor_ae=state.node.ae_title if state.node else "",
            actor_address=state.peer.address, message=note,
            detail={"level": level, "matches": matches,
                    "references_truncated": accessed.truncated},
            patient_ids=tuple(sorted(accessed.patient_ids)),
            study_uids=tuple(sorted(accessed.study_uids)),
            # whose each study is, from the answers: no look-up in the index to group them
            study_patients={s: p for s, p in accessed.study_patients.items()
                            if s in accessed.study_uids},
        ), required=required)

    # --- C-MOVE -----------------------------------------------------------------------

    def on_move(self, event: evt.Event) -> Iterator[Any]:
        state = self._service.state(event.assoc)
        if state.node is None or not state.node.may("retrieve"):
            self._refuse(state, "move")
            return  # no destination yielded: pynetdicom answers with a failure status
        destination_ae = str(event.move_destination or "").strip()
        dest = self._vault.nodes.get(destination_ae)
        if dest is None or dest.port is None or not dest.may("retrieve"):
            self._vault.recorder.emit(AuditEvent(
                action="dicom.move.unknown_destination", outcome=Outcome.SERIOUS_FAILURE,
                code=EventCode.SECURITY_ALERT, actor_ae=state.node.ae_title,
                actor_address=state.peer.address,
                message="C-MOVE to a destination that is not a registered node with the "
                        "retrieve role and a port; nothing was sent",
                detail={"destination": destination_ae},
            ))
            yield None, None  # pynetdicom: 0xA801 move destination unknown
            return
        identifier, level = self._identifier(event)
        try:
            items = self.engine.instances(level, identifier)
        except QueryError as exc:
            self._record_retrieve(state, "move", destination_ae, [], 0, Counter(), _Tally(),
                                  str(exc))
            raise
        results: Counter[str] = Counter()
        link = _Link()
        # An answer the sub-association's DUL thread read itself (``sendpath.answer``) is
        # counted by this callback, the others by ``collect``.
        link.answered = _Counting(results)

        @sendpath.answers_counted
        def collect(sub: evt.Event) -> None:
            if isinstance(sub.message, C_STORE_RSP):
                results[store_outcome(sub.message)] += 1

        kwargs: dict[str, Any] = {
            "contexts": _contexts_for(self._sop_syntaxes(items)),
            "evt_handlers": [(evt.EVT_DIMSE_RECV, collect), (evt.EVT_CONN_OPEN, _no_delay)],
            "pv_link": link,
        }
        if dest.tls:
            ctx = client_context(self._vault.layout.tls, self._vault.tls_password())
            kwargs["tls_args"] = (ctx, dest.host)
        try:
            self._record_begin(state, "move", destination_ae, items)
        except AuditUnavailable:
            yield dest.host, dest.port, kwargs
            yield from _refused(items)
            return
        yield dest.host, dest.port, kwargs
        yield from self._send(event, state, "move", destination_ae, items, results, link)

    # --- C-GET ------------------------------------------------------------------------

    def on_get(self, event: evt.Event) -> Iterator[Any]:
        state = self._service.state(event.assoc)
        if state.node is None or not state.node.may("retrieve"):
            self._refuse(state, "get")
            return  # no sub-operation count yielded: pynetdicom answers with a failure
        identifier, level = self._identifier(event)
        try:
            items = self.engine.instances(level, identifier)
        except QueryError as exc:
            self._record_retrieve(state, "get", state.node.ae_title, [], 0, Counter(), _Tally(),
                                  str(exc))
            raise
        state.substores.clear()
        try:
            self._record_begin(state, "get", state.node.ae_title, items)
        except AuditUnavailable:
            yield from _refused(items)
            return
        # An answer the DUL thread read itself (``sendpath.answer``) is counted here, as
        # the server's ``EVT_DIMSE_RECV`` handler counts the others.
        event.assoc.__dict__["_pv_store_answered"] = _Counting(state.substores)
        link = _Link()
        link.assoc = event.assoc  # C-GET: the sub-operations use the request's association
        yield from self._send(event, state, "get", state.node.ae_title, items, state.substores,
                              link)

    # --- shared -----------------------------------------------------------------------

    @staticmethod
    def _sop_syntaxes(items: list[StoredInstance]) -> set[tuple[str, str]]:
        """The stored (SOP class, transfer syntax) pairs: the engine's records carry them."""
        return {(i.sop_class, i.transfer_syntax) for i in items}

    def _record_begin(self, state: _AssocState, kind: str, destination: str,
                      items: list[StoredInstance]) -> None:
        """Durable before anything is sent (raises ``AuditUnavailable`` otherwise)."""
        self._vault.recorder.emit(AuditEvent(
            action=f"dicom.{kind}.begin", outcome=Outcome.SUCCESS,
            code=EventCode.BEGIN_TRANSFERRING,
            actor_ae=state.node.ae_title if state.node else "",
            actor_address=state.peer.address,
            study_uids=tuple(sorted({i.study_uid for i in items})),
            study_patients={i.study_uid: i.patient_id for i in items if i.patient_id},
            detail={"destination": destination, "instances": len(items)},
        ), required=True)

    def _send(
        self, event: evt.Event, state: _AssocState, kind: str, destination: str,
        items: list[StoredInstance], results: Counter[str], link: _Link,
    ) -> Iterator[Any]:
        """Yield the sub-operations; ``results`` fills with the peer's C-STORE answers.

        Each object leaves as stored when the receiver accepted its (SOP class, syntax),
        its bytes untouched (``retrieve.Raw``: no pydicom parse or re-encoding), else
        decoded to uncompressed little endian (``transcode``); one it cannot take
        is yielded as a stub pynetdicom cannot send, so it is counted failed *and* listed
        in the Failed SOP Instance UID List. pynetdicom drops this generator when the
        association goes away: the final record is written then too (``GeneratorExit``),
        so every retrieval that began has its outcome recorded. The next objects are
        decrypted while the current one is sent (``retrieve.ReadAhead``, bounded).
        """
        studies = sorted({i.study_uid for i in items})
        tally = _Tally()
        resumed = False  # pynetdicom came back after the count: the transfer started
        recorded = not items
        if not items:
            self._record_retrieve(state, kind, destination, studies, 0, results, tally, "")
        ahead = retrieve.ReadAhead(items, self._read)
        choices = _Choices(link)
        try:
            yield len(items)
            resumed = True
            for item, data in ahead:
                if event.is_cancelled:
                    recorded = True
                    self._record_retrieve(state, kind, destination, studies, len(items),
                                          results, tally, "cancelled by the requester")
                    yield STATUS_CANCEL, None
                    return
                if link.unreachable:
                    yield STATUS_PENDING, _stub(item)
                    continue
                yield STATUS_PENDING, self._prepare(kind, item, data, choices, tally)
            recorded = True
            tally.finished = True
            note = ("the destination could not be reached (registered, not answering); "
                    "nothing was sent" if link.unreachable else "")
            self._record_retrieve(state, kind, destination, studies, len(items), results,
                                  tally, note)
        except GeneratorExit:
            if not recorded:
                note = ("the transfer was interrupted" if resumed else
                        "the destination could not be reached; nothing was sent")
                self._record_retrieve(state, kind, destination, studies, len(items),
                                      results, tally, note)
            raise
        finally:
            ahead.close()

    def _read(self, item: StoredInstance) -> bytes:
        """The decrypted Part 10 stream (in the read-ahead thread)."""
        return self._vault.archive.read(item)

    def _prepare(self, kind: str, item: StoredInstance, data: bytes | BaseException,
                 choices: _Choices, tally: _Tally) -> Dataset:
        """The dataset to send for one instance: as stored (its bytes, ``retrieve.Raw``),
        converted, or a stub."""
        split = retrieve.split(data) if isinstance(data, bytes) and item.sop_class else None
        if split is not None and isinstance(data, bytes):
            stored, offset = split
            if choices.choose(item.sop_class, stored) == stored:
                # a view, not a copy: the stored bytes are sent from the decrypted buffer
                return retrieve.Raw(item.sop_class, item.sop_uid, stored,
                                    memoryview(data)[offset:])
        try:
            if isinstance(data, BaseException):
                raise data
            # bounded inflation of deflated objects (issue 11, defect 5)
            ds = inflate.read(data)
        except (ObjectFormatError, OSError, inflate.InflateLimitExceeded) as exc:
            log.error("instance could not be read for %s: %s", kind, type(exc).__name__)
            tally.unreadable += 1
            return _stub(item)
        stored = str(ds.file_meta.get("TransferSyntaxUID", ""))
        target = choices.choose(str(ds.get("SOPClassUID", "")), stored)
        if target is None:
            log.warning("%s: the receiver accepted no context for a %s object",
                        kind, _syntax_name(stored))
            return _stub(item)
        if target == stored:
            return ds
        try:
            converted = transcode.convert(ds, target)
        except transcode.TranscodeError as exc:
            log.error("%s: a %s object could not be converted: %s", kind,
                      _syntax_name(stored), exc)
            return _stub(item)
        tally.converted[target] += 1
        return converted

    def _record_retrieve(
        self, state: _AssocState, kind: str, destination: str, studies: list[str],
        total: int, results: Counter[str], tally: _Tally, note: str,
    ) -> None:
        completed, warning = results["completed"], results["warning"]
        failed = results["failed"] + tally.unreadable
        if tally.finished:
            # Sub-operations that got no C-STORE answer (not sendable, no context,
            # unreachable destination) failed too: count what did not arrive.
            failed = max(failed, total - completed - warning)
        if note or failed or completed + warning < total:
            outcome = Outcome.MINOR_FAILURE if completed + warning else Outcome.SERIOUS_FAILURE
        else:
            outcome = Outcome.SUCCESS
        self._vault.recorder.emit(AuditEvent(
            action=f"dicom.{kind}", outcome=outcome, code=EventCode.INSTANCES_TRANSFERRED,
            actor_ae=state.node.ae_title if state.node else "",
            actor_address=state.peer.address, study_uids=tuple(studies), message=note,
            detail={"destination": destination, "requested": total, "sent": completed,
                    "warning": warning, "failed": failed,
                    "converted": sum(tally.converted.values()),
                    "converted_to": ", ".join(f"{_syntax_name(k)}: {v}" for k, v
                                              in sorted(tally.converted.items()))},
        ), required=False)  # the outcome; ``_record_begin`` was the one data waited for


class _Counting:
    """Counts a C-STORE answer by its status, into a retrieval's results."""

    def __init__(self, results: Counter[str]) -> None:
        self._results = results

    def __call__(self, status: int) -> None:
        self._results[status_outcome(status)] += 1


class _Tally:
    """What a retrieval did besides the peer's answers: for its audit record."""

    def __init__(self) -> None:
        self.unreadable = 0
        self.converted: Counter[str] = Counter()
        self.finished = False


class _Link:
    """The association the sub-operations go over (C-MOVE: known once opened)."""

    def __init__(self) -> None:
        self.assoc: Any = None
        self.unreachable = False
        self.answered: _Counting | None = None  # C-MOVE: counts answers read by its DUL


class _Choices:
    """``transcode.choose`` once per (SOP class, stored syntax) of a retrieval.

    Why: pynetdicom's ``accepted_contexts`` sorts every accepted context on each call, and
    a C-GET from a workstation that proposes every storage class has well over a hundred;
    per object that was a sizeable part of the association thread's time (issue 17). The
    accepted contexts do not change once the association is established; the
    sub-association of a C-MOVE is known from its first object on (``_Link``)."""

    def __init__(self, link: _Link) -> None:
        self._link = link
        self._contexts: list[PresentationContext] | None = None
        self._chosen: dict[tuple[str, str], str | None] = {}

    def contexts(self) -> list[PresentationContext]:
        if self._contexts is None:
            assoc = self._link.assoc
            if assoc is None:
                return []
            self._contexts = list(assoc.accepted_contexts)
        return self._contexts

    def choose(self, sop_class: str, stored: str) -> str | None:
        key = (sop_class, stored)
        if key not in self._chosen:
            self._chosen[key] = transcode.choose(self.contexts(), sop_class, stored)
        return self._chosen[key]


class _Unreached:
    """Stands in for a C-MOVE sub-association that could not be opened.

    pynetdicom answers A801 "Move Destination Unknown" whenever it cannot associate, which
    is wrong for a registered destination that does not answer (PS3.4 C.4.2.1.4): with this
    stand-in every sub-operation fails, and pynetdicom ends with A702 and the failed
    counter and Failed SOP Instance UID List filled."""

    is_established = True
    accepted_contexts: tuple[PresentationContext, ...] = ()

    def send_c_store(self, *_args: Any, **_kwargs: Any) -> Dataset:
        raise ConnectionError("the destination could not be reached")

    def release(self) -> None:
        return None


def _install_link(ae: Any) -> None:
    """Let a C-MOVE handler learn its sub-association (to pick syntaxes) and whether it
    could be opened: ``pv_link`` in the yielded kwargs (idempotent per AE; the wrapping
    itself is ``patches.wrap_associate``)."""
    patches.wrap_associate(ae, _associate_with_link)
    reactor.accelerate_requestors(ae)


def _associate_with_link(original: Any, addr: str, port: int, *args: Any,
                         **kwargs: Any) -> Any:
    link: _Link | None = kwargs.pop("pv_link", None)
    assoc = original(addr, port, *args, **kwargs)
    if link is None:
        return assoc
    if assoc.is_established:
        link.assoc = assoc
        if link.answered is not None:
            assoc.__dict__["_pv_store_answered"] = link.answered
        return assoc
    sock = getattr(assoc.dul, "socket", None)
    if sock is not None:
        sock.close()
    link.unreachable = True
    return _Unreached()


def _stub(item: StoredInstance) -> Dataset:
    """A sub-operation that must fail: no Transfer Syntax UID, so pynetdicom's
    ``send_c_store`` refuses it, counts it failed and lists its SOP Instance UID."""
    stub = Dataset()
    stub.SOPClassUID = "1.2.840.10008.1.1"
    stub.SOPInstanceUID = item.sop_uid
    return stub


def _syntax_name(uid: str) -> str:
    return UID(uid).name if uid else "unknown"


def _refused(items: list[StoredInstance]) -> Iterator[Any]:
    """A retrieval whose begin record could not be written: A702, nothing sent."""
    yield max(1, len(items))
    yield STATUS_REFUSED_RESOURCES, None


def _no_delay(event: evt.Event) -> None:
    """Outbound sub-associations too: no Nagle delay on each C-STORE request."""
    sock = getattr(event.assoc.dul.socket, "socket", None)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _contexts_for(pairs: set[tuple[str, str]]) -> list[PresentationContext]:
    """One context per (SOP class, syntax): the stored pairs first, then Explicit and
    Implicit VR Little Endian for every SOP class (``transcode.offered``)."""
    return [build_context(c, [t]) for c, t in transcode.offered(pairs)][:_MAX_CONTEXTS]
