"""Who is making a request, as every route sees it."""

from __future__ import annotations

from dataclasses import dataclass


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

    def has(self, role: str) -> bool:
        return role in self.roles
