"""The security headers added to the raw header list (issue 17) exactly as
``MutableHeaders`` did: every default once, a response's own value kept, the response's own
list left unchanged; and a name the response set in capitals is not doubled (where
``MutableHeaders`` compared raw names as they were)."""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.datastructures import MutableHeaders

from pacsvault.web.security import HEADERS, SecurityHeaders


def _reference(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    message: dict[str, Any] = {"type": "http.response.start", "headers": headers}
    mutable = MutableHeaders(scope=message)
    for name, value in HEADERS.items():
        if name not in mutable:
            mutable[name] = value
    return list(message["headers"])


def _through_middleware(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    sent: list[dict[str, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b""})

    async def send(message: Any) -> None:
        sent.append(message)

    async def receive() -> Any:
        return {"type": "http.request"}

    asyncio.run(SecurityHeaders(app)({"type": "http"}, receive, send))
    return list(sent[0]["headers"])


def test_same_headers_as_mutable_headers() -> None:
    cases = [
        [],
        [(b"content-type", b"application/dicom+json"), (b"content-length", b"2")],
        [(b"content-security-policy", b"default-src 'self' 'unsafe-eval'")],
        [(b"cache-control", b"max-age=60"), (b"x-frame-options", b"SAMEORIGIN")],
    ]
    for headers in cases:
        own = list(headers)
        got = _through_middleware(headers)
        assert got == _reference(list(own))
        assert headers == own  # the response's own list untouched
        names = [name.lower() for name, _ in got]
        assert len(names) == len(set(names))
        assert set(names) >= {name.lower().encode() for name in HEADERS}


def test_a_name_in_capitals_is_not_doubled() -> None:
    got = _through_middleware([(b"Cache-Control", b"max-age=60")])
    names = [name.lower() for name, _ in got]
    assert len(names) == len(set(names))
    assert (b"Cache-Control", b"max-age=60") in got
