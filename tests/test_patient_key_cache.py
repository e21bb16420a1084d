"""A new study of a patient already seen is encrypted under their key without a look-up
(issue 17, the one-instance-study "filler": a pooled connection and a read per image).

The archive remembers, from committed rows only, one data key per patient it made a study
for (keyed by a salted hash of their ID and issuer: no identifier kept). A later study of
theirs uses it without ``_choose``; a removal (by this process or by another one, such as
the command line) makes the cache go, and an object chosen under a key destroyed meanwhile
is chosen again, never stored under it. A study found in the index under another patient
teaches nothing: its key is that other patient's.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select

from pacsvault.index.models import Instance, Patient
from pacsvault.storage.archive import Archive, StoreStatus
from pacsvault.storage.removal import Remover
from pacsvault.vault import Vault, create
from tests.test_object_removal import REASON, Obj, make


@pytest.fixture
def vault(tmp_path: Path) -> Iterator[Vault]:
    create(tmp_path / "data", key_file=tmp_path / "key")
    opened = Vault.open(tmp_path / "data", tmp_path / "key")
    yield opened
    opened.close()


def _stored(v: Vault, *objs: Obj) -> None:
    for o in objs:
        assert v.archive.store(o.raw, source_ae="TEST").status is StoreStatus.STORED
    v.archive.settle()


def _key_of(v: Vault, sop: str) -> uuid.UUID:
    with v.sessions() as s:
        return uuid.UUID(s.scalars(select(Instance.key_id)
                                   .where(Instance.sop_uid == sop)).one())


def _no_look_up(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    chosen: list[str] = []
    original = Archive._choose

    def counted(self: Archive, parsed: Any) -> Any:
        chosen.append(parsed.study_uid)
        return original(self, parsed)

    monkeypatch.setattr(Archive, "_choose", counted)
    return chosen


def test_a_new_study_of_a_patient_seen_takes_their_key_without_a_look_up(
        vault: Vault, monkeypatch: pytest.MonkeyPatch) -> None:
    chosen = _no_look_up(monkeypatch)
    first = make("PVKC01", generate_uid(), generate_uid())
    _stored(vault, first)
    assert chosen == [first.study]  # a new patient: looked up, a key minted
    later = [make("PVKC01", generate_uid(), generate_uid()) for _ in range(3)]
    _stored(vault, *later)
    assert chosen == [first.study]  # no look-up for the patient's next studies
    key = _key_of(vault, first.sop)
    assert {_key_of(vault, o.sop) for o in later} == {key}
    with vault.sessions() as s:
        (patient_key,) = s.scalars(select(Patient.key_id)
                                   .where(Patient.patient_id == "PVKC01")).all()
    assert uuid.UUID(patient_key) == key
    for o in (first, *later):
        (item,) = list(vault.archive.locate(sop_uid=o.sop))
        assert vault.archive.read(item) == o.raw
    # nothing of the patient's identity is kept by the cache
    cache = vault.archive._patient_cache
    assert cache and not any(b"PVKC01" in k for k in cache)


def test_a_removal_elsewhere_never_lets_a_destroyed_key_be_used(
        vault: Vault, monkeypatch: pytest.MonkeyPatch) -> None:
    first = make("PVKC02", generate_uid(), generate_uid())
    _stored(vault, first, make("PVKC02", generate_uid(), generate_uid()))
    old_key = _key_of(vault, first.sop)
    # the patient's every study deleted by another process (the command line's remover:
    # no archive to tell), their key destroyed
    remover = Remover(vault.engine, vault.objects, vault.recorder)
    for item in list(vault.archive.locate(patient_id="PVKC02")):
        remover.delete("study", item.study_uid, REASON, actor="admin-test")
    chosen = _no_look_up(monkeypatch)
    again = make("PVKC02", generate_uid(), generate_uid())
    _stored(vault, again)
    assert chosen == [again.study]  # the stale choice was redone by a look-up
    new_key = _key_of(vault, again.sop)
    assert new_key != old_key
    (item,) = list(vault.archive.locate(sop_uid=again.sop))
    assert vault.archive.read(item) == again.raw


def test_a_study_found_under_another_patient_teaches_no_key(
        vault: Vault, monkeypatch: pytest.MonkeyPatch) -> None:
    shared = generate_uid()
    a = make("PVKC03", shared, generate_uid())
    _stored(vault, a)
    vault.archive.forget()  # the study is found in the index, not in the cache
    odd = make("PVKC04", shared, generate_uid())  # another patient ID, a known study
    _stored(vault, odd)
    assert _key_of(vault, odd.sop) == _key_of(vault, a.sop)  # the study's key, as before
    chosen = _no_look_up(monkeypatch)
    b = make("PVKC04", generate_uid(), generate_uid())
    _stored(vault, b)
    assert chosen == [b.study]  # looked up: PVKC04 got no key from PVKC03's study
    assert _key_of(vault, b.sop) != _key_of(vault, a.sop)
