"""Two pacsvault instances sharing one index behave as one (issue 16, part 3).

Two ``Vault`` objects opened separately on the same data directory stand for two
``serve`` processes behind a load balancer (on each index backend: the embedded SQLCipher
index and PostgreSQL, ``backend``) (each with its own engine, accounts, session
store, passkeys and association policy; only the index is shared). The real application
and HTTPS listener run for each (``WebService``), with one fake clock and cheap Argon2.

Before sessions, pending sign-ins and WebAuthn challenges moved into the index, a cookie,
a CSRF token or a challenge from A meant nothing to B: those tests fail on that code.
Throttling, API tokens and the node registry were in the index already; their tests pin
that down.
"""

from __future__ import annotations

import datetime as dt
import json
import secrets
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom import dcmread
from sqlalchemy import func, select

from pacsvault.accounts.passkeys import PasskeyError, Passkeys, RelyingParty
from pacsvault.accounts.service import Accounts, AuthOutcome
from pacsvault.audit import AuditEvent, EventCode, Outcome, Recorder
from pacsvault.audit.alerts.delivery import AlertSink
from pacsvault.config.alerts import AlertSettings
from pacsvault.dicom.policy import AssociationPolicy, Peer
from pacsvault.index import shared_state
from pacsvault.index.models import Instance
from pacsvault.index.shared_state import WebSessionRow
from pacsvault.storage.archive import StoreStatus
from pacsvault.vault import Vault
from tests import corpus
from tests.harness.backends import Backend
from tests.helpers import VaultDir, new_vault, wait_until
from tests.test_passkeys import SoftAuthenticator
from tests.web_helpers import (
    COOKIE,
    FakeClock,
    LocalWeb,
    cheap_hasher,
    client,
    csrf_of,
    page_csrf,
)

PASSWORD = "galet-de-granit-sur-la-greve"


@dataclass
class Pair:
    a: LocalWeb
    b: LocalWeb
    clock: FakeClock


@contextmanager
def _instance(vault_dir: VaultDir, clock: FakeClock, account_key: bytes) -> Iterator[LocalWeb]:
    from pacsvault.crypto.tls import server_context
    from pacsvault.web.app import create_app
    from pacsvault.web.server import WebService

    vault = vault_dir.open()
    try:
        # The same account key on both, as two instances of one vault derive it.
        accounts = Accounts(vault.sessions, vault.recorder, secret_key=account_key,
                            clock=clock, hasher=cheap_hasher(), recovery_hasher=cheap_hasher())
        web = WebService(create_app(vault, accounts),
                         server_context(vault.layout.tls, vault.tls_password()))
        port = web.start("127.0.0.1", 0)
        try:
            yield LocalWeb(vault, accounts, port, clock, vault_dir.data / "tls" / "ca.crt")
        finally:
            web.stop()
    finally:
        vault.close()


@pytest.fixture(scope="module")
def vault_dir(backend: Backend, tmp_path_factory: pytest.TempPathFactory) -> VaultDir:
    """One vault per index backend (embedded SQLCipher, PostgreSQL): the same tests."""
    return backend.new_vault(tmp_path_factory.mktemp("shared"))


@pytest.fixture(scope="module")
def pair(vault_dir: VaultDir) -> Iterator[Pair]:
    clock = FakeClock()
    key = secrets.token_bytes(32)
    with ExitStack() as stack:
        a = stack.enter_context(_instance(vault_dir, clock, key))
        b = stack.enter_context(_instance(vault_dir, clock, key))
        yield Pair(a, b, clock)


def _user(pair: Pair, name: str, roles: tuple[str, ...] = ("physician",)) -> None:
    pair.a.accounts.add_user(name, list(roles), PASSWORD, by="test")


def _on(web: LocalWeb, cookie: str, address: str) -> httpx.Client:
    """A browser at ``web`` presenting ``cookie`` (as the load balancer's other side)."""
    browser = client(web.port, web.ca, local_address=address)
    browser.cookies.set(COOKIE, cookie, domain="127.0.0.1")
    return browser


def test_a_session_made_on_a_works_on_b_and_ends_everywhere(pair: Pair) -> None:
    _user(pair, "ines")
    address = "127.0.0.41"
    with pair.a.browser(address) as on_a:
        signed = pair.a.sign_in(on_a, "ines", PASSWORD)
        assert on_a.get("/account").status_code == 200
        with _on(pair.b, signed.cookie, address) as on_b:
            assert on_b.get("/account").status_code == 200  # the same session on B
            # a CSRF token issued by A is accepted by B
            csrf = page_csrf(on_a)
            changed = on_b.post("/account/language", data={"csrf": csrf, "lang": "fr"})
            assert changed.status_code == 303, changed.text
            assert changed.headers["location"] == "/account?notice=language"
            # ... and a wrong one is refused there as on A
            wrong = on_b.post("/account/language", data={"csrf": "x" * 43, "lang": "en"})
            assert wrong.status_code == 403
            # sign out on B: the session is over on A too
            assert on_b.post("/logout", data={"csrf": csrf}).status_code == 303
        gone = on_a.get("/account")
        assert gone.status_code == 303 and gone.headers["location"].startswith("/login")


def test_the_password_on_a_and_the_second_factor_on_b(pair: Pair) -> None:
    _user(pair, "jules")
    address = "127.0.0.42"
    with pair.a.browser(address) as on_a:
        app = pair.a.sign_in(on_a, "jules", PASSWORD).authenticator  # enrols the TOTP
        on_a.post("/logout", data={"csrf": page_csrf(on_a)})
        form = on_a.get("/login")
        step = on_a.post("/login", data={"csrf": csrf_of(form.text), "name": "jules",
                                         "password": PASSWORD})
        assert step.status_code == 303 and step.headers["location"] == "/login/second-factor"
        pending = step.cookies[COOKIE]
    with _on(pair.b, pending, address) as on_b:
        page = on_b.get("/login/second-factor")
        assert page.status_code == 200, page.status_code
        done = on_b.post("/login/second-factor", data={"csrf": csrf_of(page.text),
                                                       "code": app.code()})
        assert done.status_code == 303 and done.headers["location"] == "/", done.text
        assert on_b.get("/account").status_code == 200


def test_a_disabled_user_is_signed_out_on_every_instance(pair: Pair) -> None:
    _user(pair, "karim")
    address = "127.0.0.43"
    with pair.a.browser(address) as on_a:
        signed = pair.a.sign_in(on_a, "karim", PASSWORD)
        with _on(pair.b, signed.cookie, address) as on_b:
            assert on_b.get("/account").status_code == 200
            pair.b.accounts.disable("karim", by="test")
            assert on_a.get("/account").status_code == 303
            assert on_b.get("/account").status_code == 303


def test_a_webauthn_challenge_from_a_is_verified_once_on_b(pair: Pair) -> None:
    _user(pair, "lea")
    rp = RelyingParty("127.0.0.1", "https://127.0.0.1:8443")
    on_a, on_b = Passkeys(pair.a.accounts), Passkeys(pair.b.accounts)
    key = SoftAuthenticator()
    options = json.loads(on_a.registration_options("lea", rp))
    answer = json.dumps(key.create(options, rp.origin))
    on_b.verify_registration("lea", rp, answer, "desk key")
    with pytest.raises(PasskeyError, match="expired"):
        on_b.verify_registration("lea", rp, answer, "again")  # single use, on B
    with pytest.raises(PasskeyError, match="expired"):
        on_a.verify_registration("lea", rp, answer, "again")  # and on A
    assert [p.label for p in on_a.list_passkeys("lea")] == ["desk key"]

    # a sign-in: password and options on A, the assertion on B, its replay refused
    first = pair.a.accounts.authenticate("lea", PASSWORD, "127.0.0.44")
    assert first.outcome is AuthOutcome.NEEDS_SECOND_FACTOR
    request = json.loads(on_a.authentication_options(first.ticket, "127.0.0.44", rp))
    assertion = json.dumps(key.get(request, rp.origin))
    done = on_b.verify_authentication(first.ticket, "127.0.0.44", rp, assertion)
    assert done.outcome is AuthOutcome.SUCCESS and done.user == "lea"
    replay = on_a.verify_authentication(first.ticket, "127.0.0.44", rp, assertion)
    assert replay.outcome is not AuthOutcome.SUCCESS


def test_a_user_locked_out_on_a_is_locked_out_on_b(pair: Pair) -> None:
    _user(pair, "marc")
    address = "127.0.0.45"
    for _ in range(10):
        result = pair.a.accounts.authenticate("marc", "pas-le-bon-mot-de-passe", address)
        pair.clock.advance(600)  # past every delay, within the hour that counts them
    assert result.outcome is AuthOutcome.FAILED
    from_b = pair.b.accounts.authenticate("marc", PASSWORD, address)
    assert from_b.outcome is AuthOutcome.LOCKED
    pair.b.accounts.unlock("marc", by="test")
    again = pair.a.accounts.authenticate("marc", PASSWORD, address)
    assert again.outcome is AuthOutcome.NEEDS_SECOND_FACTOR


def test_an_api_token_revoked_on_b_is_refused_on_a(pair: Pair) -> None:
    _user(pair, "nora")
    issued = pair.a.accounts.create_token("nora", "1d", by="test")
    bearer = {"authorization": f"Bearer {issued.token}", "accept": "application/dicom+json"}
    with client(pair.a.port, pair.a.ca, local_address="127.0.0.46",
                headers=bearer) as on_a:
        assert on_a.get("/dicom-web/studies").status_code in (200, 204)
        assert pair.b.accounts.revoke_token(issued.token_id, by="test")
        assert on_a.get("/dicom-web/studies").status_code == 401


def test_a_node_added_on_a_is_accepted_by_b_without_restart(pair: Pair) -> None:
    vault_b: Vault = pair.b.vault
    policy = AssociationPolicy(vault_b.settings, vault_b.nodes, vault_b.recorder)
    peer = Peer("127.0.0.47", 11112, tls=False)
    called = vault_b.settings.server.ae_title
    assert not policy.check_association(peer, "SHAREDMOD", called).allowed
    pair.a.vault.nodes.add("SHAREDMOD", "127.0.0.47")
    assert policy.check_association(peer, "SHAREDMOD", called).allowed
    pair.a.vault.nodes.remove("SHAREDMOD")
    assert not policy.check_association(peer, "SHAREDMOD", called).allowed


def test_the_same_instance_at_a_and_b_at_once_is_kept_once(pair: Pair, tmp_path: Path) -> None:
    (path,) = corpus.synthetic_ct_series(tmp_path / "ct", 1, size=16)
    raw = path.read_bytes()
    sop = str(dcmread(path).SOPInstanceUID)
    results: dict[str, Any] = {}
    start = threading.Barrier(2)

    def send(name: str, web: LocalWeb) -> None:
        start.wait(10)
        try:
            results[name] = web.vault.archive.store(raw).status
        except Exception as exc:  # recorded for the assertion below
            results[name] = exc

    threads = [threading.Thread(target=send, args=(n, w))
               for n, w in (("a", pair.a), ("b", pair.b))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(str(r) for r in results.values()) == sorted(
        [str(StoreStatus.STORED), str(StoreStatus.DUPLICATE)]), results
    with pair.a.vault.sessions() as s:
        assert s.scalar(select(func.count()).select_from(Instance)
                        .where(Instance.sop_uid == sop)) == 1
    # one object published (in a worker, just after the store returned), none other kept
    objects = pair.a.vault.layout.objects
    assert wait_until(lambda: len(list(objects.rglob("*.pvo"))) == 1, 10)
    assert len(list(objects.rglob("*.pvo"))) == 1


def test_a_session_row_holds_no_id_and_no_token_in_clear(pair: Pair) -> None:
    with pair.a.browser("127.0.0.48") as browser:
        form = browser.get("/login")
        session_id, csrf = form.cookies[COOKIE], csrf_of(form.text)
    with pair.a.vault.sessions() as s:
        rows = list(s.scalars(select(WebSessionRow)))
    row = next(r for r in rows if r.key == shared_state.digest(session_id))
    dump = repr([(r.key, r.stage, r.user, r.next, r.sealed) for r in rows]).encode()
    for secret in (session_id, csrf):
        assert secret.encode() not in dump
    assert row.stage == "anonymous"


def test_pre_auth_sessions_are_capped_oldest_first(tmp_path: Path) -> None:
    from pacsvault.web.sessions import SessionStore, Stage

    clock = FakeClock()
    vault = new_vault(tmp_path).open()
    try:
        store = SessionStore(dt.timedelta(minutes=30), dt.timedelta(hours=12), clock,
                             sessions=vault.sessions, max_pre_auth=3)
        made = []
        for _ in range(5):
            clock.advance(1)
            made.append(store.create(Stage.ANONYMOUS, "127.0.0.49")[0])
        other = SessionStore(dt.timedelta(minutes=30), dt.timedelta(hours=12), clock,
                             sessions=vault.sessions, max_pre_auth=3)
        alive = [other.lookup(i)[0] is not None for i in made]
        assert alive == [False, False, True, True, True]
        clock.advance(601)  # the pre-auth lifetime is 10 minutes
        assert other.lookup(made[-1]) == (None, None)
    finally:
        vault.close()


class _Kept:
    def __init__(self) -> None:
        self.events: list[AuditEvent] = []

    def write(self, event: AuditEvent) -> None:
        self.events.append(event)


def test_an_alert_is_raised_once_not_once_per_instance(pair: Pair) -> None:
    from pacsvault.cli.serving import alert_claim

    kept = [_Kept(), _Kept()]
    sinks = [AlertSink(AlertSettings(), Recorder([k]), tick_seconds=0.2,
                       claim=alert_claim(web.vault))
             for web, k in zip((pair.a, pair.b), kept, strict=True)]
    try:
        exposure = AuditEvent(action="exposure", outcome=Outcome.MAJOR_FAILURE,
                              code=EventCode.SECURITY_ALERT, actor_address="203.0.113.9",
                              detail={"port": "plain"})
        for sink in sinks:  # both instances see a connection from outside
            sink.write(exposure)
        for sink in sinks:
            assert sink.flush(30)
    finally:
        for sink in sinks:
            sink.close(30)
    notices = [e for k in kept for e in k.events
               if e.action.startswith("alert.") and not e.detail.get("follow_up")]
    assert len(notices) == 1, [(e.action, e.detail) for e in notices]


def test_a_backup_copy_of_the_index_holds_no_session(pair: Pair, backend: Backend,
                                                     tmp_path: Path) -> None:
    from pacsvault.backup import staging

    if backend.is_postgres:
        pytest.skip("the staged copy of the index is the embedded index's (VACUUM INTO)")
    _user(pair, "copied")  # (a row the copy keeps, whichever tests ran before)
    with pair.a.browser("127.0.0.50") as browser:
        assert browser.get("/login").status_code == 200  # one anonymous session at least
    vault: Vault = pair.a.vault
    with vault.sessions() as s:
        assert s.scalar(select(func.count()).select_from(WebSessionRow))
    copy = tmp_path / "index.db"
    staging._copy_index(vault, copy)
    conn = staging._connect(copy, staging._index_key(vault))
    try:
        for table in ("web_sessions", "sign_in_tickets", "webauthn_challenges"):
            assert conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0] == 0  # noqa: S608
        assert conn.execute("SELECT count(*) FROM users").fetchone()[0] > 0
    finally:
        conn.close()


# --- the same code on PostgreSQL (two engines standing for two instances) -----------------


@pytest.mark.postgres
@pytest.mark.slow
def test_shared_state_on_postgresql(postgres_db: Any) -> None:
    import importlib.util

    from sqlalchemy import create_engine
    from sqlalchemy.orm import sessionmaker

    from pacsvault.accounts.throttle import Source
    from pacsvault.accounts.tickets import TicketStore
    from pacsvault.index import schema
    from pacsvault.web.sessions import SessionStore, Stage

    url = postgres_db.url.replace("postgresql://", "postgresql+psycopg://", 1)
    engines = [create_engine(url, connect_args={"password": postgres_db.server.password()})
               for _ in range(2)]
    try:
        # the revision's own DDL, as Alembic runs it
        path = next((Path(schema.__file__).parent / "migrations" / "versions")
                    .glob("0002_*.py"))
        spec = importlib.util.spec_from_file_location("rev0002", path)
        assert spec is not None and spec.loader is not None
        revision = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(revision)
        with engines[0].begin() as conn:
            for table in revision._tables():
                table.create(conn)
        makers = [sessionmaker(bind=e) for e in engines]
        clock = FakeClock()
        stores = [SessionStore(dt.timedelta(minutes=30), dt.timedelta(hours=12), clock,
                               sessions=m, max_pre_auth=2) for m in makers]
        sid, made = stores[0].create(Stage.SIGNED_IN, "127.0.0.1", user="olga",
                                     password_changed=clock())
        found, _ = stores[1].lookup(sid)
        assert found is not None and found.csrf == made.csrf and found.user == "olga"
        clock.advance(5)
        found.next = "/studies"
        stores[1].save(found)
        again, _ = stores[0].lookup(sid)
        assert again is not None and again.next == "/studies"
        assert stores[0].signed_in_count() == 1
        assert stores[1].drop_user("olga") == 1
        assert stores[0].lookup(sid) == (None, None)
        pre = [stores[i % 2].create(Stage.ANONYMOUS, "127.0.0.1")[0] for i in range(3)]
        assert [stores[0].lookup(p)[0] is not None for p in pre] == [False, True, True]

        tickets = [TicketStore(m) for m in makers]
        ticket = tickets[0].new(7, "olga", Source.of("127.0.0.1"), "k" * 64, "dev", clock(),
                                dt.timedelta(minutes=10))
        pending = tickets[1].get(ticket, "127.0.0.1", clock())
        assert pending is not None and pending.device == "dev" and pending.user_pk == 7
        assert tickets[1].get(ticket, "127.0.0.2", clock()) is None  # leaked: destroyed
        assert tickets[0].get(ticket, "127.0.0.1", clock()) is None

        now = clock()
        later = now + dt.timedelta(minutes=10)
        assert shared_state.claim_notice(makers[0], "exposure", "", now, later)
        assert not shared_state.claim_notice(makers[1], "exposure", "", now, later)
        assert shared_state.claim_notice(makers[1], "exposure", "", later, later + (later - now))
    finally:
        for engine in engines:
            engine.dispose()
