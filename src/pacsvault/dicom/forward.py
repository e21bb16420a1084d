"""Automatic forwarding (issue 20, part 5): ``[forward] rules`` applied to what was stored.

Why a job over the index and not a hook in the C-STORE handler: the sender's
acknowledgement must never wait for another node (a workstation switched off would slow
every modality down), and an instance is only worth forwarding once it is durably stored,
which the index row proves. So ``tick`` (every few seconds in ``serve``'s job thread):

1. reads the instances indexed since its cursor (index key order), matches each one's
   series modality and sending AE against the rules, and queues (node, instance key) in
   ``forward_queue``; cursor and queue rows are written in one transaction, so a restart
   neither loses nor repeats anything. The cursor starts at the newest instance when
   forwarding is first seen: enabling a rule does not send the whole archive;
2. sends what is due, one association per node and pass (``dicom/send``: the same rules,
   TLS, conversion and audit as any data leaving), the rows taken first by one
   conditional update (``_claim``: instances sharing one index never send one twice); a sent
   instance leaves the queue, a failed one is retried after ``retry_seconds``, doubling
   up to ``max_retry_seconds``, and after ``alert_after`` attempts a ``forward.failing``
   record (serious failure) says so once. Nothing is dropped silently; an instance
   erased or quarantined meanwhile leaves the queue unsent.

The queue holds index keys and AE titles only: no UID or patient data in clear.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
from collections import defaultdict
from collections.abc import Callable

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Integer,
    MetaData,
    String,
    Table,
    UniqueConstraint,
    delete,
    func,
    insert,
    inspect,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

from pacsvault.audit import AuditEvent, EventCode, Outcome
from pacsvault.config.forward import ForwardRule, ForwardSettings
from pacsvault.dicom import send
from pacsvault.index.models import Instance, Series
from pacsvault.index.records import select_instances
from pacsvault.vault import Vault

log = logging.getLogger("pacsvault.dicom.forward")

SCAN = 1000  # index rows read per query when catching up
CURSOR = "instances"
LEASE = 600  # seconds a row taken for sending stays with the instance that took it

metadata = MetaData()
queue = Table(
    "forward_queue", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("node", String(16), nullable=False),
    Column("instance_pk", Integer, nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("due", BigInteger, nullable=False, index=True),  # epoch seconds
    Column("alerted", Boolean, nullable=False, default=False),
    Column("claim", String(16), nullable=False, default=""),  # the pass sending it
    UniqueConstraint("node", "instance_pk", name="uq_forward_queue_node_instance"),
)
cursors = Table(
    "forward_cursor", metadata,
    Column("name", String(16), primary_key=True),
    Column("value", BigInteger, nullable=False),
)


def ensure_tables(vault: Vault) -> None:
    """Made on first use (a vault made before forwarding existed has none)."""
    with contextlib.suppress(OperationalError, ProgrammingError):  # raced by another
        metadata.create_all(vault.engine, checkfirst=True)


def tick(vault: Vault, *, clock: Callable[[], float] = time.time) -> None:
    """One pass: queue what matched since the last pass, then send what is due."""
    rules = vault.settings.forward.rules
    if not rules and not _has_queue(vault):
        return
    ensure_tables(vault)
    if rules:
        try:
            scan(vault, rules, clock())
        except IntegrityError:  # another instance sharing the index queued them first
            log.info("forwarding: rows queued by another instance; next pass")
    deliver(vault, vault.settings.forward, clock)


def _has_queue(vault: Vault) -> bool:
    """Anything left to send though no rule is set (rules removed since)? Asked of the
    catalog first: no failing statement every pass on a vault that never forwarded."""
    if not inspect(vault.engine).has_table(queue.name):
        return False
    try:
        with vault.sessions() as session:
            return session.scalar(select(func.count()).select_from(queue)) != 0
    except (OperationalError, ProgrammingError):  # no table: never forwarded
        return False


def scan(vault: Vault, rules: list[ForwardRule], now: float) -> int:
    """Queue the instances indexed after the cursor that a rule matches; how many."""
    queued = 0
    with vault.sessions() as session, session.begin():
        start = session.scalar(select(cursors.c.value).where(cursors.c.name == CURSOR))
        if start is None:  # forwarding first seen: from now on
            newest = session.scalar(select(func.max(Instance.pk))) or 0
            session.execute(insert(cursors).values(name=CURSOR, value=newest))
            return 0
    while True:
        with vault.sessions() as session, session.begin():
            start = session.scalar(select(cursors.c.value).where(cursors.c.name == CURSOR))
            rows = session.execute(
                select(Instance.pk, Series.modality, Instance.source_ae)
                .join(Series, Instance.series_pk == Series.pk)
                .where(Instance.pk > (start or 0)).order_by(Instance.pk).limit(SCAN)).all()
            if not rows:
                return queued
            waiting = {(str(r[0]), int(r[1])) for r in session.execute(
                select(queue.c.node, queue.c.instance_pk)
                .where(queue.c.instance_pk.in_([int(row[0]) for row in rows]))).all()}
            for pk, modality, source in rows:
                for node in dict.fromkeys(r.node for r in rules
                                          if r.matches(modality or "", source or "")):
                    if (node, int(pk)) in waiting:
                        continue
                    waiting.add((node, int(pk)))
                    session.execute(insert(queue).values(
                        node=node, instance_pk=int(pk), attempts=0, due=int(now),
                        alerted=False))
                    queued += 1
            session.execute(update(cursors).where(cursors.c.name == CURSOR)
                            .values(value=int(rows[-1][0])))
        if len(rows) < SCAN:
            return queued


def deliver(vault: Vault, settings: ForwardSettings,
            clock: Callable[[], float] = time.time) -> None:
    """Send what is due, per node, a batch at a time."""
    now = int(clock())
    with vault.sessions() as session:
        due = session.execute(select(queue.c.id, queue.c.node)
                              .where(queue.c.due <= now).order_by(queue.c.id)
                              .limit(settings.batch * 8)).all()
    chosen: dict[str, list[int]] = defaultdict(list)
    for row_id, node in due:
        if len(chosen[node]) < settings.batch:
            chosen[node].append(int(row_id))
    if not chosen:
        return
    by_node: dict[str, list[tuple[int, int, int, bool]]] = defaultdict(list)
    for row_id, node, pk, attempts, alerted in _claim(
            vault, [i for ids in chosen.values() for i in ids], now):
        by_node[node].append((row_id, pk, attempts, alerted))
    for node, entries in by_node.items():
        _deliver_node(vault, settings, node, entries, clock)


def _claim(vault: Vault, ids: list[int], now: int) -> list[tuple[int, str, int, int, bool]]:
    """Take these rows for this pass (their due time moves ``LEASE`` ahead, marked with a
    token of this pass) except those another instance sharing the index took first; a
    process that dies mid-send leaves its rows to be retried when the lease ends."""
    token = secrets.token_hex(8)
    with vault.sessions() as session, session.begin():
        session.execute(update(queue).where(queue.c.id.in_(ids), queue.c.due <= now)
                        .values(due=now + LEASE, claim=token))
    with vault.sessions() as session:
        rows = session.execute(select(queue.c.id, queue.c.node, queue.c.instance_pk,
                                      queue.c.attempts, queue.c.alerted)
                               .where(queue.c.claim == token).order_by(queue.c.id)).all()
    return [(int(r[0]), str(r[1]), int(r[2]), int(r[3]), bool(r[4])) for r in rows]


def _deliver_node(vault: Vault, settings: ForwardSettings, node: str,
                  entries: list[tuple[int, int, int, bool]],
                  clock: Callable[[], float]) -> None:
    pks = [pk for _, pk, _, _ in entries]
    found = dict(send.load(vault, select_instances().where(
        Instance.pk.in_(pks), Instance.quarantined.is_(None))))
    gone = [row_id for row_id, pk, _, _ in entries if pk not in found]
    present = [e for e in entries if e[1] in found]
    failed_rows: list[tuple[int, int, bool]] = []
    sent_rows = list(gone)
    if present:
        items = [found[pk] for _, pk, _, _ in present]
        try:
            result = send.send(vault, node, items, origin="forward")
            outcomes = {r.position: r.outcome for r in result.results}
        except send.SendRefused as exc:
            log.error("forwarding to %s refused: %s", node, exc)
            outcomes = {}
        for n, (row_id, _, attempts, alerted) in enumerate(present, start=1):
            if outcomes.get(n) in (send.SENT, send.WARNING):
                sent_rows.append(row_id)
            else:
                failed_rows.append((row_id, attempts + 1, alerted))
    now = clock()
    alerts = 0
    with vault.sessions() as session, session.begin():
        if sent_rows:
            session.execute(delete(queue).where(queue.c.id.in_(sent_rows)))
        for row_id, attempts, alerted in failed_rows:
            wait = min(settings.max_retry_seconds,
                       settings.retry_seconds * 2 ** min(attempts - 1, 30))
            alert = attempts >= settings.alert_after and not alerted
            alerts += alert
            session.execute(update(queue).where(queue.c.id == row_id).values(
                attempts=attempts, due=int(now + wait), alerted=alerted or alert))
    if alerts:
        vault.recorder.emit(AuditEvent(
            action="forward.failing", outcome=Outcome.SERIOUS_FAILURE,
            code=EventCode.SECURITY_ALERT,
            message=f"automatic forwarding to {node} keeps failing; still retrying "
                    f"(check the node: 'pacsvault node list', the server's log)",
            detail={"destination": node, "instances": alerts,
                    "attempts": settings.alert_after},
        ), required=False)


def pending(vault: Vault) -> dict[str, int]:
    """Instances waiting per node (for status pages and tests)."""
    try:
        with vault.sessions() as session:
            rows = session.execute(select(queue.c.node, func.count())
                                   .group_by(queue.c.node)).all()
    except (OperationalError, ProgrammingError):
        return {}
    return {str(node): int(count) for node, count in rows}


__all__ = ["deliver", "ensure_tables", "pending", "scan", "tick"]
