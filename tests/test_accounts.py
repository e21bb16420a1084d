"""Accounts: password policy, Argon2id, TOTP with replay refusal, recovery codes, throttling,
API tokens. In-process over a real SQLCipher index, with a fake clock and cheap Argon2
parameters (the production parameters are checked once)."""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import hashlib
import math
import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest
from argon2 import PasswordHasher
from sqlalchemy import Engine, Table, select, text
from sqlalchemy.orm import Session, sessionmaker

import pacsvault.accounts.models as models  # registers the tables before open_index
from pacsvault.accounts import passwords, tokens
from pacsvault.accounts import totp as totp_mod
from pacsvault.accounts.service import (
    AccountError,
    Accounts,
    AuthOutcome,
    AuthResult,
    PasswordRejected,
)
from pacsvault.accounts.throttle import ThrottlePolicy, Verdict, address_key
from pacsvault.audit.events import AuditEvent, EventCode, Recorder
from pacsvault.index.db import open_index, session_factory

GOOD = "velo-rouge-sous-la-pluie"  # lower case and '-' only: 24 × log2(59) = 141 bits
ADDR = "192.0.2.10"
OTHER = "192.0.2.99"
T0 = dt.datetime(2025, 3, 4, 10, 0, 0, tzinfo=dt.UTC)


def cheap_hasher(time_cost: int = 1) -> PasswordHasher:
    return PasswordHasher(time_cost=time_cost, memory_cost=8, parallelism=1)


class Clock:
    def __init__(self, start: dt.datetime = T0) -> None:
        self.now = start

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += dt.timedelta(seconds=seconds)


class ListSink:
    def __init__(self) -> None:
        self.events: list[AuditEvent] = []

    def write(self, event: AuditEvent) -> None:
        self.events.append(event)

    def actions(self) -> list[str]:
        return [e.action for e in self.events]

    def last(self, action: str) -> AuditEvent:
        return [e for e in self.events if e.action == action][-1]


@dataclasses.dataclass
class Env:
    accounts: Accounts
    clock: Clock
    sink: ListSink
    sessions: sessionmaker[Session]
    engine: Engine
    key: bytes

    def login(self, name: str, password: str = GOOD, address: str = ADDR) -> AuthResult:
        return self.accounts.authenticate(name, password, address)

    def secret_of(self, name: str) -> bytes:
        with self.sessions() as s:
            user = s.scalars(select(models.User).where(models.User.name == name)).one()
            assert user.totp is not None
            return totp_mod.open_secret(self.key, user.totp.sealed, user.pk)

    def code(self, name: str, offset_steps: int = 0) -> str:
        when = self.clock.now + dt.timedelta(seconds=30 * offset_steps)
        return totp_mod.generate_code(self.secret_of(name), when)

    def enrol(self, name: str, password: str = GOOD) -> AuthResult:
        """First sign-in with enrolment; leaves the clock one step later."""
        first = self.login(name, password)
        assert first.outcome is AuthOutcome.NEEDS_SECOND_FACTOR and not first.totp_enrolled
        self.accounts.enroll_totp(first.ticket, ADDR)
        done = self.accounts.verify_second_factor(first.ticket, self.code(name), ADDR)
        assert done.outcome is AuthOutcome.SUCCESS
        self.clock.advance(30)
        return done


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    key = secrets.token_bytes(32)
    engine = open_index(tmp_path / "index.db", secrets.token_bytes(32), create=True)
    sessions = session_factory(engine)
    clock = Clock()
    sink = ListSink()
    accounts = Accounts(sessions, Recorder([sink]), secret_key=key, clock=clock,
                        hasher=cheap_hasher(), recovery_hasher=cheap_hasher())
    yield Env(accounts, clock, sink, sessions, engine, key)
    engine.dispose()


# --- password policy -----------------------------------------------------------------------


@pytest.mark.parametrize(("password", "bits"), [
    ("qzmvkxnrbt", 10 * math.log2(26)),  # 47.0
    ("qzmvkxnrbtw", 11 * math.log2(26)),  # 51.7
    ("qzmvkxnrbtwgpfhdj", 17 * math.log2(26)),  # 79.9
    ("qzmvkxnrbtwgpfhdjc", 18 * math.log2(26)),  # 84.6
    ("Qz7!mV#", 7 * math.log2(95)),  # 46.0
    ("Qz7!mV2#", 8 * math.log2(95)),  # 52.6
    ("Qz7mV2kXw9RtPb", 14 * math.log2(62)),  # 83.4
    ("é" * 1 + "qzmvkxnrbt", 11 * math.log2(26 + 32)),
])
def test_entropy_is_length_times_log2_of_classes_used(password: str, bits: float) -> None:
    assert passwords.entropy_bits(password) == pytest.approx(bits)


def test_thresholds_50_bits_throttled_80_bits_otherwise() -> None:
    assert not passwords.check_password("qzmvkxnrbt").ok  # 47.0 < 50
    assert passwords.check_password("qzmvkxnrbtw").ok  # 51.7 >= 50
    assert not passwords.check_password("qzmvkxnrbtw", throttled=False).ok
    assert not passwords.check_password("qzmvkxnrbtwgpfhdj", throttled=False).ok  # 79.9
    assert passwords.check_password("qzmvkxnrbtwgpfhdjc", throttled=False).ok  # 84.6
    assert not passwords.check_password("Qz7!mV#").ok  # 46.0
    assert passwords.check_password("Qz7!mV2#").ok  # 52.6
    verdict = passwords.check_password("qzmvkxnrbt")
    assert verdict.required_bits == 50 and "too weak" in verdict.problems[0]


def test_no_character_class_is_required() -> None:
    # A phrase of lower-case words with accents and spaces: no digit, no capital, no symbol
    # class forced on anyone.
    assert passwords.check_password("le chat dort sur le canapé", throttled=False).ok
    assert passwords.check_password("velosouslapluie").ok  # 15 lower-case letters, 70 bits


def test_normalisation_makes_composed_and_decomposed_one_password() -> None:
    hasher = cheap_hasher()
    composed = "caf\u00e9-au-lait-du-matin"
    decomposed = "cafe\u0301-au-lait-du-matin"
    assert passwords.entropy_bits(composed) == passwords.entropy_bits(decomposed)
    assert passwords.verify_password(hasher, passwords.hash_password(hasher, composed),
                                     decomposed)


def test_repeated_unit_counts_once() -> None:
    assert passwords.entropy_bits("xkqxkqxkqxkqxkqxkqxkq") == pytest.approx(3 * math.log2(26))
    assert not passwords.check_password("xkqxkqxkqxkqxkqxkqxkq").ok


@pytest.mark.parametrize("password", [
    "password", "Password123!", "P@ssw0rd2024", "azertyuiop", "Motdepasse2024!",
    "soleil", "SOLEIL!!2023", "doudou123", "qwerty123456", "Radiologie#2025",
    "iloveyou", "trustno1", "!!Marseille13!!",
])
def test_common_passwords_refused(password: str) -> None:
    verdict = passwords.check_password(password, throttled=False)
    assert not verdict.ok
    assert any("common" in p for p in verdict.problems)


def test_common_password_refused_even_when_long_enough() -> None:
    # 15 characters of all four classes: 98 bits by the formula, and still the first guess.
    assert passwords.entropy_bits("Motdepasse2024!") > 80
    assert not passwords.check_password("Motdepasse2024!").ok


@pytest.mark.parametrize("password", ["qsdfghjklm", "1qaz2wsx3edc4rfv", "ZYXWVUTSRQPONMLK",
                                      "lkjhgfdsa-2025", "wxcvbn!!!!!!!!!!"])
def test_keyboard_and_alphabet_walks_refused(password: str) -> None:
    verdict = passwords.check_password(password, throttled=False)
    assert not verdict.ok
    assert any("common" in p or "sequence" in p for p in verdict.problems)


def test_password_containing_user_name_refused() -> None:
    verdict = passwords.check_password("Velo-DrMartin-42-pluie", user_name="drmartin")
    assert not verdict.ok and any("user name" in p for p in verdict.problems)
    assert passwords.check_password("Velo-Rouge-42-pluie", user_name="drmartin").ok


def test_common_list_is_shipped_and_large() -> None:
    from pacsvault.accounts.common_passwords import common_passwords

    words = common_passwords()
    assert len(words) > 10_000
    assert {"azerty", "motdepasse", "soleil", "password", "qwertyuiop"} <= words
    assert all(w == w.lower() for w in words)


def test_generated_password_is_readable_and_strong() -> None:
    seen = set()
    for _ in range(20):
        pw = passwords.generate_password()
        assert re.fullmatch(r"[a-hj-km-np-z2-9]{5}(-[a-hj-km-np-z2-9]{5}){3}", pw)
        assert passwords.check_password(pw, throttled=False).ok
        seen.add(pw)
    assert len(seen) == 20
    assert 20 * math.log2(31) >= 80  # random bits, not the estimate


# --- hashing -------------------------------------------------------------------------------


def test_argon2id_production_parameters_and_verification() -> None:
    hasher = passwords.default_hasher()
    encoded = passwords.hash_password(hasher, GOOD)
    assert encoded.startswith("$argon2id$v=19$m=65536,t=3,p=4$")
    assert passwords.verify_password(hasher, encoded, GOOD)
    assert not passwords.verify_password(hasher, encoded, GOOD + "x")
    assert not passwords.verify_password(hasher, "$argon2id$garbage", GOOD)
    assert not passwords.needs_rehash(hasher, encoded)
    assert passwords.needs_rehash(hasher, passwords.hash_password(cheap_hasher(), GOOD))


def test_sign_in_rehashes_with_new_parameters(env: Env) -> None:
    env.accounts.add_user("alice", ["physician"], GOOD)
    stronger = Accounts(env.sessions, Recorder([env.sink]), secret_key=env.key,
                        clock=env.clock, hasher=cheap_hasher(time_cost=2),
                        recovery_hasher=cheap_hasher())
    with env.sessions() as s:
        before = s.scalars(select(models.User.password_hash)).one()
    assert "t=1" in before
    assert stronger.authenticate("alice", GOOD, ADDR).outcome is AuthOutcome.NEEDS_SECOND_FACTOR
    with env.sessions() as s:
        after = s.scalars(select(models.User.password_hash)).one()
    assert after.startswith("$argon2id$") and "t=2" in after
    assert stronger.authenticate("alice", GOOD, ADDR).outcome is AuthOutcome.NEEDS_SECOND_FACTOR


# --- users ---------------------------------------------------------------------------------


def test_add_user_checks_name_roles_password(env: Env) -> None:
    info = env.accounts.add_user("Dr.Martin", ["physician", "auditor"], GOOD, by="admin")
    assert info.name == "dr.martin" and info.roles == ("auditor", "physician")
    assert not info.totp_enrolled and not info.disabled
    with pytest.raises(AccountError, match="already exists"):
        env.accounts.add_user("DR.MARTIN", ["physician"], GOOD)
    with pytest.raises(AccountError, match="roles"):
        env.accounts.add_user("bob", ["root"], GOOD)
    with pytest.raises(AccountError, match="roles"):
        env.accounts.add_user("bob", [], GOOD)
    with pytest.raises(AccountError, match="invalid user name"):
        env.accounts.add_user("bob smith", ["physician"], GOOD)
    with pytest.raises(PasswordRejected) as rejected:
        env.accounts.add_user("bob", ["physician"], "azerty123")
    assert rejected.value.problems
    with pytest.raises(PasswordRejected):
        env.accounts.add_user("bob", ["physician"], "bob-velo-rouge-pluie")
    assert [u.name for u in env.accounts.list_users()] == ["dr.martin"]
    event = env.sink.last("user.add")
    assert event.code is EventCode.SECURITY_ALERT and event.actor_user == "admin"
    assert event.detail == {"user": "dr.martin", "roles": "auditor,physician"}


def test_first_admin_gets_a_random_password_that_works(env: Env) -> None:
    info, password = env.accounts.first_admin()
    assert info.roles == ("admin",)
    assert re.fullmatch(r"admin-[a-z2-9]{6}", info.name), info.name  # not guessable
    assert passwords.check_password(password, throttled=False).ok
    assert env.login(info.name, password).outcome is AuthOutcome.NEEDS_SECOND_FACTOR


def test_times_are_stored_in_utc(env: Env) -> None:
    paris = dt.timezone(dt.timedelta(hours=1))
    env.clock.now = dt.datetime(2025, 3, 4, 11, 0, tzinfo=paris)
    env.accounts.add_user("alice", ["physician"], GOOD)
    with env.sessions() as s:
        created = s.scalars(select(models.User.created)).one()
    assert created == dt.datetime(2025, 3, 4, 10, 0, tzinfo=dt.UTC)
    assert created.tzinfo is not None


def test_disabled_user_cannot_sign_in_and_reset(env: Env) -> None:
    env.accounts.add_user("alice", ["physician"], GOOD)
    env.enrol("alice")
    env.accounts.disable("alice", by="admin")
    assert env.login("alice").outcome is AuthOutcome.FAILED
    assert env.sink.last("auth.login.failed").detail["reason"] == "disabled"
    env.accounts.enable("alice", by="admin")
    new = env.accounts.reset("alice", second_factor=True, by="admin")
    assert passwords.check_password(new, throttled=False).ok
    assert env.login("alice").outcome is AuthOutcome.FAILED  # old password gone
    again = env.login("alice", new)
    assert again.outcome is AuthOutcome.NEEDS_SECOND_FACTOR and not again.totp_enrolled
    assert env.accounts.get_user("alice").recovery_codes_left == 0


def test_reset_cancels_a_sign_in_begun_with_the_old_password(env: Env) -> None:
    env.accounts.add_user("alice", ["physician"], GOOD)
    env.enrol("alice")
    pending = env.login("alice")
    env.accounts.reset("alice", by="admin")
    assert env.accounts.verify_second_factor(pending.ticket, env.code("alice"), ADDR).outcome \
        is AuthOutcome.FAILED


# --- TOTP ----------------------------------------------------------------------------------


def test_enrolment_then_sign_in_with_totp(env: Env) -> None:
    env.accounts.add_user("alice", ["physician"], GOOD)
    first = env.login("alice")
    assert first.outcome is AuthOutcome.NEEDS_SECOND_FACTOR and not first.totp_enrolled
    assert first.user == "" and not first.roles  # nothing granted before the second factor
    enrolment = env.accounts.enroll_totp(first.ticket, ADDR)
    assert enrolment.uri.startswith("otpauth://totp/pacsvault:alice?")
    assert "issuer=pacsvault" in enrolment.uri and "period=30" in enrolment.uri
    assert "digits=6" in enrolment.uri and "algorithm=SHA1" in enrolment.uri
    assert "<svg" in enrolment.qr_svg and "<path" in enrolment.qr_svg
    # A reload shows the same secret, so an app that already scanned it keeps working.
    assert env.accounts.enroll_totp(first.ticket, ADDR).secret == enrolment.secret
    secret = base64.b32decode(enrolment.secret + "=" * (-len(enrolment.secret) % 8))
    assert secret == env.secret_of("alice") and len(secret) == 20
    done = env.accounts.verify_second_factor(first.ticket, env.code("alice"), ADDR)
    assert done.outcome is AuthOutcome.SUCCESS
    assert done.user == "alice" and done.roles == {"physician"}
    assert len(done.recovery_codes) == 10 and len(set(done.recovery_codes)) == 10
    assert all(re.fullmatch(r"([0-9A-Z]{4}-){3}[0-9A-Z]{4}", c) for c in done.recovery_codes)
    assert "auth.second_factor.enrolled" in env.sink.actions()
    login = env.sink.last("auth.login")
    assert login.actor_user == "alice" and login.actor_address == ADDR
    assert login.code is EventCode.USER_AUTHENTICATION
    # The ticket is single-use.
    again = env.accounts.verify_second_factor(first.ticket, env.code("alice"), ADDR)
    assert again.outcome is AuthOutcome.FAILED
    # Enrolled now: a new sign-in asks for the code, and enrolment is refused.
    env.clock.advance(30)
    second = env.login("alice")
    assert second.totp_enrolled
    with pytest.raises(AccountError, match="already enrolled"):
        env.accounts.enroll_totp(second.ticket, ADDR)
    ok = env.accounts.verify_second_factor(second.ticket, env.code("alice"), ADDR)
    assert ok.outcome is AuthOutcome.SUCCESS and ok.recovery_codes == ()


def test_totp_secret_is_sealed_in_the_database(env: Env) -> None:
    env.accounts.add_user("alice", ["physician"], GOOD)
    env.enrol("alice")
    secret = env.secret_of("alice")
    with env.sessions() as s:
        row = s.scalars(select(models.TotpSecret)).one()
        assert secret not in row.sealed
        assert base64.b32encode(secret).rstrip(b"=") not in row.sealed
        with pytest.raises(totp_mod.SecondFactorError):
            totp_mod.open_secret(secrets.token_bytes(32), row.sealed, row.user_pk)
        with pytest.raises(totp_mod.SecondFactorError):  # bound to its user row
            totp_mod.open_secret(env.key, row.sealed, row.user_pk + 1)


def test_totp_code_cannot_be_replayed(env: Env) -> None:
    env.accounts.add_user("alice", ["physician"], GOOD)
    env.enrol("alice")
    code = env.code("alice")
    first = env.login("alice")
    assert env.accounts.verify_second_factor(first.ticket, code, ADDR).outcome \
        is AuthOutcome.SUCCESS
    env.clock.advance(5)  # same 30-second step
    second = env.login("alice")
    replay = env.accounts.verify_second_factor(second.ticket, code, ADDR)
    assert replay.outcome is AuthOutcome.FAILED
    assert env.sink.last("auth.login.failed").detail["reason"] == "replayed-code"
    # The previous step's code is older than the last accepted one: refused too.
    assert env.accounts.verify_second_factor(second.ticket, env.code("alice", -1), ADDR) \
        .outcome is AuthOutcome.FAILED
    env.clock.advance(30)
    assert env.accounts.verify_second_factor(second.ticket, env.code("alice"), ADDR).outcome \
        is AuthOutcome.SUCCESS


def test_totp_window_is_one_step_each_way() -> None:
    secret = totp_mod.new_secret()
    now = T0 + dt.timedelta(seconds=7)
    step = totp_mod.time_step(now)

    def code_at(offset: int) -> str:
        return totp_mod.generate_code(secret, now + dt.timedelta(seconds=30 * offset))

    assert totp_mod.match_step(secret, code_at(0), now) == step
    assert totp_mod.match_step(secret, code_at(-1), now) == step - 1
    assert totp_mod.match_step(secret, code_at(1), now) == step + 1
    assert totp_mod.match_step(secret, code_at(-2), now) is None
    assert totp_mod.match_step(secret, code_at(2), now) is None
    spaced = code_at(0)[:3] + " " + code_at(0)[3:]
    assert totp_mod.match_step(secret, spaced, now) == step
    assert totp_mod.match_step(secret, "12345", now) is None
    assert totp_mod.match_step(secret, "abcdef", now) is None


def test_previous_and_next_step_codes_accepted_in_sign_in(env: Env) -> None:
    env.accounts.add_user("alice", ["physician"], GOOD)
    env.enrol("alice")
    env.clock.advance(60)
    first = env.login("alice")
    assert env.accounts.verify_second_factor(first.ticket, env.code("alice", -1), ADDR) \
        .outcome is AuthOutcome.SUCCESS
    second = env.login("alice")
    assert env.accounts.verify_second_factor(second.ticket, env.code("alice", 1), ADDR) \
        .outcome is AuthOutcome.SUCCESS


def test_wrong_totp_code_refused(env: Env) -> None:
    env.accounts.add_user("alice", ["physician"], GOOD)
    env.enrol("alice")
    first = env.login("alice")
    right = env.code("alice")
    wrong = f"{(int(right) + 1) % 1_000_000:06d}"
    result = env.accounts.verify_second_factor(first.ticket, wrong, ADDR)
    assert result.outcome is AuthOutcome.FAILED
    event = env.sink.last("auth.login.failed")
    assert event.detail["reason"] == "bad-code" and event.detail["factor"] == "totp"
    # The ticket survives a wrong code (the user retypes) ...
    assert env.accounts.verify_second_factor(first.ticket, right, ADDR).outcome \
        is AuthOutcome.SUCCESS


def test_ticket_is_bound_to_the_source_address(env: Env) -> None:
    env.accounts.add_user("alice", ["physician"], GOOD)
    env.enrol("alice")
    first = env.login("alice")
    stolen = env.accounts.verify_second_factor(first.ticket, env.code("alice"), OTHER)
    assert stolen.outcome is AuthOutcome.FAILED
    assert env.sink.last("auth.login.failed").detail["reason"] == "no-pending-login"
    # ... and a ticket used from elsewhere is gone.
    assert env.accounts.verify_second_factor(first.ticket, env.code("alice"), ADDR).outcome \
        is AuthOutcome.FAILED


def test_ticket_expires(env: Env) -> None:
    env.accounts.add_user("alice", ["physician"], GOOD)
    env.enrol("alice")
    first = env.login("alice")
    env.clock.advance(11 * 60)
    assert env.accounts.verify_second_factor(first.ticket, env.code("alice"), ADDR).outcome \
        is AuthOutcome.FAILED


def test_recovery_codes_are_single_use(env: Env) -> None:
    env.accounts.add_user("alice", ["physician"], GOOD)
    codes = env.enrol("alice").recovery_codes
    with env.sessions() as s:
        stored = s.scalars(select(models.RecoveryCode.code_hash)).all()
    assert len(stored) == 10 and all(h.startswith("$argon2id$") for h in stored)
    assert not any(c.replace("-", "") in h for c in codes for h in stored)
    first = env.login("alice")
    used = env.accounts.verify_second_factor(first.ticket, codes[3].lower(), ADDR)
    assert used.outcome is AuthOutcome.SUCCESS and used.recovery_codes_left == 9
    assert env.sink.last("auth.login").detail["factor"] == "recovery"
    second = env.login("alice")
    again = env.accounts.verify_second_factor(second.ticket, codes[3], ADDR)
    assert again.outcome is AuthOutcome.FAILED
    assert env.sink.last("auth.login.failed").detail["reason"] == "bad-recovery-code"
    # Another code still works; regenerating replaces them all.
    assert env.accounts.verify_second_factor(second.ticket, codes[0], ADDR).outcome \
        is AuthOutcome.SUCCESS
    fresh = env.accounts.new_recovery_codes("alice", by="alice")
    assert len(fresh) == 10 and env.accounts.get_user("alice").recovery_codes_left == 10
    third = env.login("alice")
    assert env.accounts.verify_second_factor(third.ticket, codes[5], ADDR).outcome \
        is AuthOutcome.FAILED


# --- throttling ----------------------------------------------------------------------------


def failures_of(env: Env, name: str, source: str) -> int:
    with env.sessions() as s:
        row = s.scalar(select(models.SignInFailure).where(
            models.SignInFailure.name_key == env.accounts.name_key(name),
            models.SignInFailure.source == source))
        return row.failed_count if row is not None else 0


def guess_until_blocked(env: Env, name: str, address: str | None = None,
                        limit: int = 80) -> AuthResult:
    """Wrong passwords (waiting through every delay) until a block; from ``address``, or
    from a new address each time when None."""
    for n in range(limit):
        result = env.login(name, f"wrong-{n}", address=address or f"198.51.{n // 200}.{n % 200}")
        if result.decision is not None and result.decision.verdict is Verdict.LOCKED:
            return result
        env.clock.advance(result.retry_after + 0.01)
    raise AssertionError("never blocked")


def test_delays_grow_after_five_failures(env: Env) -> None:
    env.accounts.add_user("alice", ["physician"], GOOD)
    for _ in range(4):
        result = env.login("alice", "wrong")
        assert result.outcome is AuthOutcome.FAILED and result.retry_after == 0
    expected = [1.0, 2.0, 4.0, 8.0, 16.0]
    for delay in expected:
        result = env.login("alice", "wrong")
        assert result.outcome is AuthOutcome.FAILED
        assert result.retry_after == pytest.approx(delay)
        # Too soon: refused without looking at the password, even the right one.
        early = env.login("alice", GOOD)
        assert early.outcome is AuthOutcome.DELAY
        assert early.retry_after == pytest.approx(delay)
        assert env.sink.last("auth.login.failed").detail["reason"] == "throttled"
        env.clock.advance(delay)
        if delay == 16.0:
            break
    assert failures_of(env, "alice", f"addr:{ADDR}") == 9  # refusals not counted


def test_ten_failures_block_the_name_from_that_source_only(env: Env) -> None:
    """The attack of issue 11 #6: 10 wrong passwords used to lock the account for everyone
    for 30 minutes. Now only the guessing source is blocked; an admin lifts it at once."""
    env.accounts.add_user("alice", ["physician"], GOOD)
    result = guess_until_blocked(env, "alice", ADDR)
    assert result.decision is not None and result.decision.scope == "source"
    locked = env.sink.last("auth.account.locked")
    assert locked.actor_user == "alice" and locked.detail["scope"] == "source"
    assert env.accounts.get_user("alice").locked
    assert env.login("alice", GOOD).outcome is AuthOutcome.LOCKED
    assert env.sink.last("auth.login.failed").detail["reason"] == "locked"
    # Alice, elsewhere, is not blocked at all.
    assert env.login("alice", address=OTHER).outcome is AuthOutcome.NEEDS_SECOND_FACTOR
    assert env.accounts.unlock("alice", by="admin")
    assert env.sink.last("auth.account.unlocked").actor_user == "admin"
    assert env.login("alice", GOOD).outcome is AuthOutcome.NEEDS_SECOND_FACTOR
    assert not env.accounts.unlock("alice", by="admin")  # nothing left to lift


def test_block_ends_after_the_timeout(env: Env) -> None:
    env.accounts.add_user("alice", ["physician"], GOOD)
    guess_until_blocked(env, "alice", ADDR)
    until = env.sink.last("auth.account.locked").detail["until"]
    assert isinstance(until, str) and until.endswith("+00:00")
    env.clock.advance(28 * 60)
    assert env.login("alice", GOOD).outcome is AuthOutcome.LOCKED
    env.clock.advance(3 * 60)
    assert env.login("alice", GOOD).outcome is AuthOutcome.NEEDS_SECOND_FACTOR


def test_rotating_addresses_block_new_sources_never_known_ones(env: Env) -> None:
    env.accounts.add_user("alice", ["physician"], GOOD)
    done = env.enrol("alice")  # from ADDR: a known address, and a known device
    assert done.device_token
    result = guess_until_blocked(env, "alice")  # one guess per address
    assert result.decision is not None and result.decision.scope == "new-sources"
    assert len({e.actor_address for e in env.sink.events
                if e.action == "auth.login.failed"}) >= 30
    # A machine alice never used is blocked for her name ...
    blocked = env.login("alice", address=OTHER)
    assert blocked.outcome is AuthOutcome.LOCKED and blocked.decision is not None
    assert blocked.decision.scope == "new-sources"
    # ... but not her own address, nor her browser wherever it is.
    assert env.login("alice").outcome is AuthOutcome.NEEDS_SECOND_FACTOR
    with_cookie = env.accounts.authenticate("alice", GOOD, OTHER, done.device_token)
    assert with_cookie.outcome is AuthOutcome.NEEDS_SECOND_FACTOR


def test_unknown_and_existing_names_are_counted_alike(env: Env) -> None:
    env.accounts.add_user("alice", ["physician"], GOOD)
    seen: dict[str, list[tuple[str, float, str]]] = {"alice": [], "nobody": []}
    for n in range(40):
        for name, net in (("alice", 1), ("nobody", 2)):
            result = env.login(name, f"wrong-{n}", address=f"198.51.{net}.{n}")
            scope = result.decision.scope if result.decision is not None else ""
            seen[name].append((result.outcome.value, result.retry_after, scope))
        env.clock.advance(1)
    assert seen["alice"] == seen["nobody"]
    assert {o for o, _, _ in seen["alice"]} >= {"failed", "delay"}


def test_device_cookie_is_random_hashed_and_reused(env: Env) -> None:
    env.accounts.add_user("alice", ["physician"], GOOD)
    env.accounts.add_user("bob", ["physician"], GOOD)
    cookie = env.enrol("alice").device_token
    assert len(cookie) == 43
    with env.sessions() as s:
        stored = list(s.scalars(select(models.KnownSource.value)))
    assert cookie not in stored and hashlib.sha256(cookie.encode()).hexdigest() in stored
    # The same browser, another user: one cookie for the browser.
    first = env.accounts.authenticate("bob", GOOD, ADDR, cookie)
    env.accounts.enroll_totp(first.ticket, ADDR)
    done = env.accounts.verify_second_factor(first.ticket, env.code("bob"), ADDR)
    assert done.device_token == cookie
    # A value the server never issued is replaced, not adopted.
    env.clock.advance(30)
    planted = "A" * 43
    again = env.accounts.authenticate("bob", GOOD, ADDR, planted)
    result = env.accounts.verify_second_factor(again.ticket, env.code("bob"), ADDR)
    assert result.device_token not in ("", planted)


def test_second_factor_failures_count_towards_the_block(env: Env) -> None:
    env.accounts.add_user("alice", ["physician"], GOOD)
    env.enrol("alice")
    first = env.login("alice")
    result = None
    for _ in range(10):
        result = env.accounts.verify_second_factor(first.ticket, "000000", ADDR)
        assert result.outcome is AuthOutcome.FAILED
        if result.decision is not None and result.decision.verdict is Verdict.DELAY:
            env.clock.advance(result.retry_after)
    assert result is not None and result.decision is not None
    assert result.decision.verdict is Verdict.LOCKED
    assert "auth.account.locked" in env.sink.actions()
    # The pending sign-in is gone with the block, even with the right code.
    assert env.accounts.verify_second_factor(first.ticket, env.code("alice"), ADDR).outcome \
        is not AuthOutcome.SUCCESS


def test_successful_sign_in_resets_the_sources_count(env: Env) -> None:
    env.accounts.add_user("alice", ["physician"], GOOD)
    env.enrol("alice")
    for _ in range(4):
        env.login("alice", "wrong")
    assert failures_of(env, "alice", f"addr:{ADDR}") == 4
    first = env.login("alice")
    env.accounts.verify_second_factor(first.ticket, env.code("alice"), ADDR)
    assert failures_of(env, "alice", f"addr:{ADDR}") == 0


def test_per_address_throttling_is_independent_of_accounts(env: Env) -> None:
    env.accounts.add_user("alice", ["physician"], GOOD)
    env.accounts.add_user("bob", ["physician"], GOOD)
    cookie = env.enrol("bob").device_token
    # One address spraying unknown names: no account is ever touched ...
    result = None
    for i in range(60):
        result = env.login(f"nobody{i}", GOOD)
        if result.decision is not None and result.decision.verdict is Verdict.LOCKED:
            break
        env.clock.advance(result.retry_after + 0.01)
    assert result is not None and result.decision is not None
    assert result.decision.verdict is Verdict.LOCKED and result.decision.scope == "address"
    assert env.sink.last("auth.address.locked").actor_address == ADDR
    assert "auth.account.locked" not in env.sink.actions()
    # ... yet that address is blocked for everyone, alice included ...
    blocked = env.login("alice")
    assert blocked.outcome is AuthOutcome.LOCKED
    assert blocked.decision is not None and blocked.decision.scope == "address"
    # ... but not a browser that signed in before (bob's), nor alice elsewhere.
    assert env.accounts.authenticate("bob", GOOD, ADDR, cookie).outcome \
        is AuthOutcome.NEEDS_SECOND_FACTOR
    assert env.login("alice", address=OTHER).outcome is AuthOutcome.NEEDS_SECOND_FACTOR
    assert [b.scope for b in env.accounts.blocks()] == ["address"]
    # The address block is timed, and an admin can lift it sooner.
    assert env.accounts.unlock_address(ADDR, by="admin")
    assert env.login("alice").outcome is AuthOutcome.NEEDS_SECOND_FACTOR
    assert env.accounts.blocks() == []


def test_address_failures_are_not_reset_by_a_success_but_forgotten_later(env: Env) -> None:
    env.accounts.add_user("alice", ["physician"], GOOD)
    env.enrol("alice")
    for i in range(10):
        env.login(f"nobody{i}", GOOD)
    env.clock.advance(1)
    first = env.login("alice")
    assert env.accounts.verify_second_factor(first.ticket, env.code("alice"), ADDR).outcome \
        is AuthOutcome.SUCCESS
    # Still 10 failures on the address: the next guess is delayed.
    assert env.login("nobody", GOOD).retry_after == pytest.approx(2.0)
    env.clock.advance(3600)
    assert env.login("nobody", GOOD).retry_after == 0


def test_address_keys_group_ipv6_by_64() -> None:
    assert address_key("192.0.2.1") == "192.0.2.1"
    assert address_key("2001:db8:1:2:aaaa::1") == "2001:db8:1:2::/64"
    assert address_key("2001:db8:1:2:bbbb::9") == "2001:db8:1:2::/64"
    assert address_key("[2001:db8:1:3::1]") == "2001:db8:1:3::/64"
    assert address_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert address_key("fe80::1%eth0") == "fe80::/64"


def test_delay_schedule_is_exponential_and_capped() -> None:
    policy = ThrottlePolicy(max_delay=10)
    assert [policy.delay_after(n) for n in range(4, 11)] == [0, 1, 2, 4, 8, 10, 10]
    with pytest.raises(ValueError):
        ThrottlePolicy(free_failures=10, lock_after=10)


def test_events_carry_who_and_where_but_never_a_secret(env: Env) -> None:
    env.accounts.add_user("alice", ["physician"], GOOD)
    codes = env.enrol("alice").recovery_codes
    typed = "Secret-Typed-In-Wrong-Field-42"
    env.login(typed, GOOD)  # a password typed as the user name
    env.login("alice", "Not-Her-Password-99")
    first = env.login("alice")
    code = env.code("alice")
    env.accounts.verify_second_factor(first.ticket, "111111", ADDR)
    env.accounts.verify_second_factor(first.ticket, code, ADDR)
    second = env.login("alice")
    env.accounts.verify_second_factor(second.ticket, codes[1], ADDR)
    issued = env.accounts.create_token("alice", "1d", by="admin")
    env.accounts.verify_token(issued.token[:-1] + ("b" if issued.token[-1] == "a" else "a"),
                              ADDR)
    auth = [e for e in env.sink.events if e.action.startswith("auth.")]
    assert {"auth.login", "auth.login.failed"} <= {e.action for e in auth}
    assert all(e.code is EventCode.USER_AUTHENTICATION for e in auth)
    assert all(e.actor_address == ADDR for e in auth)
    unknown = [e for e in auth if e.detail.get("reason") == "unknown-user"]
    assert unknown and unknown[0].actor_user == ""
    wrong = [e for e in auth if e.detail.get("reason") == "bad-password"]
    assert wrong and wrong[0].actor_user == "alice"
    dumped = repr(env.sink.events)
    secret_part = tokens.split_token(issued.token)
    assert secret_part is not None
    for secret in (GOOD, typed, "Not-Her-Password-99", code, codes[1],
                   codes[1].replace("-", ""), secret_part[1], first.ticket):
        assert secret not in dumped


# --- API tokens ----------------------------------------------------------------------------


def test_parse_expiry() -> None:
    assert tokens.parse_expiry("30d") == dt.timedelta(days=30)
    assert tokens.parse_expiry("12h") == dt.timedelta(hours=12)
    assert tokens.parse_expiry("90m") == dt.timedelta(minutes=90)
    assert tokens.parse_expiry(" 2W ") == dt.timedelta(weeks=2)
    for bad in ("30", "d", "0d", "400d", "-1d", "1y", "1.5d", ""):
        with pytest.raises(tokens.TokenError):
            tokens.parse_expiry(bad)


def test_token_create_verify_and_scope(env: Env) -> None:
    env.accounts.add_user("viewer", ["physician"], GOOD)
    issued = env.accounts.create_token("viewer", "30d", label="OHIF", by="admin")
    assert re.fullmatch(r"pv_[0-9a-f]{16}_[a-z2-7]{32}", issued.token)
    assert issued.expires == T0 + dt.timedelta(days=30)
    assert env.sink.last("token.create").detail["token"] == issued.token_id
    result = env.accounts.verify_token(issued.token, ADDR)
    assert result.ok and result.identity is not None
    assert result.identity.user == "viewer" and result.identity.roles == {"physician"}
    assert result.identity.token_id == issued.token_id
    # Roles are the user's current ones.
    env.accounts.set_roles("viewer", ["auditor"], by="admin")
    identity = env.accounts.verify_token(issued.token, ADDR).identity
    assert identity is not None and identity.roles == {"auditor"}
    [info] = env.accounts.list_tokens("viewer")
    assert info.label == "OHIF" and info.last_used == T0 and info.revoked is None
    # Valid use records nothing (the web layer records the request itself).
    assert not [e for e in env.sink.events if e.action.startswith("auth.")]


def test_token_stored_as_hash_only(env: Env) -> None:
    env.accounts.add_user("viewer", ["physician"], GOOD)
    issued = env.accounts.create_token("viewer", "1d")
    parts = tokens.split_token(issued.token)
    assert parts is not None
    token_id, secret = parts
    assert token_id == issued.token_id
    assert len(base64.b32decode(secret.upper())) * 8 >= 128
    with env.engine.connect() as conn:
        rows = conn.execute(text("SELECT * FROM api_tokens")).all()
    assert len(rows) == 1
    values = list(rows[0])
    assert hashlib.sha256(secret.encode()).digest() in values
    for value in values:
        blob = value if isinstance(value, bytes) else str(value).encode()
        assert secret.encode() not in blob and issued.token.encode() not in blob
    # Nowhere else in the database either.
    with env.engine.connect() as conn:
        tables = conn.execute(text("SELECT name FROM sqlite_master WHERE type='table'")).all()
        for (table,) in tables:
            for row in conn.execute(text(f'SELECT * FROM "{table}"')).all():  # noqa: S608
                assert secret not in repr(row)


def test_token_expiry_and_revocation(env: Env) -> None:
    env.accounts.add_user("viewer", ["physician"], GOOD)
    short = env.accounts.create_token("viewer", "1h")
    long = env.accounts.create_token("viewer", "30d")
    env.clock.advance(3600)
    expired = env.accounts.verify_token(short.token, ADDR)
    assert not expired.ok and expired.reason == "expired"
    assert env.sink.last("auth.login.failed").detail == {"reason": "expired", "factor": "token"}
    assert env.sink.last("auth.login.failed").actor_user == "viewer"
    assert env.accounts.verify_token(long.token, ADDR).ok
    assert env.accounts.revoke_token(long.token_id, by="admin")
    revoked = env.accounts.verify_token(long.token, ADDR)
    assert not revoked.ok and revoked.reason == "revoked"
    assert env.sink.last("token.revoke").detail["token"] == long.token_id
    assert not env.accounts.revoke_token("0123456789abcdef")
    # Presenting a real but dead token is not a guess: it never locks the address.
    for _ in range(20):
        assert env.accounts.verify_token(long.token, ADDR).reason == "revoked"
    with env.sessions() as s:
        assert s.scalars(select(models.LoginAttempt)).all() == []


def test_token_of_disabled_user_refused(env: Env) -> None:
    env.accounts.add_user("viewer", ["physician"], GOOD)
    issued = env.accounts.create_token("viewer", "1d")
    env.accounts.disable("viewer")
    assert env.accounts.verify_token(issued.token, ADDR).reason == "disabled"
    with pytest.raises(AccountError, match="disabled"):
        env.accounts.create_token("viewer", "1d")


def test_token_guesses_count_against_the_address_only(env: Env) -> None:
    env.accounts.add_user("viewer", ["physician"], GOOD)
    issued = env.accounts.create_token("viewer", "1d")
    token_id = issued.token_id
    forged = f"pv_{token_id}_{'a' * 32}"
    assert env.accounts.verify_token(forged, ADDR).reason == "bad-secret"
    assert env.accounts.verify_token("pv_0000000000000000_" + "b" * 32, ADDR).reason \
        == "unknown"
    assert env.accounts.verify_token("Bearer nonsense", ADDR).reason == "malformed"
    result = None
    for _ in range(60):
        result = env.accounts.verify_token(forged, ADDR)
        if result.decision is not None and result.decision.verdict is Verdict.LOCKED:
            break
        if result.decision is not None:
            env.clock.advance(result.decision.retry_after + 0.01)
    assert result is not None and result.decision is not None
    assert result.decision.verdict is Verdict.LOCKED
    # The address is blocked for guesses, never for the real token (issue 12 #4); the
    # account itself was never counted.
    assert env.accounts.verify_token(forged, ADDR).reason == "throttled"
    assert env.accounts.verify_token(issued.token, ADDR).ok
    assert env.accounts.verify_token(issued.token, OTHER).ok
    assert failures_of(env, "viewer", f"addr:{ADDR}") == 0
    assert env.login("viewer", address=OTHER).outcome is AuthOutcome.NEEDS_SECOND_FACTOR


# --- plumbing ------------------------------------------------------------------------------


def test_qr_png_and_svg_are_images() -> None:
    uri = totp_mod.provisioning_uri(totp_mod.new_secret(), "alice", "pacsvault")
    assert totp_mod.qr_png(uri).startswith(b"\x89PNG\r\n\x1a\n")
    svg = totp_mod.qr_svg(uri)
    assert svg.startswith("<svg") and 'xmlns="http://www.w3.org/2000/svg"' in svg


def test_create_tables_upgrades_an_index_made_before_accounts(tmp_path: Path) -> None:
    engine = open_index(tmp_path / "old.db", secrets.token_bytes(32), create=True)
    try:
        with engine.begin() as conn:
            for table in reversed(models.ACCOUNT_TABLES):
                table.drop(conn)
            names = {r[0] for r in conn.execute(text("SELECT name FROM sqlite_master"))}
        assert "users" not in names and "studies" in names
        models.create_tables(engine)
        models.create_tables(engine)  # idempotent
        with engine.connect() as conn:
            names = {r[0] for r in conn.execute(text("SELECT name FROM sqlite_master"))}
        assert {t.name for t in models.ACCOUNT_TABLES} <= names
    finally:
        engine.dispose()


def test_tables_added_later_are_created_when_an_existing_vault_opens(tmp_path: Path) -> None:
    """Vaults made before the sign-in counters and known devices existed gain their tables
    when accounts are first used (vaults are opened without create_all)."""
    engine = open_index(tmp_path / "old.db", secrets.token_bytes(32), create=True)
    try:
        with engine.begin() as conn:
            for table in models.LATER_TABLES:
                table.drop(conn)
        accounts = Accounts(session_factory(engine), Recorder([]),
                            secret_key=secrets.token_bytes(32), hasher=cheap_hasher(),
                            recovery_hasher=cheap_hasher())
        with engine.connect() as conn:
            names = {r[0] for r in conn.execute(text("SELECT name FROM sqlite_master"))}
        assert {t.name for t in models.LATER_TABLES} <= names
        assert accounts.authenticate("nobody", "x", ADDR).outcome is AuthOutcome.FAILED
    finally:
        engine.dispose()


def test_racing_first_failures_from_one_source_are_both_counted(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another request creates the (name, source) row between our read and our insert: the
    unique constraint fails, the step runs again and records one event, not two."""
    throttle = env.accounts.throttle
    original = throttle._name_row
    raced: list[bool] = []

    def racing(session: Session, name_key: str, source: str, *,
               create: bool) -> models.SignInFailure | None:
        if not create or raced:
            return original(session, name_key, source, create=create)
        raced.append(True)
        assert original(session, name_key, source, create=False) is None
        with env.engine.begin() as conn:  # the other request wins the insert
            conn.execute(cast(Table, models.SignInFailure.__table__).insert().values(
                name_key=name_key, source=source, failed_count=1, last_failed=env.clock.now))
        row = models.SignInFailure(name_key=name_key, source=source, failed_count=0)
        session.add(row)
        return row

    monkeypatch.setattr(throttle, "_name_row", racing)
    assert env.login("nobody").outcome is AuthOutcome.FAILED
    assert raced == [True]
    assert env.sink.actions().count("auth.login.failed") == 1
    assert failures_of(env, "nobody", f"addr:{ADDR}") == 2


def test_alert_rules_recognise_the_events(env: Env) -> None:
    """The events feed the alert rules unchanged: a guessing run and a lock raise alerts."""
    from pacsvault.audit.alerts import AlertSettings, Detector

    detector = Detector(AlertSettings(), clock=env.clock)
    env.accounts.add_user("alice", ["physician"], GOOD)
    for _ in range(10):
        result = env.login("alice", "wrong")
        if result.decision is not None and result.decision.verdict is Verdict.DELAY:
            env.clock.advance(result.retry_after)
    rules = {alert.rule for event in env.sink.events for alert in detector.observe(event)}
    assert {"failed-logins", "account-locked"} <= rules
