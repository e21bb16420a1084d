"""Token policy (issue 19): API tokens cannot outlive their purpose.

* Lifetime: 30 days by default, 90 at most (``[tokens]``), never a year: a 400-day token is
  refused with a message that says the limit (refused rather than capped: see
  ``accounts.tokens``).
* Network: a token bound to 127.0.0.1/32 (``--from``) is refused over real HTTPS from
  127.0.0.2 (the client socket bound there; loopback addresses stand in for a LAN) and
  accepted from 127.0.0.1; outside the trusted networks a token works only if made
  ``--remote`` while internet mode is on; a ``--from`` network wholly outside the trusted
  networks without ``--remote`` (a token nobody could use) is refused at creation.
* Idle expiry with a fake clock; last use (time, address) in ``token list`` and on the
  account page; a use from a new address is a ``token.new-address`` record in the trail.
* Index revision 0005 on both backends: an existing 366-day token keeps working, its expiry
  capped at 90 days from the upgrade.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterator

import httpx
import pytest
from sqlalchemy import text

from pacsvault.accounts.core import AccountError
from pacsvault.accounts.token_service import TokenPolicy
from pacsvault.index import schema
from pacsvault.vault import Vault
from tests.harness.backends import Backend
from tests.helpers import VaultDir, new_vault
from tests.web_helpers import FakeClock, LocalWeb, local_web

USER = "viewer.app"
PASSWORD = "tisane-de-verveine-au-jardin"


@pytest.fixture(scope="module")
def vault_dir(tmp_path_factory: pytest.TempPathFactory) -> VaultDir:
    made = new_vault(tmp_path_factory.mktemp("tokens") / "v")
    v = made.open()
    try:
        v.accounts.add_user(USER, ["physician"], PASSWORD, by="test")
    finally:
        v.close()
    return made


@pytest.fixture(scope="module")
def web(vault_dir: VaultDir) -> Iterator[LocalWeb]:
    clock = FakeClock()
    with local_web(vault_dir, clock) as served:
        # The server's own accounts take the vault's policy (vault.accounts does this).
        served.accounts.use_token_policy(served.vault.token_policy)
        yield served


def actions(v: Vault, action: str) -> list[tuple[str, dict[str, object]]]:
    return [(r.actor_address, dict(r.detail)) for r in v.audit.records()
            if r.action == action]


def studies(web: LocalWeb, token: str, address: str) -> httpx.Response:
    with web.browser(address) as http:
        return http.get("/dicom-web/studies",
                        headers={"authorization": f"Bearer {token}",
                                 "accept": "application/dicom+json"})


def test_lifetime_default_maximum_and_a_400_day_request(web: LocalWeb) -> None:
    accounts, now = web.accounts, web.clock.now
    assert accounts.create_token(USER).expires == now + dt.timedelta(days=30)
    assert accounts.create_token(USER, "90d").expires == now + dt.timedelta(days=90)
    with pytest.raises(AccountError, match="at most 90 days on this archive"):
        accounts.create_token(USER, "91d")
    with pytest.raises(AccountError, match="at most 365 days"):
        accounts.create_token(USER, "400d")
    with pytest.raises(AccountError, match="at most 90 days"):
        accounts.create_token(USER, dt.timedelta(days=400))


def test_a_token_bound_to_a_network_is_refused_outside_it(web: LocalWeb) -> None:
    issued = web.accounts.create_token(USER, "1d", source_network="127.0.0.1",
                                       by="admin")
    assert web.accounts.list_tokens(USER)[-1].source_network == "127.0.0.1/32"
    outside = studies(web, issued.token, "127.0.0.2")
    assert outside.status_code == 401
    refused = [d for _a, d in actions(web.vault, "auth.login.failed")
               if d.get("reason") == "outside-token-network"]
    assert refused and refused[-1]["factor"] == "token"
    inside = studies(web, issued.token, "127.0.0.1")
    assert inside.status_code == 200, inside.text[:300]
    with pytest.raises(AccountError, match="is not a network"):
        web.accounts.create_token(USER, "1d", source_network="192.168.1.0/33")


def test_outside_the_practice_network_only_remote_tokens_in_internet_mode(
        web: LocalWeb) -> None:
    base = web.vault.token_policy()
    # 127.0.0.2 stands for the internet: only 127.0.0.1 is "the practice".
    lan = dataclasses.replace(base, trusted=lambda a: a == "127.0.0.1", internet=False)
    web.accounts.use_token_policy(lambda: lan)
    try:
        plain = web.accounts.create_token(USER, "1d")
        with pytest.raises(AccountError, match="--remote needs internet mode"):
            web.accounts.create_token(USER, "1d", remote=True)
        assert web.accounts.verify_token(plain.token, "127.0.0.2").reason == \
            "outside-practice-network"
        internet = dataclasses.replace(lan, internet=True)
        web.accounts.use_token_policy(lambda: internet)
        remote = web.accounts.create_token(USER, "1d", remote=True)
        assert studies(web, plain.token, "127.0.0.2").status_code == 401
        assert studies(web, remote.token, "127.0.0.2").status_code == 200
        # Internet mode off again: the remote token is cut too.
        web.accounts.use_token_policy(lambda: lan)
        assert studies(web, remote.token, "127.0.0.2").status_code == 401
        assert studies(web, remote.token, "127.0.0.1").status_code == 200
    finally:
        web.accounts.use_token_policy(web.vault.token_policy)


def test_a_network_outside_the_trusted_ones_needs_remote_at_creation(
        web: LocalWeb, vault_dir: VaultDir) -> None:
    """``--from`` a network no trusted address is in, without ``--remote``: a token no
    address could use (refused outside the trusted networks, refused outside its own), so
    it is refused when made, by a message naming the rule."""
    accounts = web.accounts
    for outside in ("203.0.113.0/24", "2001:db8::/32", "198.51.100.7"):
        with pytest.raises(AccountError, match=r"outside the trusted networks \(\[dicom\] "
                           r"trusted_networks\).*only if made --remote"):
            accounts.create_token(USER, "1d", source_network=outside)
    # some trusted address inside it: usable from there, so made
    for usable in ("192.168.1.0/24", "fd00::/64", "127.0.0.1", "0.0.0.0/0"):
        accounts.create_token(USER, "1d", source_network=usable)
    # --remote in internet mode: usable from that network, so made
    internet = dataclasses.replace(web.vault.token_policy(), internet=True)
    accounts.use_token_policy(lambda: internet)
    try:
        made = accounts.create_token(USER, "1d", source_network="203.0.113.0/24",
                                     remote=True)
    finally:
        accounts.use_token_policy(web.vault.token_policy)
    assert made.token_id in {t.token_id for t in accounts.list_tokens(USER)}
    # the command line says it and makes nothing
    before = {t.token_id for t in accounts.list_tokens(USER)}
    refused = vault_dir.cli("token", "create", "--user", USER, "--from", "203.0.113.0/24",
                            check=False)
    assert refused.returncode != 0
    assert "--from 203.0.113.0/24 is outside the trusted networks" in refused.stderr
    assert "add --remote" in refused.stderr
    assert {t.token_id for t in accounts.list_tokens(USER)} == before


def test_an_unused_token_expires_and_use_restarts_the_clock(web: LocalWeb) -> None:
    used = web.accounts.create_token(USER, "90d")
    unused = web.accounts.create_token(USER, "90d")
    web.clock.advance(dt.timedelta(days=20).total_seconds())
    assert web.accounts.verify_token(used.token, "127.0.0.1").ok
    web.clock.advance(dt.timedelta(days=20).total_seconds())  # 40 days after creation
    assert web.accounts.verify_token(used.token, "127.0.0.1").ok
    assert web.accounts.verify_token(unused.token, "127.0.0.1").reason == "idle"
    info = {t.token_id: t for t in web.accounts.list_tokens(USER)}
    assert info[unused.token_id].status(web.clock.now) == "idle"
    assert info[used.token_id].status(web.clock.now) == "active"
    assert studies(web, unused.token, "127.0.0.1").status_code == 401


def test_new_address_event_and_last_use_in_token_list(web: LocalWeb,
                                                      vault_dir: VaultDir) -> None:
    issued = web.accounts.create_token(USER, "1d", label="new-address")
    for address in ("127.0.0.1", "127.0.0.1", "127.0.0.2", "127.0.0.1"):
        assert studies(web, issued.token, address).status_code == 200
    seen = [(a, d) for a, d in actions(web.vault, "token.new-address")
            if d["token"] == issued.token_id]
    assert [a for a, _d in seen] == ["127.0.0.1", "127.0.0.2"]
    assert seen[0][1]["user"] == USER
    [info] = [t for t in web.accounts.list_tokens(USER) if t.token_id == issued.token_id]
    assert info.last_address == "127.0.0.1" and info.last_used == web.clock.now
    listing = vault_dir.cli("token", "list", "--user", USER).stdout
    [line] = [row for row in listing.splitlines() if issued.token_id in row]
    assert "127.0.0.1" in line and web.clock.now.strftime("%Y-%m-%d %H:%M") in line
    assert "last address" in listing.splitlines()[0]
    # and on the owner's account page
    with web.browser() as browser:
        web.sign_in(browser, USER, PASSWORD)
        page = browser.get("/account").text
    [row] = [r for r in page.split("<tr>") if issued.token_id in r]
    assert "<code>127.0.0.1</code>" in row and "the practice network" in row


def test_revision_0005_caps_an_old_token(backend: Backend,
                                         tmp_path_factory: pytest.TempPathFactory) -> None:
    made = backend.new_vault(tmp_path_factory.mktemp("upgrade") / "v")
    v = made.open()
    try:
        v.accounts.add_user(USER, ["physician"], PASSWORD, by="test")
        # Unlimited policy: the token as the code before the policy made them.
        v.accounts.use_token_policy(lambda: TokenPolicy(
            max_lifetime=dt.timedelta(days=365)))
        old = v.accounts.create_token(USER, "365d")
        fresh = v.accounts.create_token(USER, "10d")
        with v.engine.begin() as conn:  # back to revision 0004, as an old vault has it
            conn.execute(text("UPDATE api_tokens SET active = NULL"))
            conn.execute(text("UPDATE alembic_version SET version_num = '0004'"))
    finally:
        v.close()
    asked: list[schema.Plan] = []

    def confirm(plan: schema.Plan) -> bool:
        asked.append(plan)
        return True

    v = Vault.open(made.data, made.key, confirm=confirm)
    try:
        assert asked == [schema.Plan("0004", schema.HEAD)]
        now = dt.datetime.now(dt.UTC)
        tokens = {t.token_id: t for t in v.accounts.list_tokens(USER)}
        capped = tokens[old.token_id].expires
        assert abs(capped - (now + dt.timedelta(days=90))) < dt.timedelta(minutes=5)
        assert tokens[fresh.token_id].expires == fresh.expires
        assert tokens[old.token_id].status(now) == "active"
        assert v.accounts.verify_token(old.token, "127.0.0.1").ok
        # The vault's own accounts carry the policy of its settings.
        assert v.accounts.verify_token(old.token, "203.0.113.5").reason == \
            "outside-practice-network"
        with pytest.raises(AccountError, match="at most 90 days"):
            v.accounts.create_token(USER, "120d")
    finally:
        v.close()
