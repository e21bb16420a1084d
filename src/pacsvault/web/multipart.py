"""HTTP plumbing of DICOMweb: Accept negotiation, multipart/related in both directions.

Multipart bodies follow RFC 2387 / RFC 2046 as PS3.18 uses them. Parsing is strict about
framing: a body without its closing delimiter is *truncated* and is refused as a whole,
so a broken upload never leaves half of itself in the archive.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

from starlette.requests import ClientDisconnect, Request

from pacsvault.web.headers import parse_media_type, weighted

__all__ = [
    "BodyTooLarge",
    "ClientDisconnect",
    "MediaRange",
    "MultipartError",
    "Part",
    "closing",
    "new_boundary",
    "parse_accept",
    "parse_media_type",
    "parse_related",
    "part_header",
    "read_body",
]


class MultipartError(Exception):
    """The body is not a well-formed (complete) multipart/related message."""


class BodyTooLarge(Exception):
    """The request body exceeds what the route accepts."""


# --- media types and Accept ---------------------------------------------------------------


@dataclass(frozen=True)
class MediaRange:
    """One entry of an Accept header, seen through PS3.18 eyes.

    For ``multipart/related`` the interesting media type is the ``type`` parameter (the
    type of each part); a bare single-part type is treated the same way (lenient).
    """

    mime: str
    params: dict[str, str] = field(default_factory=dict)
    q: float = 1.0

    @property
    def part_type(self) -> str:
        if self.mime == "multipart/related":
            return self.params.get("type", "*/*").strip().lower() or "*/*"
        return self.mime

    @property
    def transfer_syntax(self) -> str | None:
        ts = self.params.get("transfer-syntax")
        return ts.strip() if ts is not None else None

    def matches(self, part_type: str) -> bool:
        """Does this range accept parts of ``part_type`` (a concrete type)?"""
        wanted = self.part_type
        if wanted in ("*/*", "*"):
            return True
        major, _, minor = wanted.partition("/")
        if minor == "*":
            return part_type.split("/", 1)[0] == major
        return wanted == part_type


def parse_accept(header: str | None) -> list[MediaRange]:
    """Accept header -> ranges by preference (q descending, then order); q=0 dropped
    (``headers.weighted``, the parser ``Accept-Language`` uses too).

    A missing or empty header accepts anything (``*/*``).
    """
    if header is None or not header.strip():
        return [MediaRange("*/*")]
    return [MediaRange(item.value, item.params, item.q) for item in weighted(header)]


# --- writing ------------------------------------------------------------------------------


def new_boundary() -> str:
    return f"pacsvault-{secrets.token_hex(16)}"


def part_header(boundary: str, content_type: str, length: int | None = None) -> bytes:
    lines = [f"--{boundary}", f"Content-Type: {content_type}"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


def closing(boundary: str) -> bytes:
    return f"--{boundary}--\r\n".encode("ascii")


# --- reading ------------------------------------------------------------------------------


async def read_body(request: Request, limit: int) -> bytearray:
    """The whole request body, refusing more than ``limit`` bytes (early if announced).

    Raises ``BodyTooLarge`` or starlette's ``ClientDisconnect`` (the client went away: a
    truncated upload, nothing to store).
    """
    announced = request.headers.get("content-length")
    if announced is not None:
        try:
            if int(announced) > limit:
                raise BodyTooLarge
        except ValueError:
            raise MultipartError("invalid Content-Length") from None
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise BodyTooLarge
    return body


@dataclass(frozen=True)
class Part:
    headers: dict[str, str]
    content: memoryview

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "")


def _part_headers(block: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in block.split(b"\r\n"):
        if not line:
            continue
        name, sep, value = line.partition(b":")
        if not sep:
            raise MultipartError("malformed part header")
        headers[name.decode("latin-1").strip().lower()] = value.decode("latin-1").strip()
    return headers


def parse_related(body: bytes | bytearray, boundary: str) -> list[Part]:
    """Split a complete multipart body into its parts (views into ``body``, no copies).

    The closing delimiter must be present: anything else is a truncated or foreign body.
    """
    if not boundary or len(boundary) > 200:
        raise MultipartError("missing or invalid boundary")
    view = memoryview(body)
    dash = b"--" + boundary.encode("latin-1")
    delim = b"\r\n" + dash
    # The first delimiter may open the body (no preamble) or follow a preamble + CRLF.
    if body.startswith(dash):
        pos = len(dash)
    else:
        found = body.find(delim)
        if found < 0:
            raise MultipartError("no multipart boundary in the body")
        pos = found + len(delim)
    parts: list[Part] = []
    while True:
        if body[pos:pos + 2] == b"--":
            return parts  # closing delimiter (an epilogue, if any, is ignored)
        eol = body.find(b"\r\n", pos)
        if eol < 0 or body[pos:eol].strip(b" \t"):
            raise MultipartError("malformed boundary line")
        start = eol + 2
        nxt = body.find(delim, start)
        if nxt < 0:
            raise MultipartError("truncated body: the closing boundary is missing")
        if body.startswith(b"\r\n", start):  # no headers at all
            headers: dict[str, str] = {}
            content_start = start + 2
        else:
            end = body.find(b"\r\n\r\n", start, nxt)
            if end < 0:
                raise MultipartError("part headers are not terminated")
            headers = _part_headers(bytes(body[start:end]))
            content_start = end + 4
        parts.append(Part(headers, view[content_start:nxt]))
        pos = nxt + len(delim)
