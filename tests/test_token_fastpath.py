"""Issue 17, the bearer token's check on the event loop: no shortcut past a rule.

``deps.quick_principal`` settles the common case (valid, used from this address less than
a minute ago) with one read of the embedded index on the event loop, without the worker
thread hop; ``token_check.read_token`` reads that row straight from the driver. Here,
through the real application and HTTPS listener (in-process, fake clock), a token that
went through the fast path is still refused at the very next request once it is revoked,
expired, idle, its user disabled or its role gone; a token of a user without the route's
role (wrong scope) is refused even though its identity is valid; a token is still refused
outside DICOMweb. And the driver read gives exactly SQLAlchemy's row.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from pacsvault.accounts import token_check
from pacsvault.index import db
from pacsvault.index.rawselect import read_would_wait
from pacsvault.web import deps
from tests.helpers import make_vault
from tests.web_helpers import FakeClock, LocalWeb, local_web

PASSWORD = "lanterne-verte-au-bout-du-quai"
SEARCH = "/dicom-web/studies"
JSON = {"accept": "application/dicom+json"}


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalWeb]:
    vault_dir = make_vault(tmp_path_factory.mktemp("tokfast") / "v")
    with local_web(vault_dir, FakeClock()) as served:
        served.accounts.add_user("doc", ["physician"], PASSWORD)
        served.accounts.add_user("aud", ["auditor"], PASSWORD)
        yield served


@pytest.fixture
def quick_hits(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Each call of the event-loop path: True when it settled the request."""
    hits: list[bool] = []
    original: Callable[..., Any] = deps.quick_principal

    def counted(*args: Any) -> Any:
        found = original(*args)
        hits.append(found is not None)
        return found

    monkeypatch.setattr(deps, "quick_principal", counted)
    return hits


def _get(web: LocalWeb, token: str, path: str = SEARCH) -> httpx.Response:
    with web.browser() as browser:
        return browser.get(path, headers={**JSON, "authorization": f"Bearer {token}"})


def _through_fast_path(web: LocalWeb, token: str, hits: list[bool]) -> None:
    """First use: the full check records the new address; the next one takes the fast
    path (asserted, so the refusals below are the fast path's)."""
    assert _get(web, token).status_code == 200
    hits.clear()
    assert _get(web, token).status_code == 200
    assert hits == [True]


def test_revoked_token_refused_at_the_next_request(web: LocalWeb,
                                                   quick_hits: list[bool]) -> None:
    issued = web.accounts.create_token("doc", "1d")
    _through_fast_path(web, issued.token, quick_hits)
    other = web.vault.accounts  # another handle on the same index
    assert other.revoke_token(issued.token_id)
    assert _get(web, issued.token).status_code == 401
    assert quick_hits[-1] is False


def test_expired_and_idle_tokens_refused(web: LocalWeb, quick_hits: list[bool]) -> None:
    short = web.accounts.create_token("doc", "1d")
    long = web.accounts.create_token("doc", "60d")
    _through_fast_path(web, short.token, quick_hits)
    _through_fast_path(web, long.token, quick_hits)
    web.clock.advance(2 * 86400)  # past the short one's expiry
    assert _get(web, short.token).status_code == 401
    assert _get(web, long.token).status_code == 200
    web.clock.advance(31 * 86400)  # the long one unused for more than idle_days (30)
    assert _get(web, long.token).status_code == 401
    assert quick_hits[-1] is False


def test_disabled_user_and_removed_role_refused(web: LocalWeb,
                                                quick_hits: list[bool]) -> None:
    issued = web.accounts.create_token("doc", "1d")
    _through_fast_path(web, issued.token, quick_hits)
    web.vault.accounts.set_roles("doc", ["auditor"])
    assert _get(web, issued.token).status_code == 403  # valid identity, wrong role
    web.vault.accounts.set_roles("doc", ["physician"])
    web.vault.accounts.disable("doc")
    try:
        assert _get(web, issued.token).status_code == 401
    finally:
        web.vault.accounts.enable("doc")
    assert _get(web, issued.token).status_code == 200


def test_wrong_scope_refused_even_on_the_fast_path(web: LocalWeb,
                                                    quick_hits: list[bool]) -> None:
    issued = web.accounts.create_token("aud", "1d")
    assert _get(web, issued.token).status_code == 403  # full check: valid, no physician
    quick_hits.clear()
    assert _get(web, issued.token).status_code == 403
    assert quick_hits == [True]  # the fast path knew who; the role check still refused
    doc = web.accounts.create_token("doc", "1d")
    _through_fast_path(web, doc.token, quick_hits)
    assert _get(web, doc.token, "/account").status_code == 401  # DICOMweb only


def test_a_wrong_secret_never_passes(web: LocalWeb, quick_hits: list[bool]) -> None:
    issued = web.accounts.create_token("doc", "1d")
    _through_fast_path(web, issued.token, quick_hits)
    wrong = issued.token[:-1] + ("b" if issued.token.endswith("a") else "a")
    assert _get(web, wrong).status_code == 401
    assert quick_hits[-1] is False


def test_the_driver_read_equals_sqlalchemys_row(web: LocalWeb) -> None:
    plain = web.accounts.create_token("doc", "1d")
    remote = web.accounts.create_token("doc", "5d", source_network="127.0.0.0/8",
                                       label="x")
    web.accounts.verify_token(plain.token, "127.0.0.1")  # last_used, active, address set
    engine = web.vault.sessions.kw["bind"]
    for issued in (plain, remote):
        with engine.connect() as conn:
            expected = conn.execute(token_check._QUERY,
                                    {"token_id": issued.token_id}).first()
        got = token_check.read_token(engine, issued.token_id)
        assert expected is not None and got is not None
        assert tuple(got) == tuple(expected)
        assert [type(v) for v in got] == [type(v) for v in expected]
    assert token_check.read_token(engine, "0123456789abcdef") is None


def test_during_a_rekey_the_check_leaves_the_event_loop(web: LocalWeb) -> None:
    """While the key gate is closed (``db.rekey``), the event-loop path declines (a checkout
    would wait there, stalling every connection); the worker path decides as before."""
    issued = web.accounts.create_token("doc", "1d")
    assert web.accounts.verify_token(issued.token, "127.0.0.1").ok
    engine = web.vault.sessions.kw["bind"]
    assert web.accounts.quick_token(issued.token, "127.0.0.1", embedded_only=True)
    closed, reopen = threading.Event(), threading.Event()

    def rekeying() -> None:
        with db.gate_of(engine).closed(5.0):
            closed.set()
            reopen.wait(30)

    thread = threading.Thread(target=rekeying)
    thread.start()
    try:
        assert closed.wait(30)
        assert read_would_wait(engine)
        assert web.accounts.quick_token(issued.token, "127.0.0.1", embedded_only=True) is None
    finally:
        reopen.set()
        thread.join(30)
    assert not read_would_wait(engine)
    assert web.accounts.quick_token(issued.token, "127.0.0.1", embedded_only=True)


def test_with_no_idle_connection_the_check_leaves_the_event_loop(web: LocalWeb) -> None:
    issued = web.accounts.create_token("doc", "1d")
    assert web.accounts.verify_token(issued.token, "127.0.0.1").ok
    engine = web.vault.sessions.kw["bind"]
    held = []
    try:
        while engine.pool.checkedin():
            held.append(engine.connect())
        assert read_would_wait(engine)
        assert web.accounts.quick_token(issued.token, "127.0.0.1", embedded_only=True) is None
        assert web.accounts.verify_token(issued.token, "127.0.0.1").ok  # the worker path
    finally:
        for conn in held:
            conn.close()
    assert not read_would_wait(engine)
