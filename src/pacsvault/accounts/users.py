"""User administration: accounts, roles, passwords, blocks and recovery codes.

For the CLI (``user`` commands, ``init``'s first admin) and the admin pages alike, so that
both apply the same policy and record the same events: every change is a PS3.15 Security
Alert (``_admin_event``) or a throttle event (unlocks, lifted blocks), emitted once its
transaction has committed.
"""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from pacsvault.accounts import devices, passwords
from pacsvault.accounts import totp as totp_mod
from pacsvault.accounts.core import (
    AccountError,
    AccountsCore,
    PasswordRejected,
    check_name,
    check_roles,
    normalise_name,
    passkey_count,
)
from pacsvault.accounts.models import Passkey, RecoveryCode, User
from pacsvault.accounts.throttle import address_key


@dataclass(frozen=True)
class UserInfo:
    name: str
    roles: tuple[str, ...]
    disabled: bool
    locked: bool
    totp_enrolled: bool
    recovery_codes_left: int
    created: dt.datetime
    password_changed: dt.datetime
    last_login: dt.datetime | None
    passkeys: int = 0

    @property
    def second_factor_enrolled(self) -> bool:
        return self.totp_enrolled or self.passkeys > 0


@dataclass(frozen=True)
class BlockInfo:
    """An active sign-in block, as ``user blocks`` and the admin page show it."""

    block_id: str
    scope: str  # "source": a name from one source; "new-sources"; "address": any name
    user: str  # the account's name; "" for an address block or a name that is no account
    source: str  # readable: an address, "known device (...)", "" for new-sources
    failures: int
    until: dt.datetime


ADMIN_NAME_ALPHABET = "abcdefghjkmnpqrstuvwxyz23456789"


def generate_admin_name() -> str:
    """``admin-`` and 6 random characters (~30 bits): the first administrator's name
    when nobody chose one, so that no vault has a guessable administrator account."""
    return "admin-" + "".join(secrets.choice(ADMIN_NAME_ALPHABET) for _ in range(6))


class UserAdmin(AccountsCore):
    """Adding, changing and removing what users are and may do."""

    def check_password(self, password: str, user_name: str = "") -> passwords.PasswordCheck:
        return passwords.check_password(password, user_name=user_name, throttled=True)

    def _accept_password(self, password: str, user_name: str) -> str:
        verdict = self.check_password(password, user_name)
        if not verdict.ok:
            raise PasswordRejected(verdict.problems)
        return passwords.hash_password(self.hasher, password)

    def _info(self, session: Session, user: User) -> UserInfo:
        locked = self.throttle.active_name_blocks(session, self.name_key(user.name)) > 0
        left = session.scalar(select(func.count(RecoveryCode.pk)).where(
            RecoveryCode.user_pk == user.pk, RecoveryCode.used_at.is_(None))) or 0
        return UserInfo(
            name=user.name, roles=tuple(sorted(user.role_set)), disabled=user.disabled,
            locked=locked, totp_enrolled=bool(user.totp and user.totp.confirmed),
            recovery_codes_left=left, created=user.created,
            password_changed=user.password_changed, last_login=user.last_login,
            passkeys=passkey_count(session, user),
        )

    # --- administration -----------------------------------------------------------------

    def add_user(self, name: str, roles: Iterable[str], password: str, *, by: str = "",
                 address: str = "") -> UserInfo:
        norm = check_name(name)
        role_list = check_roles(roles)
        encoded = self._accept_password(password, norm)
        now = self._now()
        with self.transaction() as s:
            if self.find_user(s, norm) is not None:
                raise AccountError(f"a user named {norm!r} already exists")
            user = User(name=norm, roles=",".join(role_list), password_hash=encoded,
                        disabled=False, created=now, password_changed=now, failed_count=0)
            s.add(user)
            s.flush()
            info = self._info(s, user)
        self._admin_event("user.add", by, address, {"user": norm, "roles": ",".join(role_list)})
        return info

    def first_admin(self, name: str = "", *, by: str = "") -> tuple[UserInfo, str]:
        """The account ``init`` creates: admin role, a random password to show once; an
        unpredictable name (``generate_admin_name``) unless one was chosen."""
        name = name or generate_admin_name()
        password = passwords.generate_password()
        return self.add_user(name, ["admin"], password, by=by), password

    def list_users(self) -> list[UserInfo]:
        with self.sessions() as s:
            return [self._info(s, u) for u in s.scalars(select(User).order_by(User.name))]

    def get_user(self, name: str) -> UserInfo:
        with self.sessions() as s:
            return self._info(s, self.require_user(s, name))

    def set_roles(self, name: str, roles: Iterable[str], *, by: str = "",
                  address: str = "") -> UserInfo:
        role_list = check_roles(roles)
        with self.transaction() as s:
            user = self.require_user(s, name)
            user.roles = ",".join(role_list)
            info = self._info(s, user)
        self._admin_event("user.roles", by, address,
                          {"user": info.name, "roles": ",".join(role_list)})
        return info

    def disable(self, name: str, *, by: str = "", address: str = "") -> None:
        """Sign-in and the user's tokens stop working at once (the web layer must also drop
        the user's open sessions)."""
        self._set_disabled(name, True, by, address)

    def enable(self, name: str, *, by: str = "", address: str = "") -> None:
        self._set_disabled(name, False, by, address)

    def _set_disabled(self, name: str, disabled: bool, by: str, address: str) -> None:
        with self.transaction() as s:
            user = self.require_user(s, name)
            user.disabled = disabled
            norm = user.name
        self._drop_pending(norm)
        self._admin_event("user.disable" if disabled else "user.enable", by, address,
                          {"user": norm})

    def reset(self, name: str, password: str | None = None, *, second_factor: bool = False,
              by: str = "", address: str = "") -> str:
        """Set a new password (a generated one when ``password`` is None, to show once),
        unlock the account, and with ``second_factor`` remove the TOTP secret and recovery
        codes so the user enrols again at next sign-in (a lost phone)."""
        norm = check_name(name)
        generated = password is None
        new_password = passwords.generate_password() if password is None else password
        encoded = self._accept_password(new_password, norm)
        with self.transaction() as s:
            user = self.require_user(s, norm)
            user.password_hash = encoded
            user.password_changed = self._now()
            user.failed_count = 0
            user.last_failed = user.locked_at = user.locked_until = None
            self.throttle.lift_name(s, self.name_key(norm))
            if second_factor:
                devices.forget(s, user.pk)  # a lost or stolen device is no longer known
                if user.totp is not None:
                    s.delete(user.totp)
                for code in list(user.recovery_codes):
                    s.delete(code)
                for key in s.scalars(select(Passkey).where(Passkey.user_pk == user.pk)):
                    s.delete(key)
        # A sign-in half done with the old password must not complete after the reset.
        self._drop_pending(norm)
        self._admin_event("user.reset", by, address, {
            "user": norm, "generated": generated, "second_factor": second_factor})
        return new_password

    def unlock(self, name: str, *, by: str = "", address: str = "") -> bool:
        """Lift every block on a user name (from any source) and clear its counters.
        Returns whether a block was active. A name that is no account can be unlocked too
        (its counters exist, see throttle), but only if it has some."""
        norm = normalise_name(name)
        with self.transaction() as s:
            user = self.find_user(s, norm)
            key = self.name_key(norm)
            if user is None and not self.throttle.active_name_blocks(s, key):
                raise AccountError(f"no user named {norm!r}")
            lifted = self.throttle.lift_name(s, key)
            if user is not None:
                user.failed_count = 0
                user.last_failed = user.locked_at = user.locked_until = None
            self.throttle.emit_admin("auth.account.unlocked", by, address, {
                "user": user.name if user is not None else "", "was_locked": lifted > 0,
                "blocks": lifted})
        return lifted > 0

    def unlock_address(self, source: str, *, by: str = "", address: str = "") -> bool:
        """Lift the block on an address (any name) and the blocks of names from it."""
        with self.transaction() as s:
            lifted = self.throttle.lift_address(s, source)
            self.throttle.emit_admin("auth.address.unlocked", by, address, {
                "address": address_key(source), "was_locked": lifted > 0, "blocks": lifted})
        return lifted > 0

    def blocks(self) -> list[BlockInfo]:
        """The active blocks, with readable names and sources."""
        with self.sessions() as s:
            names = {self.name_key(u): u for u in s.scalars(select(User.name))}
            return [BlockInfo(b.block_id, b.scope, names.get(b.name_key, ""),
                              devices.describe(s, b.source) if b.scope == "source"
                              else b.source, b.failures, b.until)
                    for b in self.throttle.blocks(s)]

    def lift_block(self, block_id: str, *, by: str = "", address: str = "") -> bool:
        """Lift one block (an id from ``blocks``); False when it is not active."""
        with self.transaction() as s:
            names = {self.name_key(u): u for u in s.scalars(select(User.name))}
            block = self.throttle.lift(s, block_id)
            if block is None:
                return False
            self.throttle.emit_admin("auth.block.lifted", by, address, {
                "scope": block.scope, "user": names.get(block.name_key, ""),
                "source": block.source})
        return True

    def new_recovery_codes(self, name: str, *, by: str = "", address: str = "") -> list[str]:
        """Replace a user's recovery codes (the old ones stop working); show them once."""
        with self.transaction() as s:
            user = self.require_user(s, name)
            if not (user.totp is not None and user.totp.confirmed) and \
                    passkey_count(s, user) == 0:
                raise AccountError("this user has no second factor enrolled yet")
            codes = totp_mod.issue_recovery_codes(s, user, self.recovery_hasher, self._now())
            norm = user.name
        self._admin_event("user.recovery_codes", by or norm, address,
                          {"user": norm, "count": len(codes)})
        return codes
