"""The DICOM listeners: a plain port and a TLS port, both behind the association policy.

Built on pynetdicom the way it is meant to be extended: a server class (connection
filtering, TLS handshake moved off the accept loop), a request handler (per-connection
peer facts), an ACSE subclass (association policy before negotiation), and event handlers
for the DIMSE services.
"""

from __future__ import annotations

import copy
import io
import logging
import socket
import ssl
import struct
import threading
import weakref
from typing import Any

from pydicom.uid import UID, AllTransferSyntaxes, DeflatedExplicitVRLittleEndian
from pynetdicom import (
    AE,
    DEFAULT_TRANSFER_SYNTAXES,
    PYNETDICOM_IMPLEMENTATION_UID,
    PYNETDICOM_IMPLEMENTATION_VERSION,
    evt,
)
from pynetdicom.acse import ACSE
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_FIND, C_GET, C_MOVE, C_STORE
from pynetdicom.presentation import AllStoragePresentationContexts, PresentationContext
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from pacsvault.audit import AuditEvent, EventCode, Outcome
from pacsvault.audit.refusals import BurstRecorder, RefusalLog
from pacsvault.crypto.tls import PeerCertificate, peer_certificate
from pacsvault.dicom import patches
from pacsvault.dicom.assoc import AssocState
from pacsvault.dicom.limits import (
    ConnectionBudget,
    ConnectionGuard,
    KnownHosts,
    ReadLimits,
    Ticket,
)
from pacsvault.dicom.negotiation import Preferences, preference_for
from pacsvault.dicom.policy import AssociationPolicy, Peer
from pacsvault.dicom.qr import (
    FIND_CLASSES,
    GET_CLASSES,
    MOVE_CLASSES,
    QueryRetrieve,
    denied_contexts,
    store_outcome,
)
from pacsvault.dicom.reactor import FastAssociation, accelerate
from pacsvault.dicom.status import (
    NOT_AUTHORIZED,
    PROCESSING_FAILURE,
    SEALED_COMMENT,
    SEALED_FIND,
    SEALED_RETRIEVE,
    STORE_CONFLICT,
    SUCCESS,
    store_failure,
)
from pacsvault.storage.archive import StoreStatus
from pacsvault.vault import Vault

log = logging.getLogger("pacsvault.dicom")

TLS_HANDSHAKE_TIMEOUT = 15.0

# Received datasets stay in memory: pynetdicom's chunked mode would spool them, in clear,
# to a temporary file. Query identifiers (names, IDs) must not reach its log either.
# (``patches.PYNETDICOM_CONFIG``; refuses library versions the patches were not written for.)
patches.configure_pynetdicom()


_AssocState = AssocState  # moved to ``dicom/assoc`` (shared with ``qr``)


class DicomService:
    """Owns the AE, both listeners and the per-association bookkeeping."""

    def __init__(self, vault: Vault, refusals: RefusalLog | None = None) -> None:
        self.vault = vault
        dicom = vault.settings.dicom
        # The budget for unauthenticated bytes (dicom/limits.py); refusals aggregated.
        self._own_refusals = refusals is None
        self.refusals = refusals or RefusalLog(vault.recorder, dicom.refusal_report_seconds)
        # Exposure and rejection events: one by one at a human pace, counted in a flood.
        self.policy = AssociationPolicy(vault.settings, vault.nodes,
                                        BurstRecorder(vault.recorder, self.refusals))
        self.known_hosts = KnownHosts(lambda: [n.host for n in self.vault.nodes.all()])
        # True while the archive is sealed (``sealed/runtime``): Q/R refused in ``intercept``
        self.sealed = False
        self.budget = ConnectionBudget(
            per_source=dicom.max_connections_per_source,
            pending=dicom.max_pending_connections,
            associations=dicom.max_associations, known=self.known_hosts,
        )
        self.read_limits = ReadLimits.from_settings(dicom)
        self._states: weakref.WeakKeyDictionary[Association, _AssocState] = (
            weakref.WeakKeyDictionary()
        )
        self._lock = threading.Lock()
        self.ae = self._make_ae()
        self.qr = QueryRetrieve(self)

    # --- setup ------------------------------------------------------------------------

    def _make_ae(self) -> AE:
        settings = self.vault.settings
        ae = AE(ae_title=settings.server.ae_title)
        syntaxes = [UID(ts) for ts in AllTransferSyntaxes]
        ae.add_supported_context(Verification, syntaxes)
        for cx in AllStoragePresentationContexts:
            if cx.abstract_syntax is not None:
                # Both roles: we are the SCP of modalities' C-STORE, and the SCU of the
                # C-STORE sub-operations of a C-GET (SCP/SCU role selection).
                ae.add_supported_context(
                    cx.abstract_syntax, syntaxes, scu_role=True, scp_role=True
                )
        # No Deflated Explicit VR LE for query/retrieve identifiers: pynetdicom inflates
        # them with one unbounded zlib.decompress (issue 11, defect 5), and identifiers
        # are too small for deflate to gain anything.
        query_syntaxes = [ts for ts in DEFAULT_TRANSFER_SYNTAXES
                          if ts != DeflatedExplicitVRLittleEndian]
        for uid in sorted(FIND_CLASSES | MOVE_CLASSES | GET_CLASSES):
            ae.add_supported_context(uid, query_syntaxes)
        ae.maximum_pdu_size = settings.dicom.maximum_pdu_size
        ae.network_timeout = settings.dicom.network_timeout
        ae.acse_timeout = settings.dicom.association_timeout
        ae.dimse_timeout = settings.dicom.network_timeout
        # pynetdicom counts every connection thread, associated or not, against this:
        # our ConnectionBudget counts association slots instead (see _PolicyACSE).
        ae.maximum_associations = 1 << 30
        return ae

    def start(self, bind: str, port: int | None, tls_port: int | None) -> dict[str, int]:
        """Start the listeners; returns the ports actually bound (port 0 = any free)."""
        handlers = [
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            # through ``self.qr`` at each request: ``unseal`` replaces it
            (evt.EVT_C_FIND, lambda event: self.qr.on_find(event)),
            (evt.EVT_C_MOVE, lambda event: self.qr.on_move(event)),
            (evt.EVT_C_GET, lambda event: self.qr.on_get(event)),
            (evt.EVT_DIMSE_RECV, self._on_dimse_recv),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_RELEASED, self._on_end),
            (evt.EVT_ABORTED, self._on_end),
        ]
        bound: dict[str, int] = {}
        self.known_hosts.refresh()
        self.refusals.start()
        if tls_port is not None:
            ctx = self._tls_context()
            bound["dicom_tls_port"] = self._listen(bind, tls_port, handlers, ctx)
        if port is not None:
            bound["dicom_port"] = self._listen(bind, port, handlers, None)
        return bound

    def _tls_context(self) -> ssl.SSLContext:
        from pacsvault.crypto.tls import server_context

        # The legacy context (retired AES profile) is made now too, and used only for the
        # source address of a node opted in by name (``tls_context_for``).
        self._legacy_tls = server_context(self.vault.layout.tls, self.vault.tls_password(),
                                          legacy_aes=True)
        return server_context(self.vault.layout.tls, self.vault.tls_password())

    _legacy_tls: ssl.SSLContext | None = None

    def tls_context_for(self, address: str, strict: ssl.SSLContext) -> ssl.SSLContext:
        """The TLS handshake comes before the association names its AE title: the source
        address is all there is. The legacy context only for the host of a node with
        ``tls_profile = "legacy-aes"`` (read at each connection, so ``node set`` applies
        without a restart); the policy then checks the calling AE is that node."""
        if self._legacy_tls is not None and self.policy.legacy_tls_source(address):
            return self._legacy_tls
        return strict

    def _listen(
        self, bind: str, port: int, handlers: list[Any], ctx: ssl.SSLContext | None
    ) -> int:
        service = self

        class Handler(_PolicyRequestHandler):
            pv_service = service
            pv_tls = ctx

        server = self.ae.make_server(
            (bind, port),
            evt_handlers=handlers,
            server_class=_PolicyServer,
            request_handler=Handler,
        )
        assert isinstance(server, _PolicyServer)
        server._pv_tickets = {}
        server._pv_lock = threading.Lock()
        server.contexts = _ContextList(server.contexts)
        server.pv_service = self
        server.pv_tls = ctx is not None
        thread = threading.Thread(
            target=server.serve_forever, name=f"dicom-{'tls' if ctx else 'plain'}", daemon=True
        )
        thread.start()
        # Registered like AE.start_server does, so AE.shutdown stops it and aborts its
        # associations.
        patches.register_server(self.ae, server)
        return int(server.server_address[1])

    def stop(self) -> None:
        self.ae.shutdown()
        if self._own_refusals:
            self.refusals.close()

    # --- sealed mode --------------------------------------------------------------------

    def intercept(self, assoc: Association, msg: Any, context_id: int) -> bool:
        """While sealed, answer C-FIND/C-MOVE/C-GET requests with the sealed status before
        any handler runs (True = answered). C-ECHO and C-STORE go on as usual."""
        if not self.sealed or not isinstance(msg, (C_FIND, C_MOVE, C_GET)):
            return False
        what = {C_FIND: "find", C_MOVE: "move", C_GET: "get"}[type(msg)]
        rsp: Any = type(msg)()
        rsp.MessageIDBeingRespondedTo = msg.MessageID
        rsp.AffectedSOPClassUID = msg.AffectedSOPClassUID
        rsp.Status = SEALED_FIND if what == "find" else SEALED_RETRIEVE
        rsp.ErrorComment = SEALED_COMMENT
        with self._lock:
            state = self._states.get(assoc)
        self.vault.recorder.emit(AuditEvent(
            action=f"dicom.{what}.sealed", outcome=Outcome.MINOR_FAILURE,
            code=EventCode.QUERY if what == "find" else EventCode.BEGIN_TRANSFERRING,
            actor_ae=state.node.ae_title if state is not None and state.node else "",
            actor_address=state.peer.address if state is not None else "",
            message=f"refused: {SEALED_COMMENT}", detail={"status": f"{rsp.Status:04X}"},
        ), required=False)
        assoc.dimse.send_msg(rsp, context_id)
        return True

    def unseal(self, vault: Vault) -> None:
        """The master key is back and the journals merged: serve from the real vault (its
        registry, its archive, Q/R), on the same listeners, without a restart."""
        self.vault = vault
        self.policy = AssociationPolicy(vault.settings, vault.nodes,
                                        BurstRecorder(vault.recorder, self.refusals))
        self.qr = QueryRetrieve(self)
        self.sealed = False
        self.known_hosts.refresh()

    def refused(self, address: str, reason: str,
                detail: dict[str, str | int | bool] | None = None) -> None:
        """A connection or association refused by the budget (recorded, aggregated)."""
        self.refusals.refused("dicom", address, reason, detail)

    # --- per-association state -----------------------------------------------------

    def _register(self, assoc: Association, peer: Peer) -> None:
        with self._lock:
            self._states[assoc] = _AssocState(peer)

    def state(self, assoc: Association) -> _AssocState:
        """This association's bookkeeping (Q/R handlers read it through ``ServiceView``)."""
        with self._lock:
            return self._states[assoc]

    def decide(self, assoc: Association, calling_ae: str, called_ae: str) -> tuple[bool, int]:
        state = self.state(assoc)
        decision = self.policy.check_association(state.peer, calling_ae, called_ae)
        state.node = decision.node
        return decision.allowed, decision.reason

    def restrict_contexts(self, assoc: Association, requested: list[Any]) -> None:
        """Shape this association's contexts before pynetdicom negotiates them.

        - For the storage contexts where the requestor asks to be SCP (C-GET receivers),
          transfer syntaxes follow the requestor's order of preference (pynetdicom takes the
          acceptor's), so a client offering an object's stored syntax gets it as stored.
        - Every other context (modalities sending to us, queries) takes the syntax chosen by
          the node's ``[dicom] syntax_preference`` (``dicom/negotiation.py``; default: the
          sender's compressed syntax as offered, else Explicit, else Implicit, Big Endian
          last), so a sender offering several syntaxes in one context (dcmsend) sends each
          object as it has it (issue 13, defect 3).
        - Least privilege: drop the Q/R contexts the node's roles do not grant.
        """
        state = self.state(assoc)
        assert state.node is not None
        receiver_of = {
            str(uid) for uid, item in assoc.requestor.role_selection.items()
            if getattr(item, "scp_role", False)
        }
        preferred: dict[str, list[UID]] = {}
        sending = Preferences(preference_for(
            state.node.ae_title, self.vault.settings.dicom.syntax_preference))
        for cx in requested:
            if str(cx.abstract_syntax) not in receiver_of:
                sending.offer(str(cx.abstract_syntax), cx.transfer_syntax)
                continue
            order = preferred.setdefault(str(cx.abstract_syntax), [])
            order += [UID(ts) for ts in cx.transfer_syntax if UID(ts) not in order]
        for cx in assoc.acceptor.supported_contexts:
            wanted = preferred.get(str(cx.abstract_syntax))
            if wanted:
                ours = list(cx.transfer_syntax)
                reordered: list[str | bytes | UID] = [t for t in wanted if t in ours]
                cx.transfer_syntax = reordered + [t for t in ours if t not in wanted]
                continue
            best = sending.order(str(cx.abstract_syntax))
            if best:
                # Only the offered syntaxes we support, best first: the others could never
                # be chosen. Set on the private list (already UIDs, already validated):
                # the setter re-validates each UID, per context, per association.
                ours_by_name = {str(t): t for t in cx._transfer_syntax}
                cx._transfer_syntax = [ours_by_name[t] for t in best if t in ours_by_name]
        denied = denied_contexts(state.node.roles)
        if not denied:
            return
        assoc.acceptor.supported_contexts = [
            cx for cx in assoc.acceptor.supported_contexts
            if str(cx.abstract_syntax) not in denied
        ]
        asked = sorted({str(cx.abstract_syntax) for cx in requested} & denied)
        if asked:
            self._emit(
                state, "dicom.qr.contexts_refused", Outcome.MINOR_FAILURE,
                EventCode.SECURITY_ALERT,
                message="query/retrieve contexts refused: the node lacks the role",
                detail={"refused": ",".join(asked), "roles": ",".join(state.node.roles)},
            )

    # --- DIMSE handlers --------------------------------------------------------------

    def _on_dimse_recv(self, event: evt.Event) -> None:
        if isinstance(event.message, C_STORE_RSP):
            with self._lock:
                state = self._states.get(event.assoc)
            if state is not None:
                state.substores[store_outcome(event.message)] += 1

    def _on_accepted(self, event: evt.Event) -> None:
        with self._lock:
            state = self._states.get(event.assoc)
        if state is None or state.node is None:
            return
        self._emit(
            state, "dicom.association.accepted", Outcome.SUCCESS,
            EventCode.USER_AUTHENTICATION,
            detail={"tls": state.peer.tls, "client_cert": state.peer.has_client_cert,
                    **({"cipher": state.peer.cipher} if state.peer.cipher else {})},
        )

    def _on_echo(self, event: evt.Event) -> int:
        return SUCCESS

    def _on_store(self, event: evt.Event) -> int:
        state = self.state(event.assoc)
        node = state.node
        if node is None or not node.may("store"):
            state.outcomes["refused"] += 1
            self._emit_failure(state, "dicom.store.refused", "node lacks the store role",
                               EventCode.SECURITY_ALERT)
            return NOT_AUTHORIZED
        request = event.request
        if not isinstance(request, C_STORE):
            return PROCESSING_FAILURE
        try:
            result = self.vault.archive.store(
                part10(event),
                source_ae=node.ae_title,
                expected_sop_uid=str(request.AffectedSOPInstanceUID or ""),
                expected_sop_class=str(request.AffectedSOPClassUID or ""),
                actor_address=state.peer.address,
            )
        except Exception as exc:
            # One table for C-STORE and STOW-RS (``dicom/status``).
            failure = store_failure(exc, log)
            return self._store_failed(state, failure.status, failure.comment)
        state.studies.add(result.study_uid)
        state.outcomes[result.status.value] += 1
        if result.status is StoreStatus.CONFLICT:
            self._emit(
                state, "dicom.store.conflict", Outcome.MINOR_FAILURE, EventCode.SECURITY_ALERT,
                message="a different object was sent under an existing SOP Instance UID; "
                "the first one was kept",
                study_uids=(result.study_uid,), sop_uids=(result.sop_uid,),
            )
            return STORE_CONFLICT
        return SUCCESS

    def _store_failed(self, state: _AssocState, status: int, why: str) -> int:
        state.outcomes["failed"] += 1
        self._emit_failure(state, "dicom.store.failed", f"status {status:04X}: {why}",
                           EventCode.INSTANCES_TRANSFERRED)
        return status

    def _emit(
        self, state: _AssocState, action: str, outcome: Outcome, code: EventCode, *,
        message: str = "", detail: dict[str, str | int | bool] | None = None,
        study_uids: tuple[str, ...] = (), sop_uids: tuple[str, ...] = (),
    ) -> None:
        """One event about this association's peer (node and address filled in).

        Not ``required``: none of these lets data leave. Stores are recorded (and refused
        when they cannot be) with their commit, by the archive's ``StoreJournal``.
        """
        self.vault.recorder.emit(
            AuditEvent(
                action=action, outcome=outcome, code=code,
                actor_ae=state.node.ae_title if state.node else "",
                actor_address=state.peer.address, message=message, detail=detail or {},
                study_uids=study_uids, sop_uids=sop_uids,
            ),
            required=False,
        )

    def _emit_failure(
        self, state: _AssocState, action: str, message: str, code: EventCode
    ) -> None:
        self._emit(state, action, Outcome.SERIOUS_FAILURE, code, message=message)

    def _on_end(self, event: evt.Event) -> None:
        with self._lock:
            state = self._states.pop(event.assoc, None)
        if state is None or state.node is None or not state.outcomes:
            return
        refused = state.outcomes["failed"] + state.outcomes["refused"]
        outcome = Outcome.MINOR_FAILURE if refused else Outcome.SUCCESS
        self._emit(
            state, "dicom.store.association", outcome, EventCode.INSTANCES_TRANSFERRED,
            study_uids=tuple(sorted(state.studies)), detail=dict(sorted(state.outcomes.items())),
        )


def _element(tag: int, vr: bytes, value: bytes) -> bytes:
    """One explicit VR little endian element of group 0002."""
    group, elem = tag >> 16, tag & 0xFFFF
    if vr in (b"OB", b"UN", b"OW", b"SQ", b"UT", b"UC", b"UR"):
        return struct.pack("<HH2sHI", group, elem, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", group, elem, vr, len(value)) + value


def _ui(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def _file_meta(sop_class: str, sop_instance: str, transfer_syntax: str) -> bytes:
    """The preamble, prefix and group 0002 exactly as pynetdicom's ``encode_file_meta``
    writes them (proved by a test), without building pydicom datasets per image."""
    version = PYNETDICOM_IMPLEMENTATION_VERSION.encode("ascii")
    if len(version) % 2:
        version += b" "
    body = b"".join((
        _element(0x00020001, b"OB", b"\x00\x01"),
        _element(0x00020002, b"UI", _ui(sop_class)),
        _element(0x00020003, b"UI", _ui(sop_instance)),
        _element(0x00020010, b"UI", _ui(transfer_syntax)),
        _element(0x00020012, b"UI", _ui(PYNETDICOM_IMPLEMENTATION_UID)),
        _element(0x00020013, b"SH", version),
    ))
    length = _element(0x00020000, b"UL", struct.pack("<I", len(body)))
    return b"\x00" * 128 + b"DICM" + length + body


def part10(event: evt.Event) -> bytes:
    """The received C-STORE dataset as a Part 10 stream (``encoded_dataset(True)``)."""
    request = event.request
    assert isinstance(request, C_STORE)
    uids = (str(request.AffectedSOPClassUID or ""), str(request.AffectedSOPInstanceUID or ""),
            str(event.context.transfer_syntax or ""))
    data = request.DataSet
    if not isinstance(data, io.BytesIO) or not all(
            0 < len(u) <= 64 and u.isascii() and "\x00" not in u for u in uids):
        return bytes(event.encoded_dataset(include_meta=True))
    view = data.getbuffer()
    try:
        return b"".join((_file_meta(*uids), view))
    finally:
        view.release()


class _PolicyServer(ThreadedAssociationServer):
    """Filters connections by source address; TLS happens in the connection's thread."""

    pv_service: DicomService
    pv_tls: bool

    def get_request(self) -> tuple[socket.socket, Any]:
        # Not wrapped here: a handshake in the accept loop would let one slow client
        # stall every other connection.
        assert self.socket is not None
        return self.socket.accept()

    def verify_request(self, request: Any, client_address: Any) -> bool:
        peer = Peer(str(client_address[0]), int(client_address[1]), self.pv_tls)
        if not self.pv_service.policy.connection_allowed(peer):
            return False
        # Runs in the accept loop, before a byte is read: the connection's budget.
        ticket = self.pv_service.budget.admit(peer.address)
        if isinstance(ticket, str):
            self.pv_service.refused(peer.address, ticket,
                                    {"port": "tls" if self.pv_tls else "plain"})
            return False
        with self._pv_lock:
            self._pv_tickets[request] = ticket
        return True

    _pv_lock = threading.Lock()
    _pv_tickets: dict[Any, Ticket]

    def take_ticket(self, request: Any) -> Ticket | None:
        with self._pv_lock:
            return self._pv_tickets.pop(request, None)


class _PolicyRequestHandler(RequestHandler):
    pv_service: DicomService
    pv_tls: ssl.SSLContext | None = None
    _pv_ticket: Ticket | None = None
    _pv_handed_over = False

    def setup(self) -> None:
        server = self.server
        assert isinstance(server, _PolicyServer)
        self._pv_ticket = server.take_ticket(self.request)

    def finish(self) -> None:
        # A failed TLS handshake (or anything before the association thread took over)
        # gives its budget back here; otherwise the association thread does at its end.
        if self._pv_ticket is not None and not self._pv_handed_over:
            self.pv_service.budget.release(self._pv_ticket)

    def handle(self) -> None:
        address, port = str(self.client_address[0]), int(self.client_address[1])
        # DIMSE is request/response: Nagle would hold each small reply ~40 ms.
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        has_cert = False
        certificate: PeerCertificate | None = None
        cipher = ""
        if self.pv_tls is not None:
            raw = self.request
            # The handshake is the connection's first phase: its deadline applies.
            raw.settimeout(min(TLS_HANDSHAKE_TIMEOUT, self.pv_service.read_limits.connect_timeout))
            ctx = self.pv_service.tls_context_for(address, self.pv_tls)
            try:
                wrapped = ctx.wrap_socket(raw, server_side=True)
            except (ssl.SSLError, OSError) as exc:
                # One by one at a human pace, counted in a flood (audit/refusals).
                self.pv_service.refusals.burst(
                    AuditEvent(
                        action="dicom.tls.handshake_failed",
                        outcome=Outcome.MINOR_FAILURE,
                        code=EventCode.SECURITY_ALERT,
                        actor_address=address,
                        message=getattr(exc, "reason", None) or type(exc).__name__,
                    )
                )
                raw.close()
                return
            wrapped.settimeout(None)
            # The verified client certificate itself (the dict form is empty for a
            # certificate it cannot map): the policy binds it to the calling AE.
            der = wrapped.getpeercert(binary_form=True)
            certificate = peer_certificate(der) if der else None
            has_cert = certificate is not None
            negotiated = wrapped.cipher()
            cipher = negotiated[0] if negotiated else ""
            self.request = wrapped
        self._pv_peer = Peer(address, port, self.pv_tls is not None, has_cert, certificate,
                             cipher)
        super().handle()

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        ticket = self._pv_ticket
        service = self.pv_service
        guard = None
        if ticket is not None:
            guard = ConnectionGuard(
                limits=service.read_limits, address=ticket.address,
                port="tls" if self.pv_tls is not None else "plain", ticket=ticket,
                budget=service.budget, on_refusal=service.refused,
            )
            self._pv_handed_over = True
        accelerate(assoc, guard)
        assert isinstance(assoc, FastAssociation)
        assoc._pv_intercept = service.intercept
        self.pv_service._register(assoc, self._pv_peer)
        assoc.acse = _PolicyACSE(assoc, self.pv_service)
        return assoc


def _copy_context(cx: PresentationContext) -> PresentationContext:
    new = copy.copy(cx)
    # The only part an association changes. The private list, not the public setter: the
    # setter re-validates every UID with a regex, as slow as the deep copy it replaces.
    new._transfer_syntax = list(cx._transfer_syntax)
    return new


class _ContextList(list[PresentationContext]):
    """The server's supported contexts, cheap to copy for each association.

    pynetdicom deep-copies them for every association it accepts: with every storage
    class in both roles and every transfer syntax (170 x 39) that was ~146 ms per
    association, most of a C-FIND's latency. Each context's own transfer-syntax list is
    all that an association changes (``restrict_contexts`` reorders it), so a shallow copy
    of each context with a new list keeps associations isolated at ~1 ms.
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> list[PresentationContext]:
        return [_copy_context(cx) for cx in self]


class _PolicyACSE(ACSE):
    """Applies the association policy before pynetdicom's own negotiation."""

    def __init__(self, assoc: Association, service: DicomService) -> None:
        super().__init__(assoc)
        self._pv_service = service

    def _negotiate_as_acceptor(self) -> None:
        rq = self.requestor.primitive
        if rq is None:  # pynetdicom only calls us with a request; keep its own handling
            super()._negotiate_as_acceptor()
            return
        self.requestor.ae_title = rq.calling_ae_title
        try:
            allowed, reason = self._pv_service.decide(
                self.assoc, str(rq.calling_ae_title), str(rq.called_ae_title)
            )
        except Exception as exc:
            # An index that cannot answer this moment must not leave the peer waiting for
            # its ACSE timeout with no answer: a transient rejection, which a modality
            # retries (PS3.8 9.3.4); the log names the failure, not the peer's data.
            log.error("association check failed (%s); rejected as transient",
                      type(exc).__name__)
            self.send_reject(0x02, 0x01, 0x01)
            evt.trigger(self.assoc, evt.EVT_REJECTED, {})
            self.assoc.kill()
            return
        if not allowed:
            self.send_reject(0x01, 0x01, reason)
            evt.trigger(self.assoc, evt.EVT_REJECTED, {})
            self.assoc.kill()
            return
        guard = getattr(self.assoc.dul, "_pv_guard", None)
        if guard is not None and not self._pv_service.budget.associate(guard.ticket):
            # Every association slot is taken by accepted associations (half-open
            # connections never hold one): transient, local limit exceeded (PS3.8 9.3.4).
            guard.refuse("local-limit", {"ae": str(rq.calling_ae_title).strip()[:16]})
            self.send_reject(0x02, 0x03, 0x02)
            evt.trigger(self.assoc, evt.EVT_REJECTED, {})
            self.assoc.kill()
            return
        self._pv_service.restrict_contexts(self.assoc, rq.presentation_context_definition_list)
        super()._negotiate_as_acceptor()
