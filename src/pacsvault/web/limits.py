"""The HTTPS listener's connection budget: slow clients are cut, no source takes it all.

Why: uvicorn has no deadline for a request's headers or body, so a client sending its
headers one byte at a time holds a connection forever; a few hundred of them and the
physicians' browsers get nothing. This protocol class (uvicorn's own ``HttpToolsProtocol``
plus a budget) gives every connection:

- admission by ``dicom.limits.ConnectionBudget``: at most ``max_connections_per_source``
  at once per source address and ``max_connections`` in all; over it the
  connection is closed at once;
- a deadline for the request's headers (``header_timeout``, also the TLS handshake's,
  see ``web.server``), then one for its body (``body_timeout`` plus one second per MiB
  received, so big STOW uploads at any sane speed go through); between requests uvicorn's
  keep-alive timeout applies;
- a size limit for the request line and headers (``MAX_HEAD``: 431 and closed), which the
  parser itself does not have (llhttp keeps no buffer; uvicorn and httptools gather the
  URL and each header in memory until it ends);
- each refusal or cut recorded through ``audit.refusals.RefusalLog`` (aggregated).

The parser is httptools (llhttp, C), not h11 (pure Python): issue 17, ~0.25-0.5 ms less
per request of a QIDO-RS search or a viewer's frame. The phases follow its callbacks
(message begun, headers complete, message complete).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from pacsvault.config import WebSettings
from pacsvault.dicom.limits import SECONDS_PER_MIB, ConnectionBudget, Ticket

_MIB = float(1 << 20)
# The request line and headers of one request, at most (h11's limit, which uvicorn applied
# before: no browser, viewer or DICOMweb client comes near it).
MAX_HEAD = 16 * 1024
_TOO_LARGE = (b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
              b"content-type: text/plain; charset=utf-8\r\ncontent-length: 34\r\n"
              b"connection: close\r\n\r\nRequest header fields too large.\r\n")

RefusalHook = Callable[[str, str, dict[str, str | int | bool]], None]


@dataclass(frozen=True)
class WebLimits:
    header_timeout: float = 10.0
    body_timeout: float = 60.0
    max_connections: int = 512
    max_connections_per_source: int = 32

    @classmethod
    def from_settings(cls, web: WebSettings) -> WebLimits:
        return cls(web.header_timeout, web.body_timeout, web.max_connections,
                   web.max_connections_per_source)


def guarded_protocol(limits: WebLimits, refused: RefusalHook) -> type[HttpToolsProtocol]:
    """An ``HttpToolsProtocol`` subclass bound to one budget (one per listener)."""
    budget = ConnectionBudget(per_source=limits.max_connections_per_source,
                              pending=limits.max_connections, associations=1)

    class GuardedHttpProtocol(HttpToolsProtocol):
        _pv_ticket: Ticket | None = None
        _pv_timer: asyncio.TimerHandle | None = None
        _pv_phase = ""
        _pv_started = 0.0
        _pv_body = 0
        # Between two requests (or before the first): new bytes begin a request's head.
        _pv_between = True
        # Bytes received since the current request's head began, while it is not complete.
        _pv_head = 0
        _pv_in_head = True
        _pv_too_large = False
        # The client a load balancer's PROXY header named (set by ``web.server._Sniffer``
        # before the connection is made): the source address for every check from here on.
        pv_client: tuple[str, int] | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            if self.pv_client is not None:
                self.client = self.pv_client
            address = self.client[0] if self.client else ""
            ticket = budget.admit(address)
            if isinstance(ticket, str):
                refused(address, ticket, {})
                transport.abort()
                return
            self._pv_ticket = ticket
            self._pv_arm("headers")

        def connection_lost(self, exc: Exception | None) -> None:
            self._pv_disarm()
            if self._pv_ticket is not None:
                budget.release(self._pv_ticket)
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._pv_ticket is None or self.transport.is_closing():
                return  # refused, or answered and closing
            if self._pv_timer is None and self._pv_between:
                self._pv_arm("headers")  # the next request on a kept-alive connection
            if self._pv_phase == "body":
                self._pv_body += len(data)
            if self._pv_in_head:
                self._pv_head += len(data)
            super().data_received(data)
            if self._pv_in_head and self._pv_head > MAX_HEAD:
                self._pv_too_large = True
                self._pv_refuse_head()

        def send_400_response(self, msg: str) -> None:
            """uvicorn's answer to a request the parser stopped at: ours when it was
            stopped for its head's size (``on_headers_complete``)."""
            if self._pv_too_large:
                self._pv_refuse_head()
            else:
                super().send_400_response(msg)

        # --- the parser's callbacks: the phases ----------------------------------------

        def on_message_begin(self) -> None:
            self._pv_between = False
            super().on_message_begin()

        def on_headers_complete(self) -> None:
            self._pv_in_head = False
            # The complete head, measured (a chunk may also hold the body's first bytes)
            size = len(self.url) + sum(len(n) + len(v) + 4 for n, v in self.headers)
            if size > MAX_HEAD:
                self._pv_too_large = True
                raise ValueError("request head too large")  # stops the parser
            super().on_headers_complete()
            self._pv_arm("body")

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._pv_disarm()
            self._pv_between = self._pv_in_head = True
            self._pv_head = 0

        # --- refusals and deadlines -----------------------------------------------------

        def _pv_refuse_head(self) -> None:
            if self.transport.is_closing():
                return
            address = self.client[0] if self.client else ""
            refused(address, "headers-too-large", {"limit": MAX_HEAD})
            self._pv_disarm()
            self.transport.write(_TOO_LARGE)
            self.transport.close()

        def _pv_arm(self, phase: str) -> None:
            self._pv_disarm()
            self._pv_phase = phase
            self._pv_started = self.loop.time()
            self._pv_body = 0
            self._pv_timer = self.loop.call_at(self._pv_deadline(), self._pv_check)

        def _pv_disarm(self) -> None:
            if self._pv_timer is not None:
                self._pv_timer.cancel()
            self._pv_timer, self._pv_phase = None, ""

        def _pv_deadline(self) -> float:
            if self._pv_phase == "headers":
                return self._pv_started + limits.header_timeout
            earned = self._pv_body / _MIB * SECONDS_PER_MIB
            return self._pv_started + limits.body_timeout + earned

        def _pv_check(self) -> None:
            self._pv_timer = None
            if not self._pv_phase or self.transport.is_closing():
                return
            deadline = self._pv_deadline()
            if self.loop.time() < deadline:  # the body earned more time meanwhile
                self._pv_timer = self.loop.call_at(deadline, self._pv_check)
                return
            address = self.client[0] if self.client else ""
            refused(address, "deadline", {"phase": self._pv_phase})
            self._pv_phase = ""
            if self.cycle is not None and not self.cycle.response_complete:
                self.cycle.disconnected = True
                self.cycle.message_event.set()
            self.transport.abort()

    return GuardedHttpProtocol
