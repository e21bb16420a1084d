"""The DICOM listeners: a plain port and a TLS port, both behind the association policy.

Built on pynetdicom the way it is meant to be extended: a server class (connection
filtering, TLS handshake moved off the accept loop), a request handler (per-connection
peer facts), an ACSE subclass (association policy before negotiation), and event handlers
for the DIMSE services. The first three live in ``dicom/listener`` and the Part 10 header of
received datasets in ``dicom/part10``; this module is the service that owns them (the AE,
the listeners' start and stop, sealed mode, per-association state, the DIMSE handlers).
Statuses come from ``dicom/status``.
"""

from __future__ import annotations

import gc
import logging
import socket
import ssl
import threading
import weakref
from collections.abc import Callable, Mapping
from typing import Any

from pydicom.uid import UID, AllTransferSyntaxes, DeflatedExplicitVRLittleEndian
from pynetdicom import AE, DEFAULT_TRANSFER_SYNTAXES, evt
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_FIND, C_GET, C_MOVE, C_STORE
from pynetdicom.presentation import AllStoragePresentationContexts, PresentationContext
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from pacsvault.audit import AuditEvent, EventCode, Outcome
from pacsvault.audit.refusals import BurstRecorder, RefusalLog
from pacsvault.dicom import patches, sendpath, uidcheck
from pacsvault.dicom.assoc import AssocState
from pacsvault.dicom.limits import ConnectionBudget, KnownHosts, ReadLimits
from pacsvault.dicom.listener import (
    ContextList,
    PolicyRequestHandler,
    PolicyServer,
    copy_context,
)
from pacsvault.dicom.negotiation import Preferences, preference_for
from pacsvault.dicom.part10 import file_meta, part10
from pacsvault.dicom.policy import AssociationPolicy, Peer
from pacsvault.dicom.qr import (
    FIND_CLASSES,
    GET_CLASSES,
    MOVE_CLASSES,
    QueryRetrieve,
    denied_contexts,
    store_outcome,
)
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
from pacsvault.dicom.storewire import StoreCommand
from pacsvault.storage.archive import StoreStatus
from pacsvault.vault import Vault

log = logging.getLogger("pacsvault.dicom")

# Received datasets stay in memory: pynetdicom's chunked mode would spool them, in clear,
# to a temporary file. Query identifiers (names, IDs) must not reach its log either.
# (``patches.PYNETDICOM_CONFIG``; refuses library versions the patches were not written for.)
patches.configure_pynetdicom()
# Registered UIDs (SOP classes, transfer syntaxes) checked once per process (issue 17).
uidcheck.install()


_AssocState = AssocState  # moved to ``dicom/assoc`` (shared with ``qr``)

# Moved to ``dicom/listener`` and ``dicom/part10`` (issue 15); the old names stay here
# for the tests and tools that import them.
_ContextList = ContextList
_file_meta = file_meta


def _taken(stream: list[bytes | memoryview]) -> bytes:
    """The received pieces (``dicom/storewire``) joined into the ``bytes`` the parser reads
    without a copy of its own, the pieces (and the PDUs they view) let go at once:
    otherwise both stay alive until the response is sent, one more full copy of every
    image in flight (issue 17, peak memory during ingest: a CR is ~10 MB, per
    association)."""
    data = b"".join(stream)
    stream.clear()
    return data


_FROZEN = threading.Lock()
_frozen = False


def freeze_heap() -> None:
    """Move what the process holds at start (modules, settings, the vault's objects: ~130k
    objects) out of the garbage collector's sight, once per process (``gc.freeze``).

    Why (issue 17): pynetdicom's accept loop runs a *full* ``gc.collect()`` every 60
    connections (``AssociationServer.service_actions``: its dead associations' cycles),
    which took 120-220 ms here with the GIL held: every thread stops, and one query in 60
    waits that long. Frozen, the start-up heap is no longer scanned and the same
    collection takes ~2 ms; everything created later is collected as before. The cost:
    a cycle among start-up objects that dies later is never collected (acyclic ones are
    freed by reference counting as always)."""
    global _frozen
    with _FROZEN:
        if _frozen:
            return
        _frozen = True
    gc.collect()
    gc.freeze()


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
        # ``serve --workers``: this process's worker number, named in each accepted
        # association's event (which process served it); None for a single process.
        self.worker: int | None = None
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
        # our ConnectionBudget counts association slots instead (see listener.PolicyACSE).
        ae.maximum_associations = 1 << 30
        return ae

    def start(self, bind: str, port: int | None, tls_port: int | None, *,
              sockets: Mapping[str, list[socket.socket]] | None = None) -> dict[str, int]:
        """Start the listeners; returns the ports actually bound (port 0 = any free).

        ``sockets`` ("plain", "tls"): listening sockets bound by ``serve --workers``'s
        parent, accepted on instead of binding ``port``/``tls_port`` (``cli/workers``).
        ``bind = "private"``: one listener per private address (``service.bind``)."""
        inherited = dict(sockets or {})
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
        freeze_heap()
        if tls_port is not None:
            ctx = self._tls_context()
            bound["dicom_tls_port"] = self._listen_all(bind, tls_port, handlers, ctx,
                                                       inherited.get("tls"))
        if port is not None:
            bound["dicom_port"] = self._listen_all(bind, port, handlers, None,
                                                   inherited.get("plain"))
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

    def _listen_all(
        self, bind: str, port: int, handlers: list[Any], ctx: ssl.SSLContext | None,
        inherited: list[socket.socket] | None,
    ) -> int:
        """One listener per inherited socket, or per address of ``bind``, all on one port
        (port 0: the one the first listener got). A failure leaves the started ones
        registered: ``stop`` (the caller's cleanup) ends them."""
        if inherited:
            # pynetdicom resolves the address it is given: each socket's own
            ports = [self._listen(str(sock.getsockname()[0]), port, handlers, ctx, sock)
                     for sock in inherited]
            return ports[0]
        from pacsvault.service.bind import addresses

        for address in addresses(bind):
            port = self._listen(address, port, handlers, ctx)
        return port

    def _listen(
        self, bind: str, port: int, handlers: list[Any], ctx: ssl.SSLContext | None,
        inherited: socket.socket | None = None,
    ) -> int:
        service = self

        class Handler(PolicyRequestHandler):
            pv_service = service
            pv_tls = ctx

        class Server(PolicyServer):
            pv_inherited = inherited
            address_family = socket.AF_INET6 if ":" in bind else socket.AF_INET

        server = self.ae.make_server(
            (bind, port),
            evt_handlers=handlers,
            server_class=Server,
            request_handler=Handler,
        )
        assert isinstance(server, PolicyServer)
        server.attach(self, tls=ctx is not None)
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

    def register(self, assoc: Association, peer: Peer) -> None:
        """A new association's bookkeeping (called by ``listener.PolicyRequestHandler``)."""
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
        preferred: dict[str, list[str]] = {}
        sending = Preferences(preference_for(
            state.node.ae_title, self.vault.settings.dicom.syntax_preference))
        asked: dict[str, None] = {}  # the requested abstract syntaxes, in order
        for cx in requested:
            uid = str(cx.abstract_syntax)
            asked[uid] = None
            if uid not in receiver_of:
                sending.offer(uid, cx.transfer_syntax)
                continue
            order = preferred.setdefault(uid, [])
            order += [name for name in map(str, cx.transfer_syntax) if name not in order]
        denied = denied_contexts(state.node.roles)
        # Only the contexts the requestor asked for take part in the negotiation
        # (pynetdicom looks ours up by each requested abstract syntax): those are copied
        # and shaped here, the ~170 others are left out (issue 17: the server's list is
        # shared by every association, never changed, ``listener.ContextList``).
        supported = assoc.acceptor.supported_contexts
        ours = getattr(supported, "pv_by_uid", None)
        if ours is None:
            ours = {str(cx.abstract_syntax): cx for cx in supported}
        shaped: list[PresentationContext] = []
        for uid in asked:
            found = ours.get(uid)
            if found is None or uid in denied:
                continue
            cx = copy_context(found)
            shaped.append(cx)
            wanted = preferred.get(uid)
            if wanted:
                # On the private list, ours being validated UIDs already: the setter
                # re-validates each with a regular expression, for the ~120 contexts a
                # C-GET proposes (issue 17: ~30 % of a C-GET association).
                current = list(cx._transfer_syntax)
                first = [t for t in current if t in wanted]
                first.sort(key=wanted.index)
                cx._transfer_syntax = first + [t for t in current if t not in wanted]
                continue
            best = sending.order(uid)
            if best:
                # Only the offered syntaxes we support, best first: the others could never
                # be chosen. Set on the private list (already UIDs, already validated):
                # the setter re-validates each UID, per context, per association.
                ours_by_name = {str(t): t for t in cx._transfer_syntax}
                cx._transfer_syntax = [ours_by_name[t] for t in best if t in ours_by_name]
        if not shaped:
            # Nothing asked is supported (or all of it denied): the whole list as before,
            # unchanged (pynetdicom's answer for an empty list differs in form only).
            shaped = [cx for cx in supported if str(cx.abstract_syntax) not in denied]
        assoc.acceptor.supported_contexts = shaped
        refused = sorted(set(asked) & denied)
        if refused:
            self._emit(
                state, "dicom.qr.contexts_refused", Outcome.MINOR_FAILURE,
                EventCode.SECURITY_ALERT,
                message="query/retrieve contexts refused: the node lacks the role",
                detail={"refused": ",".join(refused), "roles": ",".join(state.node.roles)},
            )

    # --- DIMSE handlers --------------------------------------------------------------

    @sendpath.answers_counted  # as the C-GET's ``_pv_store_answered`` (``qr.on_get``)
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
                    **({"cipher": state.peer.cipher} if state.peer.cipher else {}),
                    **({"worker": self.worker} if self.worker is not None else {})},
        )

    def _on_echo(self, event: evt.Event) -> int:
        return SUCCESS

    def _on_store(self, event: evt.Event) -> int:
        """A C-STORE request on pynetdicom's path (EVT_C_STORE)."""
        request = event.request
        return self._store(event.assoc, lambda: part10(event),
                           request if isinstance(request, C_STORE) else None)

    def store_received(self, assoc: Association, command: StoreCommand,
                       stream: list[bytes | memoryview], context: PresentationContext) -> int:
        """A C-STORE request on the direct receive path (``dicom/storewire``): the same
        checks, archive call, statuses and records as ``_on_store``."""
        return self._store(assoc, lambda: _taken(stream), command)

    def _store(self, assoc: Association, stream: Callable[[], bytes],
               request: C_STORE | StoreCommand | None) -> int:
        state = self.state(assoc)
        node = state.node
        if node is None or not node.may("store"):
            state.outcomes["refused"] += 1
            self._emit_failure(state, "dicom.store.refused", "node lacks the store role",
                               EventCode.SECURITY_ALERT)
            return NOT_AUTHORIZED
        if request is None:
            return PROCESSING_FAILURE
        if isinstance(request, StoreCommand):
            sop_uid, sop_class = request.sop_instance, request.sop_class
        else:
            sop_uid = str(request.AffectedSOPInstanceUID or "")
            sop_class = str(request.AffectedSOPClassUID or "")
        try:
            result = self.vault.archive.store(
                stream(),
                source_ae=node.ae_title,
                expected_sop_uid=sop_uid,
                expected_sop_class=sop_class,
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
