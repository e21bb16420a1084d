"""The registered DICOM UIDs of an association negotiation checked once per process (issue 17).

Why: pynetdicom checks every UID each time it is set, with a regular expression
(``pydicom.uid.UID.is_valid``, twice for a transfer syntax), and an association sets the
same few UIDs again and again: each proposed abstract and transfer syntax when the
A-ASSOCIATE-RQ PDU is decoded, again when it becomes a primitive, again for each result
context and SCP/SCU role item, again when the A-ASSOCIATE-AC is built, and the SOP class
of every DIMSE message. A C-GET requestor proposes ~120 contexts x 3 syntaxes with as
many role items: ~30 % of such an association's server time went there.

So the UIDs of the DICOM registry (pydicom's UID dictionary: SOP classes, transfer
syntaxes, the application context...) and pynetdicom's implementation class UID, which are
conformant, are known in advance here,
and for exactly those values ``set_uid`` and ``PresentationContext.add_transfer_syntax``
skip the checks, whose outcome is already known: a conformant UID passes pynetdicom's
validator in both of its modes (``ENFORCE_UID_CONFORMANCE`` on or off) and draws no
warning; a registered transfer syntax is a transfer syntax. Every other value (a private
or unknown UID, a malformed one, one with padding, an SOP Instance UID) takes pynetdicom's
own function, with its errors and warnings, unchanged. Nothing is learnt at run time: a
peer cannot grow this table.

The upstream functions are hashed in ``patches.UPSTREAM``; ``install`` refuses any other
library version (``patches.check_versions``).
"""

from __future__ import annotations

from typing import Any

from pydicom._uid_dict import UID_dictionary
from pydicom.uid import UID

from pacsvault.dicom import patches

# Registered, conformant UIDs: text and ASCII bytes (as a PDU item hands them) -> the UID
_KNOWN: dict[str | bytes, UID] = {}
_TRANSFER: dict[str | bytes, UID] = {}
# pynetdicom modules that imported ``set_uid`` by name (rebound by ``install``)
_MODULES = ("pdu_items", "pdu_primitives", "presentation", "dimse_primitives")
_TEXT = (str, UID, bytes)


def _build() -> None:
    from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID

    # and pynetdicom's implementation class UID: our AE's own, in every A-ASSOCIATE-AC
    entries = {**UID_dictionary, str(PYNETDICOM_IMPLEMENTATION_UID): ("", "Implementation")}
    for text, entry in entries.items():
        uid = UID(text)
        if not (uid and uid.is_valid):
            continue
        for key in (text, text.encode("ascii")):
            _KNOWN[key] = uid
            if entry[1] == "Transfer Syntax":
                _TRANSFER[key] = uid


def install() -> None:
    """Rebind ``set_uid`` where pynetdicom calls it and wrap ``add_transfer_syntax``
    (idempotent)."""
    patches.check_versions()
    import importlib

    from pynetdicom import _config, _validators, utils
    from pynetdicom.presentation import PresentationContext

    upstream_set_uid = utils.set_uid
    if getattr(upstream_set_uid, "pv_known", False):
        return
    if not _KNOWN:
        _build()
    upstream_validator = _validators.validate_ui

    def set_uid(value: Any, name: str, allow_empty: bool = True, allow_none: bool = True,
                validate: bool = True) -> UID | None:
        if value.__class__ in _TEXT and _config.VALIDATORS["UI"] is upstream_validator:
            known = _KNOWN.get(value)
            if known is not None:
                return known
        return upstream_set_uid(value, name, allow_empty, allow_none, validate)

    set_uid.pv_known = True  # type: ignore[attr-defined]
    set_uid.__wrapped__ = upstream_set_uid  # type: ignore[attr-defined]
    for name in _MODULES:
        module = importlib.import_module(f"pynetdicom.{name}")
        if getattr(module, "set_uid", None) is upstream_set_uid:
            setattr(module, "set_uid", set_uid)  # noqa: B010
    setattr(utils, "set_uid", set_uid)  # noqa: B010

    upstream_add = PresentationContext.add_transfer_syntax

    def add_transfer_syntax(self: PresentationContext, syntax: Any) -> None:
        if syntax.__class__ in _TEXT:
            known = _TRANSFER.get(syntax)
            if known is not None:
                if known not in self._transfer_syntax:
                    self._transfer_syntax.append(known)
                return
        upstream_add(self, syntax)

    add_transfer_syntax.__wrapped__ = upstream_add  # type: ignore[attr-defined]
    setattr(PresentationContext, "add_transfer_syntax", add_transfer_syntax)  # noqa: B010


def known(value: str | bytes) -> bool:
    """Whether ``value`` skips the checks (for the tests)."""
    return value in _KNOWN
