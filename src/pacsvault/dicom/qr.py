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
from typing import TYPE_CHECKING, Any

from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
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
from pacsvault.dicom import inflate
from pacsvault.dicom.answers import Answer, install
from pacsvault.index.query import Accessed, QueryBudgetExceeded, QueryEngine, QueryError
from pacsvault.storage.archive import StoredInstance

if TYPE_CHECKING:
    from pacsvault.dicom.server import DicomService, _AssocState

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

STATUS_PENDING = 0xFF00
STATUS_CANCEL = 0xFE00
STATUS_NOT_AUTHORIZED = 0x0124
STATUS_IDENTIFIER_MISMATCH = 0xA900
STATUS_UNABLE = 0xC000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_REFUSED_RESOURCES = 0xA702  # C-MOVE/C-GET: unable to perform sub-operations
FIND_CHUNK = 1000  # C-FIND answers per record (each record precedes its answers)
FIND_FIRST_CHUNK = 20  # the first record covers fewer: first answers out sooner
# pynetdicom counts a pending result whose "dataset" is not a Dataset as a failed
# sub-operation (service_class._move_scp/_get_scp): how we report an unreadable object.
_FAILED_SUBOP = "unreadable"
_MAX_CONTEXTS = 120


def store_outcome(message: Any) -> str:
    """Classify a C-STORE-RSP (sub-operation result) as completed, warning or failed."""
    status = int(getattr(message.command_set, "Status", 0xC000))
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
    def __init__(self, service: DicomService) -> None:
        install()
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
    def _root(event: evt.Event) -> str:
        sop_class = str(getattr(event.request, "AffectedSOPClassUID", ""))
        return "PATIENT" if sop_class in PATIENT_ROOT else "STUDY"

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
        state = self._service._state(event.assoc)
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
                accessed.truncated = False
                for answer in chunk:
                    if event.is_cancelled:
                        cancelled = True
                        break
                    yield STATUS_PENDING, answer
                if len(chunk) < (FIND_FIRST_CHUNK if part == 1 else FIND_CHUNK):
                    break
        except AuditUnavailable:
            # No durable record, no answer (the recorder has raised the alert).
            yield STATUS_OUT_OF_RESOURCES, None
            return
        except QueryBudgetExceeded as exc:  # PS3.4 C.4.1.1.4: A700 out of resources
            self._record_query(state, "", 0, Outcome.MINOR_FAILURE, str(exc), accessed)
            yield STATUS_OUT_OF_RESOURCES, None
            return
        except QueryError as exc:
            self._record_query(state, "", 0, Outcome.MINOR_FAILURE, str(exc), accessed)
            yield STATUS_IDENTIFIER_MISMATCH, None
            return
        except Exception as exc:  # decoding errors etc.: never a traceback with values
            self._record_query(state, "", 0, Outcome.SERIOUS_FAILURE, type(exc).__name__,
                               accessed)
            yield STATUS_UNABLE, None
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
        ), required=required)

    # --- C-MOVE -----------------------------------------------------------------------

    def on_move(self, event: evt.Event) -> Iterator[Any]:
        state = self._service._state(event.assoc)
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
            self._record_retrieve(state, "move", destination_ae, [], 0, Counter(), 0, str(exc))
            raise
        results: Counter[str] = Counter()

        def collect(sub: evt.Event) -> None:
            if isinstance(sub.message, C_STORE_RSP):
                results[store_outcome(sub.message)] += 1

        kwargs: dict[str, Any] = {
            "contexts": _contexts_for(self._sop_syntaxes(items)),
            "evt_handlers": [(evt.EVT_DIMSE_RECV, collect), (evt.EVT_CONN_OPEN, _no_delay)],
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
        yield from self._send(event, state, "move", destination_ae, items, results)

    # --- C-GET ------------------------------------------------------------------------

    def on_get(self, event: evt.Event) -> Iterator[Any]:
        state = self._service._state(event.assoc)
        if state.node is None or not state.node.may("retrieve"):
            self._refuse(state, "get")
            return  # no sub-operation count yielded: pynetdicom answers with a failure
        identifier, level = self._identifier(event)
        try:
            items = self.engine.instances(level, identifier)
        except QueryError as exc:
            self._record_retrieve(state, "get", state.node.ae_title, [], 0, Counter(), 0,
                                  str(exc))
            raise
        state.substores.clear()
        try:
            self._record_begin(state, "get", state.node.ae_title, items)
        except AuditUnavailable:
            yield from _refused(items)
            return
        yield from self._send(event, state, "get", state.node.ae_title, items, state.substores)

    # --- shared -----------------------------------------------------------------------

    def _sop_syntaxes(self, items: list[StoredInstance]) -> set[tuple[str, str]]:
        from sqlalchemy import select

        from pacsvault.index.models import Instance

        uids = [i.sop_uid for i in items]
        found: set[tuple[str, str]] = set()
        with self._vault.sessions() as session:
            for start in range(0, len(uids), 500):
                rows = session.execute(
                    select(Instance.sop_class_uid, Instance.transfer_syntax)
                    .where(Instance.sop_uid.in_(uids[start:start + 500])).distinct())
                found |= {(str(a), str(b)) for a, b in rows}
        return found

    def _record_begin(self, state: _AssocState, kind: str, destination: str,
                      items: list[StoredInstance]) -> None:
        """Durable before anything is sent (raises ``AuditUnavailable`` otherwise)."""
        self._vault.recorder.emit(AuditEvent(
            action=f"dicom.{kind}.begin", outcome=Outcome.SUCCESS,
            code=EventCode.BEGIN_TRANSFERRING,
            actor_ae=state.node.ae_title if state.node else "",
            actor_address=state.peer.address,
            study_uids=tuple(sorted({i.study_uid for i in items})),
            detail={"destination": destination, "instances": len(items)},
        ), required=True)

    def _send(
        self, event: evt.Event, state: _AssocState, kind: str, destination: str,
        items: list[StoredInstance], results: Counter[str],
    ) -> Iterator[Any]:
        """Yield the sub-operations; ``results`` fills with the peer's C-STORE answers.

        pynetdicom drops this generator when it cannot reach a C-MOVE destination (after
        the count), or when the association goes away: the final record is written then
        too (``GeneratorExit``), so every retrieval that began has its outcome recorded.
        """
        studies = sorted({i.study_uid for i in items})
        unreadable = 0
        resumed = False  # pynetdicom came back after the count: the transfer started
        recorded = not items
        if not items:
            self._record_retrieve(state, kind, destination, studies, 0, results, 0, "")
        try:
            yield len(items)
            resumed = True
            for item in items:
                if event.is_cancelled:
                    recorded = True
                    self._record_retrieve(state, kind, destination, studies, len(items),
                                          results, unreadable, "cancelled by the requester")
                    yield STATUS_CANCEL, None
                    return
                try:
                    # bounded inflation of deflated objects (issue 11, defect 5)
                    ds = inflate.read(self._vault.archive.read(item))
                except (ObjectFormatError, OSError, inflate.InflateLimitExceeded) as exc:
                    log.error("instance could not be read for %s: %s", kind,
                              type(exc).__name__)
                    unreadable += 1
                    yield STATUS_PENDING, _FAILED_SUBOP
                    continue
                yield STATUS_PENDING, ds
            recorded = True
            self._record_retrieve(state, kind, destination, studies, len(items), results,
                                  unreadable, "")
        except GeneratorExit:
            if not recorded:
                note = ("the transfer was interrupted" if resumed else
                        "the destination could not be reached; nothing was sent")
                self._record_retrieve(state, kind, destination, studies, len(items),
                                      results, unreadable, note)
            raise

    def _record_retrieve(
        self, state: _AssocState, kind: str, destination: str, studies: list[str],
        total: int, results: Counter[str], unreadable: int, note: str,
    ) -> None:
        completed, warning = results["completed"], results["warning"]
        failed = results["failed"] + unreadable
        if note or failed or completed + warning < total:
            outcome = Outcome.MINOR_FAILURE if completed + warning else Outcome.SERIOUS_FAILURE
        else:
            outcome = Outcome.SUCCESS
        self._vault.recorder.emit(AuditEvent(
            action=f"dicom.{kind}", outcome=outcome, code=EventCode.INSTANCES_TRANSFERRED,
            actor_ae=state.node.ae_title if state.node else "",
            actor_address=state.peer.address, study_uids=tuple(studies), message=note,
            detail={"destination": destination, "requested": total, "sent": completed,
                    "warning": warning, "failed": failed},
        ), required=False)  # the outcome; ``_record_begin`` was the one data waited for


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
    """One context per (SOP class, stored syntax), so nothing has to be transcoded."""
    contexts: list[PresentationContext] = []
    uncompressed = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
    for sop_class, syntax in sorted(pairs):
        stored = UID(syntax)
        # An uncompressed dataset may be re-encoded if the peer prefers another
        # uncompressed syntax; a compressed one is offered only as stored.
        syntaxes: list[str | UID] = [stored]
        if not stored.is_compressed and not stored.is_deflated:
            syntaxes += [s for s in uncompressed if s != stored]
        contexts.append(build_context(sop_class, syntaxes))
    return contexts[:_MAX_CONTEXTS]
