"""Who may talk to the archive: trusted networks, registered nodes, TLS requirements.

Deny by default. A connection from outside the trusted networks is refused before any
DICOM byte is read and raises an exposure alert, because the only way such a packet reaches
a practice server is a port forward or DMZ rule on the internet box. Associations are then
checked against the node registry (calling AE + source address), the called AE, and the
node's transport requirements, and rejected with the matching A-ASSOCIATE-RJ reason.

A ``--client-cert`` node is bound to its own certificates: the one presented must name the
calling AE (CN and ``urn:pacsvault:node:`` URI SAN), allow client authentication, and have
a serial the registry issued to that node and has not revoked (read from the index at each
association, so ``node cert --revoke`` applies without a restart). Any mismatch is rejected
with reason 1 "no reason given", like a missing certificate: the peer learns nothing about
which check failed, while the audit event says it (with the serial, never patient data).
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

from pacsvault.audit import AuditEvent, EventCode, Outcome, Recorder
from pacsvault.config import Settings, peer_ip
from pacsvault.crypto.tls import LEGACY_AES_CIPHERS, PeerCertificate
from pacsvault.index.nodes import CERT_REVOKED, CERT_VALID, NodeInfo, NodeRegistry

# A-ASSOCIATE-RJ diagnostics, source "service user" (PS3.8 9.3.4)
REASON_NO_REASON = 0x01
REASON_CALLING_AE = 0x03
REASON_CALLED_AE = 0x07

EXPOSURE_MESSAGE = (
    "EXPOSURE: this server is reachable from outside the practice network. A connection "
    "to the {port_kind} DICOM port came from {address}, which is not in the trusted "
    "networks. Check the internet box for port forwarding or a DMZ pointing at this "
    "server, and remove it. The connection was refused."
)


@dataclass(frozen=True)
class Peer:
    address: str
    port: int
    tls: bool
    has_client_cert: bool = False
    # The client certificate the TLS layer verified against the vault CA, if any.
    certificate: PeerCertificate | None = None
    # The negotiated TLS suite (OpenSSL name), "" on the plain port.
    cipher: str = ""

    @property
    def legacy_cipher(self) -> bool:
        """Connected with the retired AES profile's suite (no forward secrecy)."""
        return self.cipher in LEGACY_AES_CIPHERS


@dataclass(frozen=True)
class Decision:
    node: NodeInfo | None
    reason: int = 0
    why: str = ""
    # The calling AE is a registered node refused for how it connected (transport).
    registered: bool = False

    @property
    def allowed(self) -> bool:
        return self.node is not None


def _host_matches(host: str, address: str) -> bool:
    """Compare a registered host (address or name) with the peer's source address."""
    peer = peer_ip(address)
    if peer is None:
        return False
    try:
        return ipaddress.ip_address(host) == peer
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return any(ipaddress.ip_address(str(info[4][0]).split("%")[0]) == peer for info in infos)


class AssociationPolicy:
    def __init__(self, settings: Settings, nodes: NodeRegistry, recorder: Recorder) -> None:
        self._settings = settings
        self._nodes = nodes
        self._recorder = recorder

    def connection_allowed(self, peer: Peer) -> bool:
        if self._settings.is_trusted(peer.address):
            return True
        if peer.tls and self._settings.dicom.tls_from_anywhere:
            return True
        self._recorder.emit(
            AuditEvent(
                action="exposure",
                outcome=Outcome.MAJOR_FAILURE,
                code=EventCode.SECURITY_ALERT,
                actor_address=peer.address,
                message=EXPOSURE_MESSAGE.format(
                    port_kind="TLS" if peer.tls else "plain", address=peer.address
                ),
                detail={"port": "tls" if peer.tls else "plain"},
            )
        )
        return False

    def legacy_tls_source(self, address: str) -> bool:
        """Whether ``address`` is the host of a TLS node opted in to the retired AES
        profile (the TLS handshake may then offer its suite; see ``_decide``)."""
        return any(node.legacy_tls and node.tls and _host_matches(node.host, address)
                   for node in self._nodes.all())

    def check_association(self, peer: Peer, calling_ae: str, called_ae: str) -> Decision:
        calling_ae, called_ae = calling_ae.strip(), called_ae.strip()
        decision = self._decide(peer, calling_ae, called_ae)
        if not decision.allowed:
            self._recorder.emit(
                AuditEvent(
                    action="dicom.association.rejected",
                    outcome=Outcome.MINOR_FAILURE,
                    code=EventCode.SECURITY_ALERT,
                    actor_ae=calling_ae,
                    actor_address=peer.address,
                    message=decision.why,
                    detail={"called_ae": called_ae, "tls": peer.tls,
                            **({"cipher": peer.cipher} if peer.cipher else {}),
                            **({"registered": True} if decision.registered else {}),
                            **({"cert_serial": peer.certificate.serial_hex}
                               if peer.certificate is not None else {})},
                )
            )
        return decision

    def _decide(self, peer: Peer, calling_ae: str, called_ae: str) -> Decision:
        if called_ae != self._settings.server.ae_title:
            return Decision(None, REASON_CALLED_AE, "called AE title is not this server's")
        node = self._nodes.get(calling_ae)
        if node is None:
            return Decision(None, REASON_CALLING_AE, "calling AE title is not a registered node")
        if not _host_matches(node.host, peer.address):
            # The peer learns only "calling AE not recognised"; the trail says which host
            # the registry expects, so the admin sees a wrong registration at once.
            return Decision(
                None, REASON_CALLING_AE,
                f"node {node.ae_title} is registered for host {node.host}; this connection "
                "came from another address", registered=True,
            )
        if node.tls and not peer.tls:
            # A known device with the wrong transport: say so (issue 12, defect 8), not
            # "unknown node" — the fix is on the device, not in the registry.
            return Decision(
                None, REASON_NO_REASON,
                f"node {node.ae_title} is registered for DICOM TLS only but connected to "
                f"the plain port: set the device to use TLS on port "
                f"{self._settings.dicom.tls_port}", registered=True,
            )
        if peer.legacy_cipher and not node.legacy_tls:
            # The handshake context is chosen by source address before any AE title is
            # known: another device (or AE) at an opted-in node's address gets no share
            # of that node's downgrade.
            return Decision(
                None, REASON_NO_REASON,
                f"node {node.ae_title} connected with the legacy AES TLS suite "
                f"{peer.cipher} but is not opted in (node set --tls-profile legacy-aes)",
                registered=True,
            )
        if node.client_cert:
            why = self._certificate_refusal(peer, node.ae_title)
            if why:
                return Decision(None, REASON_NO_REASON, why, registered=True)
        return Decision(node)

    def _certificate_refusal(self, peer: Peer, ae_title: str) -> str:
        """Why the presented certificate does not prove this node, "" when it does."""
        cert = peer.certificate
        if not peer.has_client_cert or cert is None:
            return "node must present a client certificate"
        if not cert.client_auth:
            return "certificate is not a client certificate"
        if cert.node_ae != ae_title or cert.common_name != ae_title:
            return "certificate was issued for another node or is not a node certificate"
        status = self._nodes.certificate_status(ae_title, cert.serial)
        if status == CERT_REVOKED:
            return "certificate revoked"
        if status != CERT_VALID:
            return "certificate was not issued to this node by this vault"
        return ""
