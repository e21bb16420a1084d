"""The DICOM listeners' resource budget for every unauthenticated byte.

Why: before an association is accepted the peer is nobody, yet it can make the server
allocate memory (a PDU length is announced before its bytes arrive), hold threads and
association slots (by sending slowly), and write to the log. So, per connection:

- **admission** (``ConnectionBudget.admit``, in the accept loop, before a byte is read):
  at most ``max_connections_per_source`` connections at once per source address,
  at most ``max_pending_connections`` not yet associated, except from the addresses of
  registered nodes (``KnownHosts``), whose per-source budget is every association slot
  (a modality may send over several associations): a flood of unknown sources cannot
  lock a modality out;
- **association slots** (``ConnectionBudget.associate``): counted only for associations
  the policy accepted, so half-open connections never consume them (pynetdicom's own
  count includes every connection thread, which is how 33 one-byte connections refused
  every modality with "Local Limit Exceeded");
- **reads** (``ReadLimits``, applied by ``dicom/reactor``): before the association a PDU
  may announce at most ``association_pdu_limit`` bytes, after it the maximum PDU size we
  negotiated (plus header slack); buffers grow with the bytes that actually arrive; every
  phase has a deadline (first byte, whole association request, each PDU, idle).

Each refusal goes to ``audit.refusals.RefusalLog`` (aggregated per source).
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from pacsvault.config import DicomSettings

# Bytes a P-DATA-TF PDU may exceed the negotiated maximum length by (PDV item headers of
# implementations that count the limit differently).
PDU_SLACK = 4096
# Every MiB received buys a PDU (or an HTTP body) one more second: a slow sender is cut, a
# big transfer at any sane speed is not.
SECONDS_PER_MIB = 1.0
KNOWN_HOSTS_REFRESH = 10.0


def source_key(address: str) -> str:
    """The unit a per-source budget applies to: the address (IPv4-mapped as IPv4).

    Not the IPv6 /64: a practice LAN is usually one /64, every modality would share one
    budget. A host that takes many addresses is bounded by the pending-connection cap.
    """
    try:
        ip = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


@dataclass(frozen=True)
class ReadLimits:
    """What the DUL reactor enforces while reading PDUs from one connection."""

    association_pdu_limit: int
    maximum_pdu_size: int  # ours, as announced in A-ASSOCIATE-AC; 0 = unlimited
    connect_timeout: float
    association_timeout: float
    pdu_timeout: float
    idle_timeout: float

    @classmethod
    def from_settings(cls, dicom: DicomSettings) -> ReadLimits:
        return cls(
            association_pdu_limit=dicom.association_pdu_limit,
            maximum_pdu_size=dicom.maximum_pdu_size,
            connect_timeout=dicom.connect_timeout,
            association_timeout=dicom.association_timeout,
            pdu_timeout=dicom.pdu_timeout,
            idle_timeout=dicom.network_timeout,
        )

    def pdu_limit(self, associated: bool) -> int:
        if not associated:
            return self.association_pdu_limit
        if self.maximum_pdu_size == 0:
            return 0xFFFFFFFF  # unlimited, as negotiated (buffers still grow as bytes arrive)
        return self.maximum_pdu_size + PDU_SLACK


# A refusal callback: (address, reason, detail)
RefusalHook = Callable[[str, str, dict[str, str | int | bool]], None]


class KnownHosts:
    """The addresses of registered nodes, refreshed off the accept loop."""

    def __init__(self, hosts: Callable[[], Iterable[str]]) -> None:
        self._hosts = hosts
        self._addresses: frozenset[str] = frozenset()
        self._next = 0.0
        self._lock = threading.Lock()
        self._refreshing = False

    def __contains__(self, address: str) -> bool:
        if time.monotonic() >= self._next:
            self._refresh_soon()
        return source_key(address) in self._addresses

    def refresh(self) -> None:
        """Resolve every registered host now (names too: this may block on DNS)."""
        found: set[str] = set()
        try:
            hosts = list(self._hosts())
        except Exception:  # the index being busy must not break admission
            hosts = []
        for host in hosts:
            try:
                found.add(source_key(str(ipaddress.ip_address(host))))
                continue
            except ValueError:
                pass
            try:
                for info in socket.getaddrinfo(host, None):
                    found.add(source_key(str(info[4][0])))
            except OSError:
                continue
        self._addresses = frozenset(found)
        self._next = time.monotonic() + KNOWN_HOSTS_REFRESH

    def _refresh_soon(self) -> None:
        with self._lock:
            if self._refreshing:
                return
            self._refreshing = True
            self._next = time.monotonic() + KNOWN_HOSTS_REFRESH

        def run() -> None:
            try:
                self.refresh()
            finally:
                with self._lock:
                    self._refreshing = False

        threading.Thread(target=run, name="known-hosts", daemon=True).start()


@dataclass
class Ticket:
    """One admitted connection's share of the budget (released exactly once)."""

    address: str
    key: str
    associated: bool = False
    released: bool = False


class ConnectionBudget:
    """Connections per source, connections not yet associated, association slots."""

    def __init__(self, *, per_source: int, pending: int, associations: int,
                 known: KnownHosts | None = None) -> None:
        self._per_source = per_source
        self._max_pending = pending
        self._max_associations = associations
        self._known = known
        self._lock = threading.Lock()
        self._by_source: dict[str, int] = {}
        self._pending = 0
        self._associated = 0

    def admit(self, address: str) -> Ticket | str:
        """Take a connection slot: a ticket, or the reason for refusing."""
        key = source_key(address)
        known = self._known is not None and address in self._known
        # A registered modality may open several associations at once, and the slot of
        # one that just ended is given back a few ms after the peer has moved on: its
        # address gets every association slot as its per-source budget. Strangers keep
        # the small one.
        per_source = max(self._per_source, self._max_associations) if known else self._per_source
        with self._lock:
            if self._by_source.get(key, 0) >= per_source:
                return "per-source-limit"
            if self._pending >= self._max_pending and not known:
                return "busy"
            self._by_source[key] = self._by_source.get(key, 0) + 1
            self._pending += 1
        return Ticket(address, key)

    def associate(self, ticket: Ticket) -> bool:
        """Move an admitted connection to an association slot, if one is free."""
        with self._lock:
            if ticket.released or ticket.associated:
                return not ticket.released
            if self._associated >= self._max_associations:
                return False
            ticket.associated = True
            self._pending -= 1
            self._associated += 1
        return True

    def release(self, ticket: Ticket) -> None:
        with self._lock:
            if ticket.released:
                return
            ticket.released = True
            left = self._by_source.get(ticket.key, 0) - 1
            if left > 0:
                self._by_source[ticket.key] = left
            else:
                self._by_source.pop(ticket.key, None)
            if ticket.associated:
                self._associated -= 1
            else:
                self._pending -= 1

    @property
    def counts(self) -> tuple[int, int]:
        """(pending, associated), for tests and diagnostics."""
        with self._lock:
            return self._pending, self._associated


@dataclass
class ConnectionGuard:
    """One connection's budget, as the reactor sees it."""

    limits: ReadLimits
    address: str
    port: str  # "plain" or "tls"
    ticket: Ticket
    budget: ConnectionBudget
    on_refusal: RefusalHook

    def refuse(self, reason: str, detail: dict[str, str | int | bool] | None = None) -> None:
        self.on_refusal(self.address, reason, {**(detail or {}), "port": self.port})

    def release(self) -> None:
        self.budget.release(self.ticket)
