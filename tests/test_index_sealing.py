"""The index's column encryption (issue 16): what the types do on SQLite (nothing) and on
any other dialect (encrypt, or refuse without a sealer)."""

from __future__ import annotations

import pytest
from sqlalchemy import Column, Integer, MetaData, Table, create_engine, select
from sqlalchemy.dialects import postgresql

from pacsvault.crypto.keys import MasterKey
from pacsvault.index.sealing import (
    Fixed,
    Sealed,
    SealedColumnError,
    Sealer,
    sealer_for,
    sealer_of,
)

pytestmark = pytest.mark.quick


def _sealer() -> Sealer:
    return sealer_for(MasterKey.generate(), "vault-test")


def test_sealed_is_random_and_authenticated() -> None:
    s = _sealer()
    a, b = s.seal("patients.name", "DOE^JOHN"), s.seal("patients.name", "DOE^JOHN")
    assert a != b and b"DOE" not in a
    assert s.open("patients.name", a) == "DOE^JOHN"
    with pytest.raises(SealedColumnError):
        s.open("patients.patient_id", a)  # moved to another column: refused
    with pytest.raises(SealedColumnError):
        s.open("patients.name", a[:-1] + bytes([a[-1] ^ 1]))


def test_fixed_is_deterministic_per_column_only() -> None:
    s = _sealer()
    uid = "1.2.826.0.1.3680043.8.498.1"
    assert s.fix("studies.study_uid", uid) == s.fix("studies.study_uid", uid)
    assert s.fix("studies.study_uid", uid) != s.fix("series.series_uid", uid)
    assert s.unfix("studies.study_uid", s.fix("studies.study_uid", uid)) == uid
    assert uid.encode() not in s.fix("studies.study_uid", uid)


def test_lengths_show_only_their_class() -> None:
    s = _sealer()
    short, longer = s.seal("patients.name", "DOE^J"), s.seal("patients.name", "DOE^JOHNNY")
    assert len(short) == len(longer)  # both under 16 bytes of value
    assert len(s.fix("t.uid", "1.2.3")) == len(s.fix("t.uid", "1.2.3.4.5.6"))
    assert len(s.seal("x", "a" * 15)) < len(s.seal("x", "a" * 16))
    for value in ("", "a" * 15, "a" * 16, "é" * 9, "x\x00"):
        assert s.open("x", s.seal("x", value)) == value
        assert s.unfix("x", s.fix("x", value)) == value


def test_tokens_depend_on_key_and_label() -> None:
    s, other = _sealer(), _sealer()
    assert s.token("name/exact", "doe") == s.token("name/exact", "doe")
    assert s.token("name/exact", "doe") != s.token("name/prefix3", "doe")
    assert s.token("name/exact", "doe") != other.token("name/exact", "doe")
    assert len(s.token("x", "y")) == 16


def _table() -> Table:
    return Table("t", MetaData(), Column("pk", Integer, primary_key=True),
                 Column("name", Sealed("t.name", 64)), Column("uid", Fixed("t.uid", 64)))


def test_sqlite_columns_stay_plain() -> None:
    engine = create_engine("sqlite://")
    table = _table()
    table.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(table.insert().values(name="DOE^JOHN", uid="1.2.3"))
        raw = conn.exec_driver_sql("SELECT name, uid FROM t").one()
        assert tuple(raw) == ("DOE^JOHN", "1.2.3")
        assert conn.execute(select(table.c.name).where(table.c.uid == "1.2.3")).scalar() \
            == "DOE^JOHN"


def test_other_dialects_refuse_without_a_sealer_and_encrypt_with_one() -> None:
    dialect = postgresql.dialect()  # type: ignore[no-untyped-call]
    with pytest.raises(SealedColumnError):
        sealer_of(dialect)
    with pytest.raises(SealedColumnError):
        Fixed("t.uid").process_bind_param("1.2.3", dialect)
    s = _sealer()
    dialect.pv_sealer = s  # type: ignore[attr-defined]
    bound = Fixed("t.uid").process_bind_param("1.2.3", dialect)
    assert isinstance(bound, bytes) and bound == s.fix("t.uid", "1.2.3")
    assert Fixed("t.uid").process_result_value(bound, dialect) == "1.2.3"
    sealed = Sealed("t.name").process_bind_param("DOE", dialect)
    assert Sealed("t.name").process_result_value(sealed, dialect) == "DOE"
    assert Sealed("t.name").load_dialect_impl(dialect).compile(dialect=dialect) == "BYTEA"
