"""Issue 18, part 3: what left readable and what left only as ciphertext, per actor kind.

In-process (no server): a vault with four patients; trail records written through the
vault's own recorder as the DICOM side, the export command and the backups write them. A
node's C-MOVE to a workstation left images readable, a backup only ciphertext, a store
brought data in; an exposure finding scopes the outside addresses of the window's
``exposure`` events.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

import pytest
from pydicom.uid import generate_uid

from pacsvault.audit.events import AuditEvent, EventCode, Outcome
from pacsvault.breach import scope
from pacsvault.breach.model import BreachError
from pacsvault.vault import Vault
from tests.helpers import new_vault
from tests.test_breach import _instance

SIZES = {"P1": 3, "P2": 2, "P3": 1, "P4": 1}


@pytest.fixture(scope="module")
def filled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Vault, dict[str, str]]]:
    vault = new_vault(tmp_path_factory.mktemp("scope")).open()
    studies = {p: str(generate_uid()) for p in SIZES}
    for patient, count in SIZES.items():
        for _ in range(count):
            vault.archive.store(_instance(patient, f"NAME^{patient}", studies[patient]),
                                source_ae="MODALITY", actor_address="127.0.0.1")
    emit = vault.recorder.emit
    emit(AuditEvent(action="dicom.move.begin", outcome=Outcome.SUCCESS,
                    code=EventCode.BEGIN_TRANSFERRING, actor_ae="WS1", actor_address="127.0.0.5",
                    study_uids=(studies["P1"],), detail={"destination": "LAPTOP",
                                                         "instances": 3}))
    emit(AuditEvent(action="backup.run", outcome=Outcome.SUCCESS,
                    code=EventCode.APPLICATION_ACTIVITY, actor_address="127.0.0.5",
                    study_uids=(studies["P2"],), detail={"target": "usb"}))
    emit(AuditEvent(action="exposure", outcome=Outcome.MINOR_FAILURE,
                    code=EventCode.SECURITY_ALERT, actor_address="127.0.0.9",
                    detail={"port": 104}))
    emit(AuditEvent(action="dicom.find", outcome=Outcome.SUCCESS, code=EventCode.QUERY,
                    actor_address="127.0.0.9", patient_ids=("P3",),
                    study_uids=(studies["P3"],)))
    yield vault, studies
    vault.close()


def _window() -> tuple[dt.datetime, dt.datetime]:
    now = dt.datetime.now(dt.UTC)
    return now - dt.timedelta(hours=1), now + dt.timedelta(hours=1)


def test_readable_ciphertext_and_received_are_told_apart(
        filled: tuple[Vault, dict[str, str]]) -> None:
    vault, _studies = filled
    found = scope.compute(vault, scope.Actor("address", "127.0.0.5"), *_window())
    flags = {p.patient_id: (p.readable, p.ciphertext_only, p.instances)
             for p in found.patients}
    # the C-MOVE named the study: all its instances went, readable, to the workstation
    assert flags == {"P1": (True, False, 3), "P2": (False, True, 2)}
    assert (found.readable_records, found.ciphertext_records) == (1, 1)
    # the destination node is an actor too: what was sent to it
    laptop = scope.compute(vault, scope.Actor("node", "LAPTOP"), *_window())
    assert [p.patient_id for p in laptop.patients] == ["P1"]
    # the modality only brought data in
    modality = scope.compute(vault, scope.Actor("node", "MODALITY"), *_window())
    assert modality.received_records >= 1 and not any(p.readable for p in modality.patients)


def test_exposure_finding_scopes_the_outside_addresses(
        filled: tuple[Vault, dict[str, str]]) -> None:
    vault, _studies = filled
    actor = scope.exposure_actor(vault, *_window())
    assert actor == scope.Actor("address", "127.0.0.9")
    found = scope.compute(vault, actor, *_window())
    assert [(p.patient_id, p.readable) for p in found.patients] == [("P3", True)]
    assert found.queries == 1
    since = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
    with pytest.raises(BreachError):
        scope.exposure_actor(vault, since, since + dt.timedelta(days=1))


def test_scope_window_and_actor_are_checked(filled: tuple[Vault, dict[str, str]]) -> None:
    vault, _studies = filled
    start, end = _window()
    with pytest.raises(BreachError):
        scope.compute(vault, scope.Actor("address", "127.0.0.5"), end, start)
    with pytest.raises(BreachError):
        scope.Actor("printer", "x")
    old = scope.compute(vault, scope.Actor("address", "127.0.0.5"),
                        start - dt.timedelta(days=9), start - dt.timedelta(days=8))
    assert old.patients == [] and old.records == 0


def test_alert_names_the_actor_and_the_time(filled: tuple[Vault, dict[str, str]]) -> None:
    vault, _studies = filled
    vault.recorder.emit(AuditEvent(
        action="alert.recorded", outcome=Outcome.SUCCESS, code=EventCode.SECURITY_ALERT,
        actor_ae="WS1", actor_address="127.0.0.5", message="Unusually large access",
        detail={"rule": "bulk-access", "severity": "critical"}))
    alert = [r for r in vault.audit.all_records() if r.action == "alert.recorded"][-1]
    actor, when = scope.alert_actor(vault, alert.seq)
    assert actor == scope.Actor("node", "WS1")
    found = scope.compute(vault, actor, when - scope.ALERT_LOOKBACK, when)
    assert [p.patient_id for p in found.patients] == ["P1"]
    store = next(r for r in vault.audit.all_records() if r.action != "alert.recorded")
    with pytest.raises(BreachError):
        scope.alert_actor(vault, store.seq)  # not an alert
