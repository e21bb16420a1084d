"""The second factor: RFC 6238 TOTP with replay refusal, and single-use recovery codes.

TOTP uses what every authenticator app expects without asking (Google Authenticator,
FreeOTP, Aegis, Microsoft Authenticator...): HMAC-SHA-1, 6 digits, 30-second steps, a
160-bit secret (RFC 4226 §4 recommends 160). The code of the previous and next step is also
accepted (±1 step), because phones and servers drift by some seconds and typing takes time.

Replay: the step of the last accepted code is stored, and a code is accepted only for a
later step. The update is a conditional ``UPDATE ... WHERE last_step < step``, so two
requests racing with the same code cannot both win. So a code read over a shoulder, from a
screen share or a proxy log is worthless once used, even within its 90-second window.

The secret must be readable by the server (to compute codes), unlike a password, so it is
sealed with AES-256-GCM under a key derived from the master key (``PURPOSE_ACCOUNTS``) and
bound to the user's row (aad): a copy of the database without the master key, or a secret
pasted into another user's row, yields nothing.

The QR code for enrolment is made with ``segno`` (pure Python, no dependency). It contains
the secret: the web layer must serve it only on the enrolment page, with
``Cache-Control: no-store``.

Recovery codes: 10 per user, 16 characters of Crockford's base32 (80 random bits) shown once
as ``XXXX-XXXX-XXXX-XXXX``, stored as Argon2id hashes, each consumed on use. They are for a
lost phone; using one is recorded like any sign-in.
"""

from __future__ import annotations

import base64
import datetime as dt
import io
import re
import secrets
from dataclasses import dataclass
from typing import Any, cast

from argon2 import PasswordHasher, Type
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA1
from cryptography.hazmat.primitives.twofactor import InvalidToken
from cryptography.hazmat.primitives.twofactor.totp import TOTP
from sqlalchemy import CursorResult, or_, select, update
from sqlalchemy.orm import Session

from pacsvault.accounts.models import RecoveryCode, TotpSecret, User
from pacsvault.accounts.passwords import verify_password

# Key derivation label for ``MasterKey.derive``; belongs with the others in crypto/keys.py
# once wired in. Never edit, only add.
PURPOSE_ACCOUNTS = "pacsvault/v1/account-secrets"

TOTP_DIGITS = 6
TOTP_STEP = 30
TOTP_WINDOW = 1
SECRET_BYTES = 20
RECOVERY_CODES = 10
RECOVERY_CHARS = 16

_SEAL_LABEL = b"pacsvault-totp/1:"
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_CROCKFORD_FIX = str.maketrans({"O": "0", "I": "1", "L": "1"})


class SecondFactorError(Exception):
    """A second-factor secret cannot be used (wrong key, damaged row); user-facing."""


def recovery_hasher() -> PasswordHasher:
    """Argon2id at the OWASP minimum (t=2, 19 MiB, p=1) for recovery codes.

    Each code carries 80 random bits, so the hash's cost is not what protects it; a lighter
    setting keeps checking up to ten codes in one sign-in well under a second.
    """
    return PasswordHasher(time_cost=2, memory_cost=19 * 1024, parallelism=1, type=Type.ID)


# --- secrets -------------------------------------------------------------------------------


def new_secret() -> bytes:
    return secrets.token_bytes(SECRET_BYTES)


def _aad(user_pk: int) -> bytes:
    return _SEAL_LABEL + str(user_pk).encode("ascii")


def seal_secret(key: bytes, secret: bytes, user_pk: int) -> bytes:
    nonce = secrets.token_bytes(12)
    return nonce + AESGCM(key).encrypt(nonce, secret, _aad(user_pk))


def open_secret(key: bytes, sealed: bytes, user_pk: int) -> bytes:
    try:
        return AESGCM(key).decrypt(sealed[:12], sealed[12:], _aad(user_pk))
    except (InvalidTag, ValueError):
        raise SecondFactorError(
            "the TOTP secret of this account does not open (wrong key or damaged row); "
            "reset the user's second factor"
        ) from None


def _totp(secret: bytes) -> TOTP:
    # HMAC-SHA-1 is what authenticator apps assume; HMAC does not rely on SHA-1's collision
    # resistance, so RFC 6238's default stays sound.
    return TOTP(secret, TOTP_DIGITS, SHA1(), TOTP_STEP)  # noqa: S303


def secret_base32(secret: bytes) -> str:
    """The secret as authenticator apps take it when typed instead of scanned."""
    return base64.b32encode(secret).decode("ascii").rstrip("=")


def provisioning_uri(secret: bytes, account: str, issuer: str) -> str:
    """``otpauth://totp/<issuer>:<account>?secret=...&issuer=...&algorithm=SHA1&digits=6
    &period=30`` (the Key Uri Format every app reads)."""
    return _totp(secret).get_provisioning_uri(account, issuer)


def qr_svg(uri: str) -> str:
    """The URI as an SVG QR code (inline in the page: no extra request, no image cache)."""
    import segno  # here, not at import: every serving process imports this module (issue 17)

    qr = segno.make(uri, error="m", micro=False)
    out = io.BytesIO()
    qr.save(out, kind="svg", scale=4, border=4, xmldecl=False, svgns=True,
            title="TOTP enrolment")
    return out.getvalue().decode("utf-8")


def qr_png(uri: str) -> bytes:
    import segno

    qr = segno.make(uri, error="m", micro=False)
    out = io.BytesIO()
    qr.save(out, kind="png", scale=6, border=4)
    return out.getvalue()


def generate_code(secret: bytes, when: dt.datetime) -> str:
    """The code for ``when`` (tests, and a CLI check of a freshly enrolled app)."""
    return _totp(secret).generate(int(when.timestamp())).decode("ascii")


def time_step(when: dt.datetime) -> int:
    return int(when.timestamp()) // TOTP_STEP


def normalise_code(code: str) -> str:
    """Digits only: apps show "123 456" and people type the space."""
    return re.sub(r"[\s-]", "", code)


def looks_like_totp(code: str) -> bool:
    text = normalise_code(code)
    return len(text) == TOTP_DIGITS and text.isascii() and text.isdigit()


def match_step(secret: bytes, code: str, when: dt.datetime,
               window: int = TOTP_WINDOW) -> int | None:
    """The time step within ±``window`` of ``when`` whose code is ``code``, latest first.

    ``TOTP.verify`` compares in constant time. Latest first: if a code matched two steps
    (a one-in-a-million coincidence), recording the later one is the safe choice.
    """
    text = normalise_code(code)
    if not looks_like_totp(text):
        return None
    totp = _totp(secret)
    now_step = time_step(when)
    for step in range(now_step + window, now_step - window - 1, -1):
        try:
            totp.verify(text.encode("ascii"), step * TOTP_STEP)
        except InvalidToken:
            continue
        return step
    return None


@dataclass(frozen=True)
class TotpCheck:
    """``reason`` is "" when accepted, else "bad-code" or "replayed-code" (for the trail)."""

    ok: bool
    reason: str = ""
    step: int | None = None


def verify_totp(session: Session, row: TotpSecret, key: bytes, code: str,
                when: dt.datetime) -> TotpCheck:
    """Check a code and, if valid and newer than the last accepted one, record its step.

    Must run inside the caller's transaction; the step is committed with it.
    """
    secret = open_secret(key, row.sealed, row.user_pk)
    step = match_step(secret, code, when)
    if step is None:
        return TotpCheck(False, "bad-code")
    result = cast(CursorResult[Any], session.execute(
        update(TotpSecret)
        .where(TotpSecret.pk == row.pk,
               or_(TotpSecret.last_step.is_(None), TotpSecret.last_step < step))
        .values(last_step=step)
        .execution_options(synchronize_session=False)
    ))
    if result.rowcount != 1:
        return TotpCheck(False, "replayed-code", step)
    session.refresh(row)
    return TotpCheck(True, "", step)


# --- recovery codes ------------------------------------------------------------------------


def new_recovery_code() -> str:
    chars = "".join(secrets.choice(_CROCKFORD) for _ in range(RECOVERY_CHARS))
    return "-".join(chars[i : i + 4] for i in range(0, RECOVERY_CHARS, 4))


def normalise_recovery_code(code: str) -> str:
    """Upper case, separators and spaces off, O→0 and I/L→1 (Crockford's reading rules)."""
    text = "".join(ch for ch in code.upper() if ch.isascii() and ch.isalnum())
    return text.translate(_CROCKFORD_FIX)


def issue_recovery_codes(session: Session, user: User, hasher: PasswordHasher,
                         when: dt.datetime, count: int = RECOVERY_CODES) -> list[str]:
    """Replace the user's recovery codes with ``count`` new ones, returned once in clear."""
    for old in list(user.recovery_codes):
        session.delete(old)
    session.flush()
    codes = [new_recovery_code() for _ in range(count)]
    for code in codes:
        session.add(RecoveryCode(user_pk=user.pk, created=when,
                                 code_hash=hasher.hash(normalise_recovery_code(code))))
    session.flush()
    session.refresh(user)
    return codes


def use_recovery_code(session: Session, user: User, hasher: PasswordHasher, code: str,
                      when: dt.datetime) -> bool:
    """Consume a matching unused code; a code works once (conditional update, race-free)."""
    text = normalise_recovery_code(code)
    if len(text) != RECOVERY_CHARS:
        return False
    unused = session.scalars(
        select(RecoveryCode).where(RecoveryCode.user_pk == user.pk,
                                   RecoveryCode.used_at.is_(None))
    ).all()
    for row in unused:
        if not verify_password(hasher, row.code_hash, text):
            continue
        result = cast(CursorResult[Any], session.execute(
            update(RecoveryCode)
            .where(RecoveryCode.pk == row.pk, RecoveryCode.used_at.is_(None))
            .values(used_at=when)
            .execution_options(synchronize_session=False)
        ))
        if result.rowcount == 1:
            session.refresh(row)
            return True
        return False
    return False


def remaining_recovery_codes(session: Session, user: User) -> int:
    return len(session.scalars(
        select(RecoveryCode.pk).where(RecoveryCode.user_pk == user.pk,
                                      RecoveryCode.used_at.is_(None))
    ).all())
