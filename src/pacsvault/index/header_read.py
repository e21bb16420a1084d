"""Read only the attributes a query needs from a record's stored header (issue 17).

Why: a study's stored header (``meta_json``) is the whole header of the first instance
received, ~260 attributes and ~11 KB of DICOM JSON for a CT; a C-FIND or QIDO-RS answer
reads about fifteen of them. ``json.loads`` built every one (~90 us per answered study,
about half of an answer's CPU, 3-4 ms of a C-FIND answering 40 studies). Here a decoder
made once per *set of wanted tags* (``msgspec`` with a struct of those tags only) scans the
text and builds Python objects for the wanted attributes alone, the others skipped
unbuilt (~20 us). The result is the subset ``json.loads`` would give, key for key and
value for value; what msgspec does not take (``NaN``/``Infinity``, out-of-range numbers,
lone surrogates: text ``json.dumps`` may write) is read by ``json.loads`` instead.

The cache holds decoders keyed by tag sets (what a query asks, never a queried value nor
anything read from a header).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterable
from typing import Any

import msgspec

# False: always ``json.loads`` (the tests compare both).
ENABLED = True

Reader = Callable[[str | None], dict[str, Any]]


def _full(text: str | None) -> dict[str, Any]:
    found: dict[str, Any] = json.loads(text or "{}")
    return found


def reader(tags: Iterable[str] | None) -> Reader:
    """A function giving the header's top-level entries whose keys are in ``tags`` (all of
    them when ``tags`` is None), as ``json.loads`` would."""
    if tags is None or not ENABLED:
        return _full
    return _subset(frozenset(tags))


@functools.lru_cache(maxsize=256)
def _subset(tags: frozenset[str]) -> Reader:
    # A field per tag, named by position (tags are not identifiers), renamed to the tag.
    order = sorted(tags)
    fields = [(f"f{i}", Any, msgspec.UNSET) for i in range(len(order))]
    struct = msgspec.defstruct("WantedTags", fields,
                               rename={f"f{i}": tag for i, tag in enumerate(order)},
                               gc=False)
    decoder = msgspec.json.Decoder(struct)
    names = [(f"f{i}", tag) for i, tag in enumerate(order)]
    unset = msgspec.UNSET

    def read(text: str | None) -> dict[str, Any]:
        if not text:
            return {}
        try:
            found = decoder.decode(text)
        except msgspec.MsgspecError:  # e.g. NaN written by json.dumps: the stdlib reads it
            full = _full(text)
            return {tag: full[tag] for tag in order if tag in full}
        out: dict[str, Any] = {}
        for name, tag in names:
            value = getattr(found, name)
            if value is not unset:
                out[tag] = value
        return out

    return read


__all__ = ["ENABLED", "Reader", "reader"]
