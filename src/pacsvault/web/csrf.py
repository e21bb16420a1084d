"""Cross-site request forgery protection: a synchronizer token per session.

Every server-side session (anonymous ones on the sign-in form included) holds a random
token. A state-changing request (POST, PUT, PATCH, DELETE) that comes with a session cookie
must carry that token, either in the ``X-CSRF-Token`` header (scripts, DICOMweb clients
using the browser session) or in the ``csrf`` field of an url-encoded form (the pages'
forms). ``SameSite=Strict`` on the cookie already keeps most cross-site requests from
carrying it; the token is the rule that does not depend on the browser.

Requests without a session cookie need no token: an API token in the ``Authorization``
header is never sent by a browser on its own, so it cannot be forged that way.

The form is read here, before the application sees it, so the body is buffered (at most
``MAX_FORM_BYTES``) and handed on unchanged.
"""

from __future__ import annotations

import hmac
import secrets
from urllib.parse import parse_qs

from starlette.types import Message, Receive, Scope

FIELD = "csrf"
HEADER = b"x-csrf-token"
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
FORM_TYPE = "application/x-www-form-urlencoded"
MAX_FORM_BYTES = 64 * 1024


class FormTooLarge(Exception):
    """An url-encoded form above ``MAX_FORM_BYTES`` (none of ours comes close)."""


def new_token() -> str:
    """256 random bits, url-safe."""
    return secrets.token_urlsafe(32)


def matches(expected: str, given: str) -> bool:
    """Constant-time comparison; an empty token never matches."""
    if not expected or not given:
        return False
    return hmac.compare_digest(expected.encode("ascii", "replace"),
                               given.encode("ascii", "replace"))


def is_unsafe(scope: Scope) -> bool:
    return str(scope.get("method", "GET")).upper() in UNSAFE_METHODS


def _header(scope: Scope, name: bytes) -> str:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return ""


async def submitted_token(scope: Scope, receive: Receive) -> tuple[str, Receive]:
    """The token a request carries, and a ``receive`` that replays its body.

    The header wins; otherwise, for an url-encoded form, the ``csrf`` field.
    """
    header = _header(scope, HEADER).strip()
    if header:
        return header, receive
    content_type = _header(scope, b"content-type").split(";", 1)[0].strip().lower()
    if content_type != FORM_TYPE:
        return "", receive
    chunks: list[bytes] = []
    size = 0
    more = True
    while more:
        message = await receive()
        if message["type"] != "http.request":
            # The client went away; let the application see the same thing.
            return "", _replay([message], receive)
        body = bytes(message.get("body", b""))
        size += len(body)
        if size > MAX_FORM_BYTES:
            raise FormTooLarge
        chunks.append(body)
        more = bool(message.get("more_body", False))
    body = b"".join(chunks)
    values = parse_qs(body.decode("latin-1"), keep_blank_values=True).get(FIELD, [""])
    replay = _replay([{"type": "http.request", "body": body, "more_body": False}], receive)
    return values[0], replay


def _replay(messages: list[Message], then: Receive) -> Receive:
    """Hand out ``messages`` first, then whatever the server sends (e.g. a disconnect)."""
    pending = list(messages)

    async def replay() -> Message:
        if pending:
            return pending.pop(0)
        return await then()

    return replay
