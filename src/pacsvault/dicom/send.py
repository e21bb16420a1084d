"""C-STORE as SCU to a registered node: ``pacsvault send``, the web "send to", forwarding.

Why one module for the three: data leaving the archive on the archive's own initiative
must obey the same rules as a C-MOVE (``dicom/qr``): only to a node of the registry that
holds the ``retrieve`` role and has a port, over TLS when the node is registered with it
(the same client context: the vault CA verifies the peer, our client certificate is
presented), each object sent as stored when the receiver accepted its (SOP class, syntax)
— byte for byte, ``retrieve.Raw`` — else decoded losslessly to uncompressed little endian
(``transcode``), else failed and counted. Every transfer is two audit records: a begin
record written *before* anything leaves (``required``: no record, nothing sent) and an
outcome with the counts; the UIDs go in the sealed references only.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import AE, build_context, evt
from sqlalchemy import Select
from sqlalchemy.exc import OperationalError

from pacsvault.audit import AuditEvent, AuditUnavailable, EventCode, Outcome
from pacsvault.crypto.objects import ObjectFormatError
from pacsvault.crypto.tls import client_context
from pacsvault.dicom import patches, reactor, retrieve, transcode
from pacsvault.dicomfile import inflate
from pacsvault.index.models import Instance, Series, Study
from pacsvault.index.nodes import NodeInfo
from pacsvault.index.records import StoredInstance, select_instances
from pacsvault.vault import Vault

log = logging.getLogger("pacsvault.dicom.send")

READ_ATTEMPTS = 3
MAX_CONTEXTS = 120  # pynetdicom's limit is 128 presentation contexts per association
SENT, WARNING, FAILED = "sent", "warning", "failed"
_WARNINGS = frozenset({0xB000, 0xB006, 0xB007})


class SendRefused(Exception):
    """Nothing was sent: unknown node, a node without the retrieve role or a port, nothing
    selected, or the begin record could not be written. The message is user-facing."""


@dataclass(frozen=True)
class InstanceResult:
    """One instance's fate, by its position in the transfer (no UID: printable)."""

    position: int  # 1-based
    outcome: str  # SENT, WARNING or FAILED
    status: int | None = None  # the receiver's C-STORE status, when it answered
    converted_to: str = ""  # the transfer syntax name when it left converted
    reason: str = ""


@dataclass
class SendResult:
    node: str
    requested: int
    results: list[InstanceResult] = field(default_factory=list)
    note: str = ""  # why the transfer as a whole did not go through

    def count(self, outcome: str) -> int:
        return sum(1 for r in self.results if r.outcome == outcome)

    @property
    def sent(self) -> int:
        return self.count(SENT)

    @property
    def warning(self) -> int:
        return self.count(WARNING)

    @property
    def failed(self) -> int:
        return self.requested - self.sent - self.warning

    @property
    def converted(self) -> int:
        return sum(1 for r in self.results if r.converted_to)

    @property
    def ok(self) -> bool:
        return self.failed == 0 and not self.note


Progress = Callable[[InstanceResult], None]


def destination(vault: Vault, ae_title: str, *, actor_user: str = "",
                actor_address: str = "") -> NodeInfo:
    """The registered node ``ae_title`` if data may be sent to it, else ``SendRefused``
    (and a security record: someone tried to send data to where it may not go)."""
    node = vault.nodes.get(ae_title.strip())
    if node is not None and node.port is not None and node.may("retrieve"):
        return node
    why = ("not a registered node" if node is None else
           "the node lacks the retrieve role" if not node.may("retrieve") else
           "the node has no port")
    vault.recorder.emit(AuditEvent(
        action="dicom.send.refused", outcome=Outcome.SERIOUS_FAILURE,
        code=EventCode.SECURITY_ALERT, message=f"send refused: {why}; nothing was sent",
        actor_user=actor_user, actor_address=actor_address,
        detail={"destination": ae_title.strip()[:16]},
    ), required=False)
    raise SendRefused(f"{ae_title.strip()!r} is {why} (sending needs a registered node with "
                      "the retrieve role and a port: 'pacsvault node add/set')")


def retrieval_nodes(vault: Vault) -> list[NodeInfo]:
    """Nodes data may be sent to (the web's "send to" choices)."""
    return [n for n in vault.nodes.all() if n.port is not None and n.may("retrieve")]


def select(vault: Vault, study_uid: str, series_uid: str | None = None) -> list[StoredInstance]:
    """A study's (or one series') instances, quarantined ones excepted, in order."""
    stmt = select_instances().where(Study.study_uid == study_uid.strip(),
                                    Instance.quarantined.is_(None))
    if series_uid:
        stmt = stmt.where(Series.series_uid == series_uid.strip())
    return [item for _, item in load(vault, stmt)]


def load(vault: Vault, stmt: Select[Any]) -> list[tuple[int, StoredInstance]]:
    """``select_instances``' rows with each instance's index key (for the forward queue)."""
    with vault.sessions() as session:
        rows: list[Any] = list(session.execute(stmt.add_columns(Instance.pk)).all())
    return [(int(row[-1]), StoredInstance(
        str(row[0]), str(row[1]), str(row[2]), str(row[3]), _uuid(row[4]), int(row[5]),
        str(row[6]), str(row[7]), 0 if row[8] is None else int(row[9] or 1), str(row[10]),
    )) for row in rows]


def _uuid(value: Any) -> uuid.UUID:
    return value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))


def send(vault: Vault, node_ae: str, items: Sequence[StoredInstance], *, origin: str,
         actor_user: str = "", actor_address: str = "", progress: Progress | None = None,
         cancel: threading.Event | None = None) -> SendResult:
    """Send ``items`` to ``node_ae`` in one association; ``progress`` is called after each
    instance. Raises ``SendRefused`` before anything leaves; afterwards every problem is
    in the result (and its audit record)."""
    node = destination(vault, node_ae, actor_user=actor_user, actor_address=actor_address)
    if not items:
        raise SendRefused("nothing to send (no stored instance matches)")
    studies = tuple(sorted({i.study_uid for i in items}))
    try:
        vault.recorder.emit(AuditEvent(
            action="dicom.send.begin", outcome=Outcome.SUCCESS,
            code=EventCode.BEGIN_TRANSFERRING, actor_user=actor_user,
            actor_address=actor_address, study_uids=studies,
            detail={"destination": node.ae_title, "instances": len(items), "origin": origin},
        ), required=True)
    except AuditUnavailable:
        raise SendRefused("the audit trail cannot be written: nothing was sent") from None
    result = SendResult(node.ae_title, len(items))
    try:
        _transfer(vault, node, list(items), result, progress, cancel)
    except Exception as exc:  # recorded below; the caller sees the result
        log.error("send to %s failed: %s", node.ae_title, type(exc).__name__)
        result.note = result.note or f"the transfer stopped ({type(exc).__name__})"
    _record(vault, result, studies, origin, actor_user, actor_address)
    return result


def _transfer(vault: Vault, node: NodeInfo, items: list[StoredInstance], result: SendResult,
              progress: Progress | None, cancel: threading.Event | None) -> None:
    retrieve.install()  # a Raw leaves as its stored bytes
    patches.configure_pynetdicom()  # a quick rejection read as one; a safe loop pause
    settings = vault.settings.dicom
    ae = AE(ae_title=vault.settings.server.ae_title)
    ae.acse_timeout = settings.association_timeout
    ae.dimse_timeout = settings.pdu_timeout
    ae.network_timeout = settings.network_timeout
    ae.connection_timeout = settings.connect_timeout
    # The association's DUL thread woken by its socket, each plain answer read straight into
    # its status (issue 17: pynetdicom's polls its socket every 1 ms, once per instance)
    reactor.accelerate_requestors(ae)
    pairs = {(i.sop_class, i.transfer_syntax) for i in items}
    contexts = [build_context(c, [t]) for c, t in transcode.offered(pairs)][:MAX_CONTEXTS]
    kwargs: dict[str, Any] = {"contexts": contexts, "ae_title": node.ae_title,
                              "evt_handlers": [(evt.EVT_CONN_OPEN, _no_delay)]}
    if node.tls:
        kwargs["tls_args"] = (client_context(vault.layout.tls, vault.tls_password()),
                              node.host)
    assoc = ae.associate(node.host, int(node.port or 0), **kwargs)  # checked: a port

    def done(entry: InstanceResult) -> None:
        result.results.append(entry)
        if progress is not None:
            progress(entry)

    # (the status each ``send_c_store`` returns is what counts: nothing to count here)
    assoc.__dict__["_pv_store_answered"] = _answered
    if not assoc.is_established:
        result.note = "the destination could not be reached or refused the association"
        for n in range(1, len(items) + 1):
            done(InstanceResult(n, FAILED, reason="not reached"))
        return
    ahead = retrieve.ReadAhead(items, lambda item: _read(vault, item))
    try:
        for n, (item, data) in enumerate(ahead, start=1):
            if cancel is not None and cancel.is_set():
                result.note = "cancelled"
                break
            if not assoc.is_established:
                result.note = "the destination ended the association"
                break
            ds, converted, why = prepare(assoc.accepted_contexts, item, data)
            if ds is None:
                done(InstanceResult(n, FAILED, reason=why))
                continue
            status = assoc.send_c_store(ds)
            code = int(status.Status) if status is not None and "Status" in status else None
            outcome = (SENT if code == 0 else WARNING if code in _WARNINGS else FAILED)
            done(InstanceResult(n, outcome, code, converted,
                                "" if outcome != FAILED else "refused by the receiver"
                                if code is not None else "no answer"))
    finally:
        ahead.close()
        if assoc.is_established:
            assoc.release()
    for n in range(len(result.results) + 1, len(items) + 1):
        done(InstanceResult(n, FAILED, reason=result.note or "not sent"))


def _answered(_status: int) -> None:
    """An answer the DUL thread read (``sendpath.answer``): ``_transfer`` reads its status
    from what ``send_c_store`` returns."""


def _read(vault: Vault, item: StoredInstance) -> bytes:
    """The decrypted object; an index briefly busy (another process writing) is asked
    again rather than failing the rest of the transfer."""
    for attempt in range(READ_ATTEMPTS):
        try:
            return vault.archive.read(item)
        except OperationalError:
            if attempt == READ_ATTEMPTS - 1:
                raise
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def prepare(contexts: Sequence[Any], item: StoredInstance,
            data: bytes | BaseException) -> tuple[Dataset | None, str, str]:
    """(dataset to send or None, syntax name if converted, why not): as stored when the
    receiver accepted the stored pair, else converted, else nothing (``qr._prepare``'s
    rules, without its stubs: here a failure is simply not sent)."""
    split = retrieve.split(data) if isinstance(data, bytes) and item.sop_class else None
    if split is not None and isinstance(data, bytes):
        stored, offset = split
        if transcode.choose(contexts, item.sop_class, stored) == stored:
            return retrieve.Raw(item.sop_class, item.sop_uid, stored, data[offset:]), "", ""
    try:
        if isinstance(data, BaseException):
            raise data
        ds = inflate.read(data)
    except (ObjectFormatError, OSError, inflate.InflateLimitExceeded, OperationalError,
            ValueError) as exc:  # this instance fails; the others still go
        log.error("instance could not be read for sending: %s", type(exc).__name__)
        return None, "", "unreadable in the archive"
    stored = str(ds.file_meta.get("TransferSyntaxUID", ""))
    target = transcode.choose(contexts, str(ds.get("SOPClassUID", "")), stored)
    if target is None:
        return None, "", f"the receiver accepts no syntax this {_name(stored)} object can " \
                         "leave in"
    if target == stored:
        return ds, "", ""
    try:
        return transcode.convert(ds, target), _name(target), ""
    except transcode.TranscodeError:
        return None, "", f"a {_name(stored)} object could not be converted"


def _name(uid: str) -> str:
    return str(UID(uid).name) if uid else "unknown"


def _record(vault: Vault, result: SendResult, studies: tuple[str, ...], origin: str,
            actor_user: str, actor_address: str) -> None:
    done = result.sent + result.warning
    outcome = (Outcome.SUCCESS if result.ok else
               Outcome.MINOR_FAILURE if done else Outcome.SERIOUS_FAILURE)
    converted: Counter[str] = Counter(r.converted_to for r in result.results if r.converted_to)
    vault.recorder.emit(AuditEvent(
        action="dicom.send", outcome=outcome, code=EventCode.INSTANCES_TRANSFERRED,
        actor_user=actor_user, actor_address=actor_address, study_uids=studies,
        message=result.note,
        detail={"destination": result.node, "origin": origin, "requested": result.requested,
                "sent": result.sent, "warning": result.warning, "failed": result.failed,
                "converted": result.converted,
                "converted_to": ", ".join(f"{k}: {v}" for k, v in sorted(converted.items()))},
    ), required=False)  # the begin record was the one the data waited for


def _no_delay(event: evt.Event) -> None:
    """No Nagle delay on each C-STORE request."""
    sock = getattr(event.assoc.dul.socket, "socket", None)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


__all__ = ["FAILED", "SENT", "WARNING", "InstanceResult", "SendRefused", "SendResult",
           "destination", "load", "prepare", "retrieval_nodes", "select", "send"]
