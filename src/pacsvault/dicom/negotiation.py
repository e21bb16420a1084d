"""Which transfer syntax we accept when a sender offers several in one presentation context.

pynetdicom accepts the first of the *acceptor's* transfer syntaxes that the requestor
offers. Ours used to follow pydicom's list, Implicit VR Little Endian first, so a sender
offering ``[RLE, Explicit, Implicit]`` in one context (dcmtk ``dcmsend``) decompressed its
RLE, JPEG-LS and JPEG lossless objects and turned Explicit VR into Implicit before sending:
private-tag VRs lost, objects no longer byte-identical (issue 13, defect 3).

So before each negotiation the acceptor's order is rebuilt from what the sender offers
(``DicomService.restrict_contexts``), by a preference:

- ``keep`` (default): the sender's compressed (encapsulated) syntaxes, in its order, never
  forcing a decompression; Deflated Explicit VR LE too when the sender lists it first;
  then Explicit VR LE, then Implicit VR LE, then Deflated; Explicit VR Big Endian only when
  nothing else is offered.
- ``as-offered``: the sender's own first choice, whatever it is.
- ``explicit`` / ``implicit``: that uncompressed syntax first, then the other, then the
  rest as offered, Big Endian last: for a modality whose compressed output misbehaves.

Cheap on purpose: it runs per association, over the few syntaxes offered per context.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from pydicom.uid import (
    UID,
    AllTransferSyntaxes,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

KEEP = "keep"
AS_OFFERED = "as-offered"
EXPLICIT = "explicit"
IMPLICIT = "implicit"
PREFERENCES = (KEEP, AS_OFFERED, EXPLICIT, IMPLICIT)

_ENCAPSULATED = frozenset(str(ts) for ts in AllTransferSyntaxes if UID(ts).is_encapsulated)
_EXPLICIT = str(ExplicitVRLittleEndian)
_IMPLICIT = str(ImplicitVRLittleEndian)
_DEFLATED = str(DeflatedExplicitVRLittleEndian)
_BIG = str(ExplicitVRBigEndian)


def preference_for(ae_title: str, configured: Mapping[str, str]) -> str:
    """The preference of a calling AE title (``[dicom] syntax_preference``), else ``keep``."""
    if not configured:
        return KEEP
    return configured.get(ae_title.strip(), KEEP)


def _group(ts: str, first: bool, preference: str) -> int:
    """Lower is preferred; ties keep the sender's order."""
    if preference == AS_OFFERED:
        return 0
    if ts == _BIG:
        return 9
    if preference == KEEP:
        if ts in _ENCAPSULATED or (ts == _DEFLATED and first):
            return 0
        return {_EXPLICIT: 1, _IMPLICIT: 2}.get(ts, 3)
    preferred, other = (_EXPLICIT, _IMPLICIT) if preference == EXPLICIT else (
        _IMPLICIT, _EXPLICIT)
    return {preferred: 0, other: 1}.get(ts, 2)


class Preferences:
    """The order to accept syntaxes in, per abstract syntax, for one association's request.

    Several contexts may offer one abstract syntax: each syntax takes the best rank any of
    them gives it, so a context offering ``[JPEG-LS, Explicit]`` keeps JPEG-LS even when an
    earlier context for the same class offered Explicit alone.
    """

    def __init__(self, preference: str) -> None:
        self._preference = preference
        self._ranks: dict[str, dict[str, tuple[int, int]]] = {}
        self._seq = 0

    def offer(self, abstract_syntax: str, offered: Iterable[object]) -> None:
        ranks = self._ranks.setdefault(abstract_syntax, {})
        for i, ts in enumerate(offered):
            name = str(ts)
            key = (_group(name, i == 0, self._preference), self._seq)
            self._seq += 1
            if name not in ranks or key < ranks[name]:
                ranks[name] = key

    def order(self, abstract_syntax: str) -> list[str] | None:
        """The offered syntaxes of that abstract syntax, best first (None: not offered)."""
        ranks = self._ranks.get(abstract_syntax)
        if not ranks:
            return None
        return sorted(ranks, key=ranks.__getitem__)
