"""Share links: one study, for one outside colleague, for a few days (issue 19, part 2).

A physician shares a study; the colleague gets two things by two channels: the link (an
opaque random id, nothing about the patient or the study in it: e-mail is fine) and a
one-time code (shown once to the physician, to be read out by phone or SMS). The code
opens the link once, in one browser, which then holds a share session cookie for that link
only, until the link expires (at most ``MAX_DAYS``) or is revoked.

What is stored (table ``share_links`` in the index, shared by every instance): the SHA-256
of the link id and of the share session (never the values), an Argon2id hash of the code
(verified in constant time by argon2; an unknown link burns one verification so timing
tells nothing), the study UID in a ``Sealed`` column (encrypted on PostgreSQL; SQLCipher
encrypts the embedded index whole), owner, expiry, download grant, de-identification
profile, counters. Guessing is throttled by the sign-in throttle (``accounts.throttle``,
keyed by the link, not by a user name) and capped per link: after ``MAX_FAILURES`` wrong
codes the link is dead and the physician makes a new one.

The table is part of the index layout (Alembic revision 0006; ``vaultindex.layout_tables``
imports this module so a new index's baseline makes it).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import secrets
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import cast

from argon2 import PasswordHasher
from sqlalchemy import (
    BigInteger,
    Boolean,
    Connection,
    Integer,
    LargeBinary,
    String,
    Table,
    Text,
    delete,
    select,
    update,
)
from sqlalchemy.orm import Mapped, Session, mapped_column, sessionmaker

from pacsvault.accounts import passwords
from pacsvault.accounts.throttle import Decision, Source, Throttle
from pacsvault.audit import AuditEvent, EventCode, Outcome, Recorder
from pacsvault.index.models import Base
from pacsvault.index.sealing import Sealed
from pacsvault.index.shared_state import from_micros, to_micros

MAX_DAYS = 30
DEFAULT_DAYS = 7
MAX_FAILURES = 10
CODE_ALPHABET = "ABCDEFGHJKMNPQRSTUVWXYZ23456789"  # no 0/O, 1/I/L: read out by phone
CODE_LENGTH = 10  # ~49 bits, against at most MAX_FAILURES guesses
Clock = Callable[[], dt.datetime]


class ShareLinkRow(Base):
    __tablename__ = "share_links"
    pk: Mapped[int] = mapped_column(Integer, primary_key=True)
    link_key: Mapped[bytes] = mapped_column(LargeBinary(32), unique=True)
    owner: Mapped[str] = mapped_column(String(64), index=True)
    study: Mapped[str] = mapped_column(Sealed("share_links.study"))
    created: Mapped[int] = mapped_column(BigInteger)
    expires: Mapped[int] = mapped_column(BigInteger)
    download: Mapped[bool] = mapped_column(Boolean, default=False)
    deidentify: Mapped[str] = mapped_column(String(32), default="")  # profile, "" = as is
    project: Mapped[str] = mapped_column(String(64), default="")
    code_hash: Mapped[str] = mapped_column(Text, default="")  # "" once used
    session_key: Mapped[bytes | None] = mapped_column(LargeBinary(32), nullable=True)
    revoked: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    revoked_by: Mapped[str] = mapped_column(String(64), default="")
    failures: Mapped[int] = mapped_column(Integer, default=0)
    openings: Mapped[int] = mapped_column(Integer, default=0)
    last_opened: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("ascii", "replace")).digest()


def system_clock() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True)
class Share:
    """A link as its pages see it. ``study`` is patient data: screens only, never logs."""

    pk: int
    owner: str
    study: str
    created: dt.datetime
    expires: dt.datetime
    download: bool
    deidentify: str
    project: str
    revoked: dt.datetime | None
    revoked_by: str
    openings: int
    last_opened: dt.datetime | None
    used: bool  # the code was used (a browser holds the share session)
    dead: bool  # too many wrong codes

    def active(self, now: dt.datetime) -> bool:
        return self.revoked is None and not self.dead and now < self.expires

    def __repr__(self) -> str:  # no UID in tracebacks
        return f"Share(pk={self.pk}, owner={self.owner!r})"


def _share(row: ShareLinkRow) -> Share:
    return Share(row.pk, row.owner, row.study, from_micros(row.created),
                 from_micros(row.expires), row.download, row.deidentify, row.project,
                 from_micros(row.revoked) if row.revoked is not None else None,
                 row.revoked_by, row.openings,
                 from_micros(row.last_opened) if row.last_opened is not None else None,
                 not row.code_hash, row.failures >= MAX_FAILURES)


@dataclass(frozen=True)
class Created:
    share: Share
    link_id: str  # for the URL: shown to the physician, never stored
    code: str  # shown once to the physician, never stored


@dataclass(frozen=True)
class Opening:
    """The answer to a code: ``session`` (the share cookie's value) when accepted, else
    ``retry_after`` > 0 when throttled, else a plain refusal."""

    session: str = ""
    retry_after: float = 0.0

    @property
    def ok(self) -> bool:
        return bool(self.session)


class ShareError(ValueError):
    """A request that cannot be honoured (message user-facing, no patient data)."""


class ShareLinks:
    def __init__(self, sessions: sessionmaker[Session], recorder: Recorder, throttle: Throttle,
                 hasher: PasswordHasher, clock: Clock = system_clock,
                 hold: Callable[[], AbstractContextManager[None]] = contextlib.nullcontext
                 ) -> None:
        """``hold``: the accounts' ``recorder.holding`` when ``throttle`` records through
        it: the throttle's events wait until the code's transaction has ended (the trail
        writes to the same index; on SQLite a second writer would wait for this one)."""
        self._hold = hold
        self._sessions = sessions
        self._recorder = recorder
        self._throttle = throttle
        self._hasher = hasher
        self.clock = clock

    # --- the physician's side -------------------------------------------------------------

    def create(self, owner: str, study_uid: str, *, days: int = DEFAULT_DAYS,
               download: bool = False, deidentify: str = "", project: str = "",
               address: str = "") -> Created:
        if not 1 <= days <= MAX_DAYS:
            raise ShareError(f"a share link is valid 1 to {MAX_DAYS} days")
        if bool(deidentify) != bool(project):
            raise ShareError("a de-identified share needs a profile and a project")
        link_id = secrets.token_urlsafe(24)
        code = "".join(secrets.choice(CODE_ALPHABET) for _ in range(CODE_LENGTH))
        now = self.clock()
        row = ShareLinkRow(link_key=_digest(link_id), owner=owner, study=study_uid,
                           created=to_micros(now),
                           expires=to_micros(now + dt.timedelta(days=days)),
                           download=download, deidentify=deidentify, project=project,
                           code_hash=passwords.hash_password(self._hasher, code))
        with self._sessions.begin() as s:
            s.add(row)
            s.flush()
            share = _share(row)
        self._emit("share.created", Outcome.SUCCESS, owner, address, share,
                   {"days": days, "download": download, "deidentified": bool(deidentify),
                    "profile": deidentify or "identified"}, required=True)
        return Created(share, link_id, format_code(code))

    def mine(self, owner: str) -> list[Share]:
        with self._sessions() as s:
            rows = s.scalars(select(ShareLinkRow).where(ShareLinkRow.owner == owner)
                             .order_by(ShareLinkRow.pk.desc())).all()
            return [_share(r) for r in rows]

    def active(self) -> list[Share]:
        """Every link still usable (the Health page)."""
        now = self.clock()
        with self._sessions() as s:
            rows = s.scalars(select(ShareLinkRow).where(
                ShareLinkRow.revoked.is_(None), ShareLinkRow.expires > to_micros(now),
                ShareLinkRow.failures < MAX_FAILURES).order_by(ShareLinkRow.expires)).all()
            return [_share(r) for r in rows]

    def revoke(self, pk: int, by: str, *, admin: bool = False, address: str = "") -> bool:
        """Revoke one link (its owner, or an administrator); False if not theirs."""
        with self._sessions.begin() as s:
            row = s.get(ShareLinkRow, pk)
            if row is None or (row.owner != by and not admin) or row.revoked is not None:
                return False
            # The session's digest stays: ``resolve`` refuses a revoked link whatever
            # the session, and ``ended`` can then tell the colleague's browser why its
            # viewer stopped (a digest of a random value: nothing to protect).
            row.revoked, row.revoked_by = to_micros(self.clock()), by
            share = _share(row)
        self._emit("share.revoked", Outcome.SUCCESS, by, address, share, {}, required=True)
        return True

    # --- the colleague's side -------------------------------------------------------------

    def exists(self, link_id: str) -> bool:
        """Whether a code form should be shown: a usable link whose code is unused."""
        row = self._row(link_id)
        return row is not None and bool(row.code_hash) and _share(row).active(self.clock())

    def open(self, link_id: str, code: str, address: str) -> Opening:
        """Check a code: throttled, constant-time, once."""
        source = Source.of(address)
        name_key = "share:" + _digest(link_id).hex()[:32]
        with self._hold(), self._sessions.begin() as s:
            decision = self._throttle.check(s, name_key, source)
            if not decision.allowed:
                self._throttle.refused("", source, decision, factor="share-code")
                return Opening(retry_after=max(decision.retry_after, 1.0))
            row = s.scalar(select(ShareLinkRow).where(
                ShareLinkRow.link_key == _digest(link_id)).with_for_update())
            usable = (row is not None and bool(row.code_hash)
                      and _share(row).active(self.clock()))
            if row is None or not usable:
                passwords.burn_verification(self._hasher, code)
                good = False
            else:
                good = passwords.verify_password(self._hasher, row.code_hash,
                                                 normalise_code(code))
            if not good:
                if usable:  # a used/ended link opens nothing anyway: wrong codes on it
                    # must not close the colleague's open session (anyone with the link
                    # id could otherwise end it with ten guesses)
                    assert row is not None
                    row.failures += 1
                after: Decision = self._throttle.failure(s, name_key, "", source,
                                                         reason="wrong-share-code",
                                                         factor="share-code")
                return Opening(retry_after=after.retry_after)
            assert row is not None
            session = secrets.token_urlsafe(32)
            row.code_hash, row.session_key = "", _digest(session)
            share = _share(row)
        self._emit("share.code.accepted", Outcome.SUCCESS, "", address, share, {},
                   required=True)
        return Opening(session=session)

    def resolve(self, link_id: str, session: str) -> Share | None:
        """The share a browser may see: its link, its session, still active."""
        if not link_id or not session:
            return None
        row = self._row(link_id)
        if row is None or row.session_key is None:
            return None
        if not secrets.compare_digest(row.session_key, _digest(session)):
            return None
        share = _share(row)
        return share if share.active(self.clock()) else None

    def ended(self, link_id: str, session: str) -> str:
        """Why a share session that worked opens nothing now: "revoked", "expired" or
        "closed" (too many wrong codes on its link). Told only to the browser that holds
        that session (its digest matches), so a colleague whose open viewer stops working
        learns why; "" for anything else (still open, signed out, erased, not this link's
        session): the pages then say no more than "not valid"."""
        row = self._row(link_id) if link_id and session else None
        if row is None or row.session_key is None:
            return ""
        if not secrets.compare_digest(row.session_key, _digest(session)):
            return ""
        share = _share(row)
        if share.revoked is not None:
            return "revoked"
        if self.clock() >= share.expires:
            return "expired"
        return "closed" if share.dead else ""

    def sign_out(self, link_id: str, session: str) -> None:
        """End a share session (the viewer's "Sign out"): its digest goes, so the cookie,
        replayed from anywhere, opens nothing; the code was single-use, so the link is
        done for everyone (a new one is made for a new look)."""
        share = self.resolve(link_id, session)
        if share is None:
            return
        with self._sessions.begin() as s:
            s.execute(update(ShareLinkRow).where(ShareLinkRow.pk == share.pk)
                      .values(session_key=None))

    def opened(self, share: Share, address: str, what: str, *, export: bool = False) -> None:
        """Record one access through the link (fail closed: no record, no answer)."""
        with self._sessions.begin() as s:
            s.execute(update(ShareLinkRow).where(ShareLinkRow.pk == share.pk).values(
                openings=ShareLinkRow.openings + 1, last_opened=to_micros(self.clock())))
        self._emit("share.export" if export else "share.opened", Outcome.SUCCESS, "",
                   address, share, {"what": what}, required=True,
                   code=EventCode.EXPORT if export else EventCode.INSTANCES_ACCESSED)

    # --- helpers ------------------------------------------------------------------------

    def _row(self, link_id: str) -> ShareLinkRow | None:
        if not link_id or len(link_id) > 64:
            return None
        with self._sessions() as s:
            row = s.scalar(select(ShareLinkRow).where(ShareLinkRow.link_key == _digest(link_id)))
            if row is not None:
                s.expunge(row)
            return row

    def _emit(self, action: str, outcome: Outcome, user: str, address: str, share: Share,
              detail: dict[str, str | int | bool], *, required: bool = False,
              code: EventCode = EventCode.APPLICATION_ACTIVITY) -> None:
        self._recorder.emit(AuditEvent(
            action=action, outcome=outcome, code=code, actor_user=user, actor_address=address,
            study_uids=(share.study,),
            detail={"share": share.pk, "owner": share.owner, **detail}), required=required)


def format_code(code: str) -> str:
    return f"{code[:5]}-{code[5:]}"


def normalise_code(code: str) -> str:
    """What the colleague types: case, spaces and dashes do not matter."""
    return "".join(c for c in code.upper() if c.isalnum())[:64]


def forget_studies(conn: Connection, study_uids: set[str]) -> int:
    """Delete every share link to one of these studies, in the caller's transaction (a
    patient's erasure, ``storage.erasure``: a link must not outlive the images, nor keep
    their UID). The study column is sealed on PostgreSQL (not comparable in SQL): the rows
    are read and matched here."""
    if not study_uids:
        return 0
    table = cast(Table, ShareLinkRow.__table__)
    doomed = [int(pk) for pk, study in conn.execute(select(table.c.pk, table.c.study))
              if study in study_uids]
    if doomed:
        conn.execute(delete(table).where(table.c.pk.in_(doomed)))
    return len(doomed)
