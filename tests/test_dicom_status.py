"""The one DICOM status table (issue 15): every failure maps, and C-STORE and STOW-RS answer
the same failure with the same status.

In-process: the real ``DicomService._on_store`` and ``stow.store_parts`` over an archive
that raises each failure ``Archive.store`` can raise (a network round trip per exception
would prove nothing more about the table; the live paths are covered by test_robustness,
test_hardening_validation and test_dicomweb).
"""

from __future__ import annotations

import threading
import weakref
from types import SimpleNamespace
from typing import Any

import pytest
from pynetdicom.dimse_primitives import C_STORE

from pacsvault.audit import AuditUnavailable
from pacsvault.dicom import status
from pacsvault.dicom.assoc import AssocState
from pacsvault.dicom.policy import Peer
from pacsvault.dicom.server import DicomService
from pacsvault.dicomfile.parse import (
    InvalidObject,
    MismatchedVR,
    ObjectTooLarge,
    UnreadableObject,
)
from pacsvault.index.query import QueryBudgetExceeded, QueryError
from pacsvault.storage.archive import StoreStatus
from pacsvault.storage.objects import DiskFullError
from pacsvault.web import stow
from pacsvault.web.multipart import Part

# In the quick loop (no server); marked here rather than in conftest's QUICK_MODULES list.
pytestmark = pytest.mark.quick

# One instance of every failure Archive.store can raise, and the status PS3.4 gives it.
FAILURES: list[tuple[Exception, int]] = [
    (AuditUnavailable("trail down"), 0xA700),
    (ObjectTooLarge("inflates beyond 64 MB"), 0xA700),
    (MismatchedVR("PatientName as US"), 0xC000),
    (UnreadableObject("not DICOM"), 0xC000),
    (InvalidObject("no SOP Instance UID"), 0xA900),
    (DiskFullError("disk below the reserve"), 0xA700),
    (PermissionError(13, "denied"), 0xA700),
    (OSError(5, "I/O error"), 0xA700),
    (RuntimeError("a value from the dataset"), 0x0110),
]


class _Archive:
    def __init__(self, exc: Exception | None) -> None:
        self.exc = exc

    def store(self, raw: bytes, **_kwargs: Any) -> Any:
        if self.exc is not None:
            raise self.exc
        return SimpleNamespace(status=StoreStatus.CONFLICT, study_uid="1.2.3",
                               sop_uid="1.2.3.4")


class _Assoc:  # weak-referenceable, like pynetdicom's Association
    pass


def _c_store(exc: Exception | None) -> tuple[int, list[Any]]:
    """The status ``_on_store`` answers and the events it emits."""
    events: list[Any] = []
    recorder = SimpleNamespace(emit=lambda event, required=True: events.append(event))
    service: Any = DicomService.__new__(DicomService)
    service.vault = SimpleNamespace(archive=_Archive(exc), recorder=recorder)
    service._lock = threading.Lock()
    service._states = weakref.WeakKeyDictionary()
    assoc = _Assoc()
    node = SimpleNamespace(ae_title="MODALITY", may=lambda role: True)
    service._states[assoc] = AssocState(Peer("127.0.0.1", 1234, False), node)  # type: ignore[arg-type]
    request = C_STORE()
    request.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    request.AffectedSOPInstanceUID = "1.2.3.4"
    event = SimpleNamespace(assoc=assoc, request=request,
                            context=SimpleNamespace(transfer_syntax="1.2.840.10008.1.2.1"),
                            encoded_dataset=lambda include_meta=True: b"DICM")
    return int(service._on_store(event)), events


def _stow(exc: Exception | None) -> int:
    vault: Any = SimpleNamespace(archive=_Archive(exc))
    part = Part({"content-type": "application/dicom"}, memoryview(b"DICM"))
    outcome = stow.store_parts(vault, [part], None, "https://pv/dicom-web")
    assert len(outcome.failed) == 1
    return int(outcome.failed[0].FailureReason)


@pytest.mark.parametrize(("exc", "expected"), FAILURES,
                         ids=[type(e).__name__ for e, _ in FAILURES])
def test_c_store_and_stow_answer_a_failure_alike(exc: Exception, expected: int) -> None:
    answered, events = _c_store(exc)
    assert answered == expected
    assert _stow(exc) == expected
    (event,) = events
    assert event.action == "dicom.store.failed"
    assert str(event.message).startswith(f"status {expected:04X}: ")
    # an unexpected error is named by its type, never by its message
    assert "a value from the dataset" not in str(event.message)


def test_a_conflict_is_a_warning_for_c_store_and_a_failure_for_stow() -> None:
    assert _c_store(None)[0] == status.STORE_CONFLICT == 0xB006
    assert _stow(None) == status.STOW_CONFLICT == stow.DUPLICATE_SOP == 0x0111


@pytest.mark.parametrize("rules", [status.STORE_FAILURES, status.FIND_FAILURES],
                         ids=["store", "find"])
def test_every_rule_is_reachable(rules: tuple[status.Rule, ...]) -> None:
    """No rule is hidden by an earlier one (a base class listed before its subclass), and
    the table ends with the catch-all, so every failure maps."""
    for n, (kind, _status, _comment) in enumerate(rules):
        assert not any(issubclass(kind, earlier) for earlier, _, _ in rules[:n]), kind
    assert rules[-1][0] is Exception
    assert status.failure(rules, KeyError("x")).unexpected


def test_find_failures() -> None:
    assert status.failure(status.FIND_FAILURES, AuditUnavailable()).status == 0xA700
    budget = status.failure(status.FIND_FAILURES, QueryBudgetExceeded("time budget"))
    assert (budget.status, budget.comment) == (0xA700, "time budget")
    assert status.failure(status.FIND_FAILURES, QueryError("bad level")).hex == "A900"
    odd = status.failure(status.FIND_FAILURES, ValueError("Smith^John"))
    assert (odd.hex, odd.comment, odd.unexpected) == ("C000", "ValueError", True)


def test_stow_names_are_the_table_values() -> None:
    assert (stow.PROCESSING_FAILURE, stow.OUT_OF_RESOURCES, stow.DOES_NOT_MATCH,
            stow.CANNOT_UNDERSTAND) == (status.PROCESSING_FAILURE, status.OUT_OF_RESOURCES,
                                        status.DOES_NOT_MATCH, status.CANNOT_UNDERSTAND)
