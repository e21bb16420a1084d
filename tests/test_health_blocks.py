"""Issue 12, "Lockout an administrator can see and lift": the Health page lists the active
sign-in blocks and lifts them with the same fragment and endpoint as the Users page (CSRF,
admin role, audited).

Against the real ``pacsvault serve``: failed sign-ins from 127.0.0.2 block that address
(made in-process on the same vault with a fake clock, as
tests/test_hardening_accounts.py::test_cli_lists_and_lifts_account_and_address_blocks does,
so the test does not sit through the real exponential delays); the Health page lists the
block, a non-admin cannot lift it, a lift without CSRF is refused, the admin lifts it from
the Health page and lands back there (and only on a page that lists blocks: no open
redirect), the user signs in again from 127.0.0.2, and the lift
is in the audit trail. Meanwhile an API token of another user keeps working from the blocked
address (tokens are not blocked by others' sign-in failures; see also
tests/test_hardening_accounts.py::test_valid_api_token_works_from_a_throttled_address).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from pacsvault.accounts.service import Accounts, AuthOutcome
from tests.helpers import Server, VaultDir, make_vault, start_server
from tests.web_helpers import (
    FakeClock,
    cheap_hasher,
    client,
    page_csrf,
    post_login,
    sign_in,
)

pytestmark = pytest.mark.slow  # a real server

ADMIN, ADMIN_PW = "chef.health", "lanterne-du-gardien-de-phare"
USER, USER_PW = "olivier", "galets-ronds-de-la-riviere"
READER, READER_PW = "lecteur", "confiture-de-mirabelles-maison"
BLOCKED = "127.0.0.2"
OTHER_BLOCKED = "127.0.0.3"


def block_id(html: str, address: str) -> str:
    """The id in the lift form of the table row that names ``address``."""
    for row in re.findall(r"<tr>(.*?)</tr>", html, re.DOTALL):
        found = re.search(r'name="block" value="([^"]+)"', row)
        if found and f">{address}<" in row:
            return found.group(1)
    raise AssertionError(f"no block listed for {address}")


@dataclass
class Served:
    server: Server
    vault: VaultDir

    def browser(self, local_address: str | None = None) -> httpx.Client:
        return client(self.server.https_port, self.vault.data / "tls" / "ca.crt",
                      local_address=local_address)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    vault = make_vault(tmp_path_factory.mktemp("health-blocks") / "v")
    v = vault.open()
    try:
        v.accounts.add_user(ADMIN, ["admin"], ADMIN_PW, by="test")
        v.accounts.add_user(USER, ["physician"], USER_PW, by="test")
        v.accounts.add_user(READER, ["physician"], READER_PW, by="test")
    finally:
        v.close()
    server = start_server(vault)
    yield Served(server, vault)
    server.stop()


def block_address(vault: VaultDir, address: str) -> None:
    """Failed sign-ins for many names from ``address`` until it is blocked: the vault's own
    accounts (same keys and database as the server's) with a fake clock that skips the
    waits the throttle asks for."""
    v = vault.open()
    try:
        real: Accounts = v.accounts
        clock = FakeClock()
        accounts = Accounts(v.sessions, v.recorder, secret_key=real._key, clock=clock,
                            hasher=cheap_hasher(), recovery_hasher=cheap_hasher())
        for n in range(60):
            result = accounts.authenticate(f"spray{n}", f"wrong-{n}", address)
            if result.outcome is AuthOutcome.LOCKED or (
                    result.decision is not None and not result.decision.allowed
                    and result.decision.verdict.value == "locked"):
                return
            clock.advance(max(result.retry_after, 0) + 0.01)
        raise AssertionError(f"no block for {address}")
    finally:
        v.close()


def test_health_page_lists_and_lifts_an_address_block(served: Served) -> None:
    token = served.vault.cli("token", "create", "--user", READER, "--expires", "1d",
                             check=False)
    assert token.returncode == 0, token.stderr
    block_address(served.vault, BLOCKED)
    block_address(served.vault, OTHER_BLOCKED)

    # Blocked: the right password from 127.0.0.2 is refused, and says so.
    with served.browser(BLOCKED) as user:
        refused = post_login(user, USER, USER_PW)
        assert refused.status_code == 429 and "blocked" in refused.text

    # Tokens are not blocked by others' sign-in failures, even from the blocked address.
    with served.browser(BLOCKED) as api:
        res = api.get("/dicom-web/studies",
                      headers={"authorization": f"Bearer {token.stdout.strip()}",
                               "accept": "application/dicom+json"})
        assert res.status_code in (200, 204), (res.status_code, res.text[:300])

    # A non-administrator does not see the Health page.
    with served.browser("127.0.0.1") as reader:
        sign_in(reader, READER, READER_PW)
        assert reader.get("/admin/health").status_code == 403

    with served.browser("127.0.0.1") as admin:
        sign_in(admin, ADMIN, ADMIN_PW)
        page = admin.get("/admin/health")
        assert page.status_code == 200
        assert 'id="blocks-heading"' in page.text and BLOCKED in page.text
        ident = block_id(page.text, BLOCKED)
        assert 'name="back" value="/admin/health"' in page.text
        french = admin.get("/admin/health", headers={"accept-language": "fr"})
        assert "Blocages de connexion" in french.text and "Lever le blocage" in french.text

        # CSRF required; the redirect target is only ever one of the block pages.
        assert admin.post("/admin/users/blocks/lift",
                          data={"block": ident, "back": "/admin/health"}).status_code == 403
        assert BLOCKED in admin.get("/admin/health").text
        elsewhere = admin.post("/admin/users/blocks/lift",
                               data={"csrf": page_csrf(admin), "back": "//evil.example/",
                                     "block": block_id(page.text, OTHER_BLOCKED)})
        assert elsewhere.status_code == 303
        assert elsewhere.headers["location"] == "/admin/users"
        done = admin.post("/admin/users/blocks/lift",
                          data={"csrf": page_csrf(admin), "block": ident,
                                "back": "/admin/health"})
        assert done.status_code == 303 and done.headers["location"] == "/admin/health"
        after = admin.get("/admin/health")
        # No block row left (the address may still appear in the security events: the
        # token's first use from it is recorded, issue 19).
        for address in (BLOCKED, OTHER_BLOCKED):
            with pytest.raises(AssertionError, match="no block listed"):
                block_id(after.text, address)
        assert 'id="blocks"' in after.text  # "No sign-in is blocked."
        assert BLOCKED not in admin.get("/admin/users").text  # one list, one truth
        again = admin.post("/admin/users/blocks/lift",
                           data={"csrf": page_csrf(admin), "block": ident,
                                 "back": "/admin/health"})
        assert again.status_code == 404  # already lifted

    with served.browser(BLOCKED) as user:
        assert post_login(user, USER, USER_PW).status_code == 303

    v = served.vault.open()
    try:
        lifted = [r for r in v.audit.records()
                  if r.action == "auth.block.lifted" and r.actor_user == ADMIN]
    finally:
        v.close()
    assert lifted, "lifting a block from the Health page is not audited"
