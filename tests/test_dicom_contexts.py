"""The listener's presentation contexts are shared by every association and never changed:
``DicomService.restrict_contexts`` copies the few a requestor asks for before shaping them
(pynetdicom's deep copy of every storage class in every syntax took ~146 ms, a copy of each
context ~0.7 ms per association)."""

from __future__ import annotations

import copy

from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.presentation import build_context

from pacsvault.dicom.listener import SharedContexts, copy_context
from pacsvault.dicom.server import _ContextList


def test_each_association_shares_the_contexts_indexed_by_abstract_syntax() -> None:
    original = build_context(CTImageStorage, [ImplicitVRLittleEndian, ExplicitVRLittleEndian])
    contexts = _ContextList([original])
    shared = copy.deepcopy(contexts)
    assert isinstance(shared, SharedContexts) and shared is not contexts
    assert shared[0] is original
    assert shared.pv_by_uid == {str(CTImageStorage): original}


def test_copies_are_independent_where_an_association_changes_them() -> None:
    original = build_context(CTImageStorage, [ImplicitVRLittleEndian, ExplicitVRLittleEndian])
    original.scu_role, original.scp_role = True, True
    copied = copy_context(original)
    assert copied is not original
    copied.transfer_syntax = [ExplicitVRLittleEndian]
    copied.context_id = 3
    assert original.transfer_syntax == [ImplicitVRLittleEndian, ExplicitVRLittleEndian]
    assert original.context_id is None
    assert (copied.abstract_syntax, copied.scu_role, copied.scp_role) == (
        CTImageStorage, True, True)
