"""Each association gets its own copy of the listener's presentation contexts (cheaply:
pynetdicom's deep copy of every storage class in every syntax took ~146 ms)."""

from __future__ import annotations

import copy

from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.presentation import build_context

from pacsvault.dicom.server import _ContextList


def test_copies_are_independent_where_an_association_changes_them() -> None:
    original = build_context(CTImageStorage, [ImplicitVRLittleEndian, ExplicitVRLittleEndian])
    original.scu_role, original.scp_role = True, True
    contexts = _ContextList([original])
    copied = copy.deepcopy(contexts)
    assert copied is not contexts and copied[0] is not original
    copied[0].transfer_syntax = [ExplicitVRLittleEndian]
    copied[0].context_id = 3
    assert original.transfer_syntax == [ImplicitVRLittleEndian, ExplicitVRLittleEndian]
    assert original.context_id is None
    assert (copied[0].abstract_syntax, copied[0].scu_role, copied[0].scp_role) == (
        CTImageStorage, True, True)
