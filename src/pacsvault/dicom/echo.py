"""C-ECHO as SCU to a registered node: the Health page's "test connection" (issue 20, item 7).

Why: "the modality says it cannot reach the archive" and "the archive cannot send to the
workstation" are the first calls an IT provider gets; a verification from the archive
itself to the device's registered host and port (with TLS and the vault's client
certificate when the node is registered with TLS, as ``dicom/send`` connects) answers
half of the question in one click. Only nodes with a port can be reached (a modality that
only sends to the archive has none). The caller audits the attempt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from pacsvault.crypto.tls import client_context
from pacsvault.dicom import patches
from pacsvault.index.nodes import NodeInfo
from pacsvault.vault import Vault

ECHO_TIMEOUT = 10.0  # seconds: a button press must answer


@dataclass(frozen=True)
class EchoResult:
    ok: bool
    reason: str  # "" when ok; "no-port", "unreachable", "rejected", "no-answer", "status"
    status: int | None = None


def echo(vault: Vault, node: NodeInfo) -> EchoResult:
    """One association to ``node`` with the Verification SOP class, one C-ECHO, release."""
    if not node.port:
        return EchoResult(False, "no-port")
    settings = vault.settings.dicom
    patches.configure_pynetdicom()  # a quick rejection read as one, not as an abort
    ae = AE(ae_title=vault.settings.server.ae_title)
    ae.acse_timeout = min(settings.association_timeout, ECHO_TIMEOUT)
    ae.dimse_timeout = min(settings.pdu_timeout, ECHO_TIMEOUT)
    ae.network_timeout = min(settings.network_timeout, ECHO_TIMEOUT)
    ae.connection_timeout = min(settings.connect_timeout or ECHO_TIMEOUT, ECHO_TIMEOUT)
    ae.add_requested_context(Verification)
    kwargs: dict[str, Any] = {"ae_title": node.ae_title}
    if node.tls:
        kwargs["tls_args"] = (client_context(vault.layout.tls, vault.tls_password()),
                              node.host)
    try:
        assoc = ae.associate(node.host, int(node.port), **kwargs)
    except OSError:
        return EchoResult(False, "unreachable")
    if not assoc.is_established:
        return EchoResult(False, "rejected" if assoc.is_rejected else "unreachable")
    try:
        status = assoc.send_c_echo()
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()
    if status is None or "Status" not in status:
        return EchoResult(False, "no-answer")
    code = int(status.Status)
    return EchoResult(code == 0, "" if code == 0 else "status", code)
