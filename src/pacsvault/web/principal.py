"""Who is making a request, as every route sees it."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Principal:
    """An authenticated user, through a browser session or an API token.

    ``via_token`` matters: tokens are accepted on the DICOMweb routes only.
    """

    user: str
    roles: frozenset[str]
    via_token: bool
    address: str
    # the API token's id (never its secret), named in the DICOMweb records made with it:
    # a breach opened from a stolen token finds its accesses (pacsvault.breach.scope)
    token_id: str = ""
    # A share session (issue 19): the outside colleague of one share link, no account.
    # ``user`` is then ``share:<id>`` (the trail names the share, never a person), no role,
    # and ``study`` the one study it may read: the DICOMweb routes that admit it
    # (``require_role(..., allow_share=True)``) are scoped to that study (deps, qido).
    share: int = 0
    study: str = field(default="", repr=False)  # a UID: never in a log line

    def has(self, role: str) -> bool:
        return role in self.roles
