"""The one DICOMweb error type and its table (issue 15): each failure a DICOMweb route
catches gets the status and message it got before, in the one answer shape.

In-process (the live answers are asserted by test_dicomweb, test_hardening_validation,
test_wado_conversions and test_qido_for_ohif).
"""

from __future__ import annotations

import json
import logging

import pytest

from pacsvault.crypto.objects import ObjectFormatError
from pacsvault.dicomfile.render import DecodeError
from pacsvault.index.query import QueryBudgetExceeded, QueryError
from pacsvault.web import dicomweb_common, errors, qido, wado

pytestmark = pytest.mark.quick

log = logging.getLogger("tests.dicomweb_errors")

CASES: list[tuple[Exception, int, str, bool]] = [
    (errors.DicomWebError(404, "no such study"), 404, "no such study", False),
    (wado.WadoError(406, "no acceptable transfer syntax"), 406,
     "no acceptable transfer syntax", False),
    (wado.ConversionError(), 406, str(wado.ConversionError()), False),
    (qido.QidoError("unknown attribute in the query"), 400,
     "unknown attribute in the query", False),
    (QueryBudgetExceeded("the query ran past its time budget"), 413,
     "the query ran past its time budget", False),
    (QueryError("bad identifier"), 400, "bad identifier", False),
    (DecodeError("openjpeg: Smith^John"), 406, "the pixel data cannot be decoded here", False),
    (ObjectFormatError("tag mismatch"), 500, "a stored object failed its integrity check", True),
    (KeyError("Smith^John"), 500, "internal error", True),
]


@pytest.mark.parametrize(("exc", "status", "message", "serious"), CASES,
                         ids=[type(c[0]).__name__ for c in CASES])
def test_each_failure_answers_as_before(exc: Exception, status: int, message: str,
                                        serious: bool, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger=log.name):
        failed = errors.failure(exc, log, "WADO-RS frames", dicomweb_common.RULES)
    assert (failed.status, failed.message, failed.serious) == (status, message, serious)
    answer = failed.response()
    assert answer.status_code == status
    assert answer.headers["content-type"] == "application/json"
    assert json.loads(bytes(answer.body)) == {"error": message}
    # serious failures are logged, never with the exception's message (it may quote data)
    assert bool(caplog.records) == serious
    assert "Smith^John" not in caplog.text


def test_the_older_names_are_the_one_type() -> None:
    """``WadoError`` and ``QidoError`` are ``DicomWebError``s (raised where they were): a
    QidoError is a 400 by construction."""
    assert issubclass(wado.WadoError, errors.DicomWebError)
    assert issubclass(wado.ConversionError, errors.DicomWebError)
    assert issubclass(qido.QidoError, errors.DicomWebError)
    assert qido.QidoError("x").status == 400
    assert dicomweb_common.RULES == errors.RULES
