"""The list of common passwords a new password is checked against.

Why a list at all: the entropy estimate of ``passwords`` only looks at length and kinds of
characters, so it rates "motdepasse2024!" or "Password1234" as strong. Attackers try leaked
and popular passwords first, whatever their length, so these are refused outright.

Two parts, both lower case (the check case-folds, and also strips digits and symbols around
a word and undoes common letter substitutions such as @ for a, 0 for o):

* ``_TOP``: the 10,000 most frequent passwords of the ``zxcvbn`` package's "passwords"
  frequency list (itself built from leaked password corpora), in order of frequency, without
  the all-digit entries shorter than 16 characters (never acceptable on length alone, and
  never the word inside a decorated password) and without entries shorter than 4 characters.
  It is shipped in the package, not fetched at run time: the server never fetches anything.
* ``_FRENCH``: a hand-made list of what French users pick and English lists miss: AZERTY
  keyboard walks, "motdepasse", "soleil", "doudou", first names, cities, football clubs, and
  words of a medical practice (an attacker guesses "radiologie" or "cabinet" first).

Both are data files of the package, read once on first use (``importlib.resources``, so
they are found in a wheel or a zip as well as in a source tree):

* ``data/common-passwords-zxcvbn.txt.gz``: ``_TOP``, compressed (10,000 lines);
* ``data/common-passwords-fr.txt``: ``_FRENCH``, plain text, edited by hand.

One password per line; lines starting with ``#`` are comments (no listed password starts
with ``#``). The ``_TOP`` entries are derived from zxcvbn
(https://github.com/dwolfhub/zxcvbn-python), distributed under the MIT licence:

    Copyright (c) 2016 Daniel Wolf

    Permission is hereby granted, free of charge, to any person obtaining a copy of this
    software and associated documentation files (the "Software"), to deal in the Software
    without restriction, including without limitation the rights to use, copy, modify,
    merge, publish, distribute, sublicense, and/or sell copies of the Software, and to
    permit persons to whom the Software is furnished to do so, subject to the following
    conditions:

    The above copyright notice and this permission notice shall be included in all copies
    or substantial portions of the Software.

    THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED,
    INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A
    PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT
    HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF
    CONTRACT, TORT OR OTHERWISE, ARISING FROM, OUT OF OR IN CONNECTION WITH THE SOFTWARE OR
    THE USE OR OTHER DEALINGS IN THE SOFTWARE.
"""

from __future__ import annotations

import gzip
from functools import cache
from importlib.resources import files

_DATA = files("pacsvault.accounts") / "data"
_TOP = "common-passwords-zxcvbn.txt.gz"
_FRENCH = "common-passwords-fr.txt"


def _words(text: str) -> frozenset[str]:
    return frozenset(word for line in text.splitlines()
                     if not line.startswith("#") for word in line.split())


@cache
def common_passwords() -> frozenset[str]:
    """Every listed password (lower case), built once on first use."""
    top = gzip.decompress((_DATA / _TOP).read_bytes()).decode("utf-8")
    french = (_DATA / _FRENCH).read_text(encoding="utf-8")
    return _words(top) | _words(french)
