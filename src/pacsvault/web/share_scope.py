"""The share session as a principal (issue 19): an outside colleague's browser, one study.

After the one-time code, the browser holds ``__Host-pvshare`` = ``<link>.<session>``. That
cookie is read here only, for the routes that admit a share session: its own pages
(``share_pages``), OHIF's page, configuration and files (``viewer``) and the DICOMweb
*read* routes (``deps.require_role(..., allow_share=True)``). The principal it yields has no
role and carries the share's one study: ``deps`` refuses any other study in a route's path
(404), QIDO searches are confined to it (``dicomweb._search``), and every record names
``share:<id>``, never a person. Every other route never looks at the cookie, so it sees a
browser without credentials.
"""

from __future__ import annotations

from fastapi import Request

from pacsvault.accounts.service import Accounts
from pacsvault.sharing.links import Share, ShareLinks
from pacsvault.vault import Vault
from pacsvault.web.principal import Principal

COOKIE = "__Host-pvshare"
MAX_LINK = 64


def shares_of(request: Request) -> ShareLinks:
    """One ``ShareLinks`` per application, made on first use (the sign-in throttle,
    Argon2 parameters and clock of the accounts: a test's fake clock moves both)."""
    found: ShareLinks | None = getattr(request.app.state, "shares", None)
    if found is None:  # (not through ``kit``: it imports ``deps``, which imports this)
        vault: Vault = request.app.state.vault
        accounts: Accounts = request.app.state.accounts
        found = ShareLinks(vault.sessions, vault.recorder, accounts.throttle, accounts.hasher,
                           clock=accounts.throttle.now, hold=accounts.recorder.holding)
        request.app.state.shares = found
    return found


def cookie_value(link: str, session: str) -> str:
    """The cookie's value: link ids and sessions are URL-safe base64, never a dot."""
    return f"{link}.{session}"


def cookie_parts(request: Request) -> tuple[str, str]:
    link, _, session = request.cookies.get(COOKIE, "").partition(".")
    return (link, session) if 0 < len(link) <= MAX_LINK and session else ("", "")


def session_share(request: Request, link: str | None = None) -> tuple[str, Share] | None:
    """The share this browser's session opens (for ``link`` if given), still active."""
    own, session = cookie_parts(request)
    if not own or (link is not None and link != own):
        return None
    share = shares_of(request).resolve(own, session)
    return (own, share) if share is not None else None


def share_principal(request: Request) -> Principal | None:
    """The share session's principal, or None (no cookie, or not valid any more).
    Blocking (an index read): call from a thread."""
    found = session_share(request)
    if found is None:
        return None
    share = found[1]
    address = request.client.host if request.client else ""
    return Principal(user=f"share:{share.pk}", roles=frozenset(), via_token=False,
                     address=address, share=share.pk, study=share.study)


def ended_share(request: Request, link: str | None = None) -> tuple[str, str] | None:
    """(link, why) when this browser's share session (for ``link`` if given) has ended
    under it: revoked or expired while the colleague had the viewer open
    (``ShareLinks.ended``). Blocking (an index read): call from a thread."""
    own, session = cookie_parts(request)
    if not own or (link is not None and link != own):
        return None
    why = shares_of(request).ended(own, session)
    return (own, why) if why else None


def ended_location(request: Request) -> str | None:
    """Where a browser whose share session ended goes instead of the staff sign-in page
    (a reload of the viewer): that link's own page saying so. The link id only, never the
    query the viewer's URL carried (a study UID)."""
    found = ended_share(request)
    return f"/share/{found[0]}/ended" if found is not None else None
