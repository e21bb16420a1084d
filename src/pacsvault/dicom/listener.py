"""The listening side of the DICOM service: pynetdicom's transport and ACSE, extended.

Split from ``dicom/server`` (issue 15), which keeps the service (AE, listeners' start and
stop, per-association state, DIMSE handlers). Here are the classes pynetdicom calls for
each connection, in the order it calls them:

- ``PolicyServer``: the accept loop; filters connections by source address and admits them
  to the connection budget before a byte is read (``dicom/limits``);
- ``PolicyRequestHandler``: the connection's handling, in a thread of its own for TLS
  (the handshake, never in the accept loop) or a balancer's PROXY header, from the accept
  loop for a plain connection (nothing read from the peer there); the peer's facts
  (address, client certificate, cipher), the association made event-driven
  (``dicom/reactor``);
- ``PolicyACSE``: the association policy before pynetdicom's own negotiation;
- ``ContextList``: the server's presentation contexts, shared by every association.

They depend on pynetdicom internals registered in ``dicom/patches`` (``UPSTREAM``).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import ssl
import threading
from typing import TYPE_CHECKING, Any

from pynetdicom import evt
from pynetdicom.acse import ACSE
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import AddressInformation, RequestHandler, ThreadedAssociationServer

from pacsvault.audit import AuditEvent, EventCode, Outcome
from pacsvault.crypto.tls import PeerCertificate, peer_certificate
from pacsvault.dicom.limits import ConnectionGuard, Ticket
from pacsvault.dicom.policy import Peer
from pacsvault.dicom.reactor import FastAssociation, accelerate
from pacsvault.proxyproto import ProxyHeaderError, ProxyHeaderMissing, read_header

if TYPE_CHECKING:
    from pacsvault.dicom.server import DicomService

log = logging.getLogger("pacsvault.dicom")

TLS_HANDSHAKE_TIMEOUT = 15.0


class PolicyServer(ThreadedAssociationServer):
    """Filters connections by source address; TLS happens in the connection's thread."""

    pv_service: DicomService
    pv_tls: bool

    def attach(self, service: DicomService, *, tls: bool) -> None:
        """Called by ``DicomService._listen`` once pynetdicom has made the server (its
        constructor is pynetdicom's): the service, the port kind, and cheap context copies."""
        self._pv_tickets = {}
        self._pv_lock = threading.Lock()
        self.contexts = ContextList(self.contexts)
        self.pv_service = service
        self.pv_tls = tls

    # A listening socket bound by ``serve``'s parent and shared by its worker processes
    # (``cli/workers``): used as it is instead of binding one (set per listener class).
    pv_inherited: socket.socket | None = None

    def server_bind(self) -> None:
        inherited = self.pv_inherited
        if inherited is None:
            super().server_bind()
            return
        assert self.socket is not None
        self.socket.close()  # the one TCPServer made, never bound
        self.socket = inherited
        # Every worker's copy shares the open file (and its O_NONBLOCK): non-blocking in
        # all of them, so a worker whose wake-up found the connection taken by another one
        # goes back to its loop (an OSError socketserver ignores) instead of blocking in
        # accept, and its shutdown is never held by it.
        inherited.setblocking(False)
        self.server_address = inherited.getsockname()

    def server_activate(self) -> None:
        if self.pv_inherited is None:  # an inherited socket already listens
            super().server_activate()

    def server_close(self) -> None:
        if self.pv_inherited is None:
            super().server_close()
            return
        # Close this process's descriptor only: pynetdicom's shutdown(SHUT_RDWR) would stop
        # the listening socket itself, for every worker sharing it.
        assert self.socket is not None
        self.socket.close()

    def get_request(self) -> tuple[socket.socket, Any]:
        # Not wrapped here: a handshake in the accept loop would let one slow client
        # stall every other connection.
        assert self.socket is not None
        return self.socket.accept()

    def verify_request(self, request: Any, client_address: Any) -> bool:
        address = str(client_address[0])
        if self.pv_service.vault.settings.is_balancer(address):
            # Its PROXY header names the client; read in the connection's thread (a slow
            # balancer must not stall the accept loop), then ``admit`` for that client.
            return True
        ticket = self.admit(Peer(address, int(client_address[1]), self.pv_tls))
        if ticket is None:
            return False
        with self._pv_lock:
            self._pv_tickets[request] = ticket
        return True

    def admit(self, peer: Peer) -> Ticket | None:
        """The source-address gate and the connection's budget (None: refused, recorded).
        In the accept loop before a byte is read; for a balancer's connection, once its
        PROXY header has named the client."""
        if not self.pv_service.policy.connection_allowed(peer):
            return None
        ticket = self.pv_service.budget.admit(peer.address)
        if isinstance(ticket, str):
            self.pv_service.refused(peer.address, ticket,
                                    {"port": "tls" if self.pv_tls else "plain"})
            return None
        return ticket

    def process_request(self, request: Any, client_address: Any) -> None:
        """A plain connection admitted in ``verify_request`` is handed to its association
        thread from here; a TLS one (handshake) or a load balancer's (PROXY header) gets
        its own connection thread as before.

        Why (issue 17): for a plain connection that thread read nothing from the peer: it
        made the association object and started the association's thread, then ended. A
        thread started and waited for per connection, three in a row with the
        association's and the DUL's, was ~0.5 ms of CPU and a scheduling wait on a busy
        machine, for each C-FIND association. Nothing here waits for the peer (no byte is
        read: that is the association's thread's, under its deadlines), so the accept
        loop is held only for that same short, bounded work."""
        with self._pv_lock:
            admitted = request in self._pv_tickets
        if self.pv_tls or not admitted:
            super().process_request(request, client_address)
            return
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
            self.shutdown_request(request)

    _pv_lock = threading.Lock()
    _pv_tickets: dict[Any, Ticket]

    def take_ticket(self, request: Any) -> Ticket | None:
        with self._pv_lock:
            return self._pv_tickets.pop(request, None)


class PolicyRequestHandler(RequestHandler):
    pv_service: DicomService
    pv_tls: ssl.SSLContext | None = None
    _pv_ticket: Ticket | None = None
    _pv_handed_over = False

    def setup(self) -> None:
        server = self.server
        assert isinstance(server, PolicyServer)
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
        if self._pv_ticket is None and self.pv_service.vault.settings.is_balancer(address):
            client = self._pv_proxied(address, port)
            if client is None:
                return
            address, port = client
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

    def _pv_proxied(self, address: str, port: int) -> tuple[str, int] | None:
        """A balancer's connection: its PROXY header (before any TLS), within the first-byte
        deadline, then the client it names admitted as if it had connected itself. None:
        refused (a missing or malformed header is recorded; a connection closed before a
        byte, a balancer's TCP health check, is not)."""
        server = self.server
        assert isinstance(server, PolicyServer)
        kind = "tls" if self.pv_tls is not None else "plain"
        try:
            header = read_header(self.request, self.pv_service.read_limits.connect_timeout)
        except ProxyHeaderMissing:
            return None
        except ProxyHeaderError as exc:
            self.pv_service.refused(address, "proxy-header", {"port": kind, "why": str(exc)})
            return None
        finally:
            self.request.settimeout(None)
        if header.source is not None:
            address, port = header.source
        elif not self._pv_more(self.pv_service.read_limits.connect_timeout):
            # LOCAL: the balancer's own connection; closed at once, its health check
            # (HAProxy sends the header with its checks): nothing to record, not even a
            # failed TLS handshake.
            return None
        ticket = server.admit(Peer(address, port, self.pv_tls is not None))
        if ticket is None:
            return None
        self._pv_ticket = ticket
        return address, port

    def _pv_more(self, timeout: float) -> bool:
        """Whether a byte follows (peeked, left in place) before EOF or ``timeout``."""
        self.request.settimeout(timeout)
        try:
            return bool(self.request.recv(1, socket.MSG_PEEK))
        except OSError:  # a timeout too: the first-byte deadline would cut it anyway
            return False
        finally:
            self.request.settimeout(None)

    # The two ends as pynetdicom records them, without its ``getaddrinfo`` per address:
    # both are numeric already (from ``accept`` and ``getsockname``), and two resolver
    # calls were a tenth of the work of handing a connection over (issue 17).
    @property
    def local(self) -> AddressInformation:
        return _numeric(self.server.server_address)

    @property
    def remote(self) -> AddressInformation:
        return _numeric(self.client_address)

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
        accelerate(assoc, guard, service.store_received)
        assert isinstance(assoc, FastAssociation)
        assoc._pv_intercept = service.intercept
        self.pv_service.register(assoc, self._pv_peer)
        assoc.acse = PolicyACSE(assoc, self.pv_service)
        return assoc


def _numeric(address: Any) -> AddressInformation:
    """``AddressInformation.from_tuple`` for an address that is numeric already: the same
    object with the same values, without resolving it (a name, never the case here, goes
    through pynetdicom's resolver as before)."""
    host = str(address[0])
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return AddressInformation.from_tuple(address)
    info = AddressInformation.__new__(AddressInformation)
    info._addr = host
    info.port = int(address[1])
    info.flowinfo = int(address[2]) if len(address) > 2 else 0
    info.scope_id = int(address[3]) if len(address) > 3 else 0
    return info


def copy_context(cx: PresentationContext) -> PresentationContext:
    # copy.copy's generic path (__reduce_ex__) costs ~3x this, for each of the ~120
    # contexts a C-GET requestor proposes
    new = PresentationContext.__new__(PresentationContext)
    new.__dict__.update(cx.__dict__)
    # The only part an association changes. The private list, not the public setter: the
    # setter re-validates every UID with a regex, as slow as the deep copy it replaces.
    new._transfer_syntax = list(cx._transfer_syntax)
    return new


class ContextList(list[PresentationContext]):
    """The server's supported contexts, shared by every association, never changed.

    pynetdicom deep-copies them for every association it accepts: with every storage
    class in both roles and every transfer syntax (170 x 39) that was ~146 ms per
    association, most of a C-FIND's latency; a copy of each context with its own
    transfer-syntax list still cost ~0.7 ms. Each association now gets the same context
    objects (``SharedContexts``, with an index by abstract syntax), and
    ``DicomService.restrict_contexts`` copies (``copy_context``) the few the requestor
    asked for before shaping them: nothing ever changes a shared one.
    """

    def __init__(self, contexts: Any = ()) -> None:
        super().__init__(contexts)
        self.pv_by_uid = {str(cx.abstract_syntax): cx for cx in self}

    def __deepcopy__(self, memo: dict[int, Any]) -> SharedContexts:
        return SharedContexts(self)


class SharedContexts(list[PresentationContext]):
    """One association's view of the server's contexts (``ContextList``): read, never
    changed in place (``restrict_contexts`` replaces the list with shaped copies)."""

    def __init__(self, contexts: ContextList) -> None:
        super().__init__(contexts)
        self.pv_by_uid = contexts.pv_by_uid


class PolicyACSE(ACSE):
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

    # An A-RELEASE request taken off the DUL queue and not answered yet.
    _pv_release_taken = False

    def is_release_requested(self) -> bool:
        """pynetdicom's, except that a release taken off the queue stays requested until
        it is answered (``send_release(is_response=True)``).

        Why: pynetdicom 3.0's ``ServiceClass._wrap_handler`` asks between a C-FIND's,
        C-GET's or C-MOVE's answers and, finding a release, takes it and stops the answers;
        the association loop, the one that answers a release, then never saw it: no
        A-RELEASE-RP, the peer left waiting and the connection, with its slot of the
        per-source budget, held until the idle timeout
        (``tests/test_release_while_pending.py``)."""
        if self._pv_release_taken:
            return True
        if super().is_release_requested():
            self._pv_release_taken = True
            return True
        return False

    def send_release(self, is_response: bool = False) -> None:
        if is_response:
            self._pv_release_taken = False
        super().send_release(is_response)
