"""Password acceptance (CNIL deliberation n° 2022-100), Argon2id hashing, generation.

Acceptance
----------
The CNIL's recommendation on passwords (délibération n° 2022-100 du 21 juillet 2022, JO du
16 octobre 2022) measures a password policy by the entropy it guarantees, not by forced kinds
of characters: at least 80 bits for a password alone (its case n° 1), at least 50 bits when
the account is protected against online guessing by an access restriction such as growing
delays and a temporary lock after failures (case n° 2). pacsvault always throttles sign-ins
(``throttle``), so its default is 50 bits; ``throttled=False`` asks for 80.

The estimator is the one the CNIL's examples use: every character is assumed drawn uniformly
from the union of the character classes the password actually uses, so

    bits = length × log2(sum of the sizes of the classes used)

with classes: lower-case ASCII letters (26), upper-case ASCII letters (26), digits (10), ASCII
symbols and space (33), and any other character (accented letters, €, ...: 32, deliberately
low since French keyboards add only a few). Length is counted in Unicode code points after
NFKC normalisation, the same form that is hashed, so "é" typed composed or decomposed is
one character and the same password. Examples: 11 lower-case letters = 51.7 bits (10 = 47.0);
8 characters mixing all four ASCII classes = 52.6 bits; 18 lower-case letters = 84.6 bits
(17 = 79.9); 14 characters of letters in both cases and digits = 83.4 bits. (The CNIL's
example "12 characters of all four kinds" computes to 78.8 bits here, so at 80 bits it needs
13; we keep the formula exact rather than round in the attacker's favour.)

No class is ever required: a long phrase of lower-case words passes. One correction to the
formula: a password made of one short unit repeated ("abcabcabc...") counts the unit only,
since repeating adds almost nothing for a guesser.

Because the formula rates "Motdepasse2024!" at 98 bits, three checks come on top, as the
CNIL's text also asks (a password must not be easy to guess from public or common data):
the password, and the word inside it once digits and symbols around it are stripped and
common substitutions (@→a, 0→o, 1→i, 3→e, $→s ...) undone, must not be in the list of common
passwords (``common_passwords``); it must not be a keyboard or alphabet walk ("azertyuiop",
"qsdfghjklm", "abcdefgh..."); and it must not contain the user name.

Hashing
-------
Argon2id (argon2-cffi) with the second recommended option of RFC 9106 §4 (t=3, m=64 MiB,
p=4, 16-byte salt, 32-byte tag), which needs no 2 GiB per sign-in on a small practice server
yet makes an offline guess cost 64 MiB of memory. The parameters are in each hash
(``$argon2id$v=19$m=65536,t=3,p=4$...``): when they are raised later, ``needs_rehash`` tells
the sign-in code to re-hash the password it has just verified.
"""

from __future__ import annotations

import math
import re
import secrets
import unicodedata
from dataclasses import dataclass
from functools import cache

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from pacsvault.accounts.common_passwords import common_passwords

MIN_BITS_THROTTLED = 50.0
MIN_BITS_UNTHROTTLED = 80.0
MAX_LENGTH = 256  # longer is pointless and makes each hash a denial-of-service lever

# RFC 9106 §4, second recommended option ("if much less memory is available").
ARGON2_TIME_COST = 3
ARGON2_MEMORY_KIB = 64 * 1024
ARGON2_PARALLELISM = 4
ARGON2_HASH_LEN = 32
ARGON2_SALT_LEN = 16

CLASS_SIZES = {"lower": 26, "upper": 26, "digit": 10, "symbol": 33, "other": 32}

_LEET = str.maketrans({"@": "a", "4": "a", "3": "e", "1": "i", "!": "i", "0": "o",
                       "$": "s", "5": "s", "7": "t", "+": "t", "8": "b"})
# Keyboard rows and columns (QWERTY, AZERTY, QWERTZ) and the alphabet: a password that is
# a stretch of one of these, forwards or backwards, is a "walk" attackers try early.
_WALKS = (
    "abcdefghijklmnopqrstuvwxyz", "01234567890",
    "qwertyuiop", "asdfghjkl", "zxcvbnm", "azertyuiop", "qsdfghjklm", "wxcvbn",
    "qwertzuiop", "yxcvbnm",
    "1qaz2wsx3edc4rfv5tgb6yhn7ujm8ik9ol0p", "1aqw2zsx3edc4rfv5tgb6yhn7uj8ik9ol0pm",
    "qazwsxedcrfvtgbyhnujmikolp", "aqwzsxedcrfvtgbyhnujikolpm",
)
_MIN_WALK = 4


def normalise(password: str) -> str:
    """The form that is measured and hashed: NFKC, so equivalent spellings are one password."""
    return unicodedata.normalize("NFKC", password)


def _class_of(ch: str) -> str:
    if "a" <= ch <= "z":
        return "lower"
    if "A" <= ch <= "Z":
        return "upper"
    if "0" <= ch <= "9":
        return "digit"
    if ch.isascii():
        return "symbol"
    return "other"


def _period(text: str) -> int:
    """Length of the shortest unit whose repetition (at least twice) gives ``text``."""
    n = len(text)
    for p in range(1, n // 2 + 1):
        if text == (text[:p] * (n // p + 1))[:n]:
            return p
    return n


def entropy_bits(password: str) -> float:
    """The CNIL-style estimate described in the module docstring."""
    pw = normalise(password)
    if not pw:
        return 0.0
    alphabet = sum(CLASS_SIZES[c] for c in {_class_of(ch) for ch in pw})
    return _period(pw) * math.log2(alphabet)


def _core(text: str) -> str:
    """The word inside the decoration: leading/trailing digits, symbols and spaces off."""
    return re.sub(r"^[\W\d_]+|[\W\d_]+$", "", text)


def is_common(password: str) -> bool:
    """In the common list as is, case-folded, stripped of decoration or de-substituted."""
    folded = normalise(password).casefold()
    common = common_passwords()
    candidates = {folded, _core(folded), folded.translate(_LEET)}
    candidates.add(_core(folded.translate(_LEET)))
    candidates.add(_core(folded).translate(_LEET))
    return any(c and c in common for c in candidates)


def is_walk(password: str) -> bool:
    """A keyboard row/column or alphabet stretch (forwards or backwards), decoration off."""
    folded = normalise(password).casefold()
    for text in {folded, _core(folded)}:
        if len(text) < _MIN_WALK:
            continue
        for walk in _WALKS:
            if text in walk or text in walk[::-1]:
                return True
    return False


@dataclass(frozen=True)
class PasswordCheck:
    """The verdict on a candidate password; ``problems`` are user-facing sentences."""

    bits: float
    required_bits: float
    problems: tuple[str, ...]
    # One code per problem, in the same order, for callers that word them themselves (the
    # web pages translate them): too-long, control, weak, common, walk, user-name.
    codes: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.problems


def check_password(password: str, *, user_name: str = "", throttled: bool = True) -> PasswordCheck:
    """Judge a new password. ``throttled`` says sign-ins are rate-limited (CNIL case n° 2)."""
    required = MIN_BITS_THROTTLED if throttled else MIN_BITS_UNTHROTTLED
    pw = normalise(password)
    bits = entropy_bits(pw)
    problems: list[str] = []
    codes: list[str] = []

    def problem(code: str, text: str) -> None:
        codes.append(code)
        problems.append(text)

    if len(pw) > MAX_LENGTH:
        problem("too-long", f"the password is longer than {MAX_LENGTH} characters")
    if any(unicodedata.category(ch) == "Cc" for ch in pw):
        problem("control", "the password contains control characters")
    if bits < required:
        problem("weak",
                f"the password is too weak ({bits:.0f} bits, {required:.0f} needed): make it "
                "longer; a phrase of several words is easiest to remember")
    if is_common(pw):
        problem("common", "the password is one of the most common passwords (or a variant)")
    elif is_walk(pw):
        problem("walk", "the password is a keyboard or alphabet sequence")
    name = user_name.casefold()
    if len(name) >= 3 and name in pw.casefold():
        problem("user-name", "the password contains the user name")
    return PasswordCheck(bits=bits, required_bits=required, problems=tuple(problems),
                         codes=tuple(codes))


# --- hashing -------------------------------------------------------------------------------


def passphrase_problems(passphrase: str) -> list[str]:
    """The account-password rule (CNIL entropy), at the *unthrottled* level: a stolen key
    file can be attacked offline, where no sign-in throttling applies. (Here rather than in
    ``crypto.protection``, which sits below accounts in the import layers.)"""
    return list(check_password(passphrase, throttled=False).problems)


def default_hasher() -> PasswordHasher:
    """The production Argon2id hasher (RFC 9106 second recommended option)."""
    return PasswordHasher(
        time_cost=ARGON2_TIME_COST, memory_cost=ARGON2_MEMORY_KIB,
        parallelism=ARGON2_PARALLELISM, hash_len=ARGON2_HASH_LEN, salt_len=ARGON2_SALT_LEN,
        type=Type.ID,
    )


def hash_password(hasher: PasswordHasher, password: str) -> str:
    return hasher.hash(normalise(password))


def verify_password(hasher: PasswordHasher, encoded: str, password: str) -> bool:
    """Check a password against its hash (argon2 compares tags in constant time).

    A damaged hash counts as a mismatch: sign-in must fail closed, never raise at the user.
    """
    try:
        return hasher.verify(encoded, normalise(password))
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def needs_rehash(hasher: PasswordHasher, encoded: str) -> bool:
    """True when the hash was made with other parameters than ``hasher``'s (re-hash it)."""
    try:
        return hasher.check_needs_rehash(encoded)
    except (InvalidHashError, ValueError):
        return True


@cache
def _dummy_hash(time_cost: int, memory_cost: int, parallelism: int) -> str:
    hasher = PasswordHasher(time_cost=time_cost, memory_cost=memory_cost,
                            parallelism=parallelism)
    return hasher.hash(secrets.token_urlsafe(16))


def burn_verification(hasher: PasswordHasher, password: str) -> None:
    """Verify against a throw-away hash with the same cost.

    Called for unknown user names, so that "no such user" takes as long as "wrong
    password" and the answer time does not tell which user names exist.
    """
    p = hasher
    verify_password(hasher, _dummy_hash(p.time_cost, p.memory_cost, p.parallelism), password)


# --- generation ----------------------------------------------------------------------------

# Lower-case letters and digits without the look-alikes i, l, o, 0, 1: read off a screen and
# typed on any keyboard layout (AZERTY included) without mistakes.
_READABLE = "abcdefghjkmnpqrstuvwxyz23456789"


def generate_password(groups: int = 4, group_len: int = 5) -> str:
    """A random password such as ``k7qmz-vh3ta-9xwcn-pe4rd``: 20 characters of a 31-symbol
    alphabet, 99 random bits (>= 80 whatever the throttling), shown once to the first admin
    or after an admin reset."""
    if groups * group_len * math.log2(len(_READABLE)) < MIN_BITS_UNTHROTTLED:
        raise ValueError("a generated password must carry at least 80 random bits")
    while True:
        text = "-".join(
            "".join(secrets.choice(_READABLE) for _ in range(group_len)) for _ in range(groups)
        )
        if check_password(text, throttled=False).ok:
            return text
