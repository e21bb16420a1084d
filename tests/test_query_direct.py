"""Issue 17: the embedded index's study search reads on a plain pooled connection and opens
an ORM session only when an answer needs one (``QueryEngine._reading``). Its answers are
the session path's (the SQLAlchemy path, ``query_raw`` off); a plain study search opens no
session at all (a test fails if the connection path is silently not taken);
``SOPClassesInStudy`` (answered from entities) opens one, on that same connection; the
series and image levels keep their session."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import pytest
from pydicom.dataset import Dataset
from sqlalchemy.orm import Session, sessionmaker

from pacsvault.index import query_raw
from pacsvault.index.db import open_index
from pacsvault.index.query import QueryEngine
from tests.test_matching_backends import QUERIES, _identifier, _loaded, _returned


class _Counting:
    """The engine's sessionmaker, counting the sessions opened."""

    def __init__(self, real: sessionmaker[Session]) -> None:
        self.real = real
        self.kw = real.kw
        self.opened = 0

    def __call__(self, **kw: Any) -> Session:
        self.opened += 1
        return self.real(**kw)


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[QueryEngine]:
    root = tmp_path_factory.mktemp("query-direct")
    lite = open_index(root / "index.db", os.urandom(32), create=True)
    try:
        yield _loaded(lite, root / "objects")
    finally:
        lite.dispose()


def _counted(engine: QueryEngine) -> tuple[QueryEngine, _Counting]:
    counting = _Counting(engine._sessions)
    return QueryEngine(counting, "PVTEST"), counting  # type: ignore[arg-type]


def _dumped(answers: Any) -> list[str]:
    return [json.dumps(a, sort_keys=True, ensure_ascii=False) for a in answers]


def _study(keys: dict[str, str], *extra: str) -> Dataset:
    ident = _identifier("STUDY", keys, _returned("STUDY"))
    for keyword in extra:
        setattr(ident, keyword, None)
    return ident


STUDY_KEYS = [keys for _root, level, keys in QUERIES if level == "STUDY"]


@pytest.mark.parametrize("extra", [(), ("SOPClassesInStudy",)])
def test_same_answers_as_the_session_path(engine: QueryEngine, extra: tuple[str, ...]) -> None:
    for keys in STUDY_KEYS:
        ident = _study(keys, *extra)
        fast = _dumped(engine.find_json("STUDY", ident))
        page = engine.page("STUDY", ident, offset=1, limit=2)
        query_raw.ENABLED = False
        try:
            slow = _dumped(engine.find_json("STUDY", ident))
            slow_page = engine.page("STUDY", ident, offset=1, limit=2)
        finally:
            query_raw.ENABLED = True
        assert fast == slow, keys
        assert (_dumped(page.answers), page.more) == (_dumped(slow_page.answers),
                                                      slow_page.more)


def test_a_study_search_opens_no_session(engine: QueryEngine) -> None:
    counted, counting = _counted(engine)
    answered = sum(len(list(counted.find_json("STUDY", _study(keys)))) for keys in STUDY_KEYS)
    assert answered > 0
    assert counting.opened == 0


def test_entities_open_a_session_on_demand(engine: QueryEngine) -> None:
    counted, counting = _counted(engine)
    answers = list(counted.find_json("STUDY", _study({}, "SOPClassesInStudy")))
    assert answers and all("Value" in a["00080062"] for a in answers)
    assert counting.opened == 1  # one per search, not one per answer


@pytest.mark.parametrize("level", ["SERIES", "IMAGE"])
def test_other_levels_keep_their_session(engine: QueryEngine, level: str) -> None:
    counted, counting = _counted(engine)
    assert list(counted.find_json(level, _identifier(level, {}, _returned(level))))
    assert counting.opened == 1
