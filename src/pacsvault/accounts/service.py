"""``Accounts``: users, sign-in with a mandatory second factor, API tokens.

One object ties the pieces together for the CLI (``user``/``token`` commands, ``init``'s
first admin) and the web layer (login form, enrolment page, bearer tokens), so that both
apply the same policy and record the same events.

It is assembled from three parts over one shared core (``core.AccountsCore``: database,
recorder, keys, clock, throttle, pending sign-ins, user names, errors):

* ``users.UserAdmin``: add, list, roles, disable/enable, password reset, unlocks and
  blocks, recovery codes;
* ``signin.SignIn``: the two-step sign-in state machine (password, then TOTP, recovery
  code or passkey) and TOTP enrolment; its module docstring describes the flow;
* ``token_service.TokenService``: API tokens (format and storage in ``tokens``).

Every name other code imports from here stays importable from here.
"""

from __future__ import annotations

from pacsvault.accounts.core import (
    TICKET_LIFETIME,
    AccountError,
    PasswordRejected,
    check_name,
    check_roles,
    normalise_name,
)
from pacsvault.accounts.signin import AuthOutcome, AuthResult, SignIn, TotpEnrolment
from pacsvault.accounts.token_service import (
    LAST_USED_PRECISION,
    TokenInfo,
    TokenResult,
    TokenService,
)
from pacsvault.accounts.users import (
    ADMIN_NAME_ALPHABET,
    BlockInfo,
    UserAdmin,
    UserInfo,
    generate_admin_name,
)

__all__ = [
    "ADMIN_NAME_ALPHABET",
    "LAST_USED_PRECISION",
    "TICKET_LIFETIME",
    "AccountError",
    "Accounts",
    "AuthOutcome",
    "AuthResult",
    "BlockInfo",
    "PasswordRejected",
    "TokenInfo",
    "TokenResult",
    "TotpEnrolment",
    "UserInfo",
    "check_name",
    "check_roles",
    "generate_admin_name",
    "normalise_name",
]


class Accounts(UserAdmin, SignIn, TokenService):
    """Account management and sign-in over the index database (the constructor's
    arguments are ``AccountsCore``'s)."""
