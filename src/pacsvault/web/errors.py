"""One DICOMweb error type, and the one table that turns a failure into an HTTP answer.

Why: QIDO-RS, WADO-RS and STOW-RS each had their own exception (``QidoError`` without a
status, ``WadoError`` with one) and their own ``isinstance`` chain deciding the status, the
message and whether the failure is serious. Now every request-level refusal is a
``DicomWebError`` (the older names are subclasses, raised where they were), and every
failure a route catches goes through ``failure``:

- a ``DicomWebError`` answers its own status and message;
- a query past its time budget 413 (PS3.18: the query is too broad), another query error
  400, with their own message (written by the query engine to quote no value);
- pixel data that does not decode here 406; an object failing its integrity check 500
  (serious, logged without the object's identity);
- anything else 500 "internal error", serious, logged by its frames only: its message may
  quote a value from a dataset.

QIDO-RS never decrypts an object and WADO-RS turns query errors into 404/400 before this,
so one table serves both. The answer's shape is ``{"error": message}`` as JSON, the same
for every DICOMweb route (``response``). The message is also the audit record's message,
which is why it must never quote a value from the request or the data.
"""

from __future__ import annotations

import logging
import traceback
from dataclasses import dataclass

from starlette.responses import JSONResponse, Response

from pacsvault.crypto.objects import ObjectFormatError
from pacsvault.dicomfile.render import DecodeError
from pacsvault.index.query import QueryBudgetExceeded, QueryError

INTERNAL_ERROR = "internal error"


class DicomWebError(Exception):
    """A DICOMweb request that cannot be answered: ``status`` is the HTTP status, the
    message is short and never quotes a value from the request or the data."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status

    @property
    def message(self) -> str:
        return str(self)


@dataclass(frozen=True)
class Failure:
    """How a failed request is answered and recorded."""

    status: int
    message: str
    serious: bool  # a fault on our side (recorded SERIOUS_FAILURE), not the client's

    def response(self) -> Response:
        return response(self.status, self.message)


# (exception class, status, message, serious): None takes them from the exception (a
# ``DicomWebError``'s ``status``, its message). The first match wins, a subclass before
# its base, as in an except chain.
Rule = tuple[type[Exception], int | None, str | None, bool]

RULES: tuple[Rule, ...] = (
    (DicomWebError, None, None, False),
    (QueryBudgetExceeded, 413, None, False),  # PS3.18: the query is too broad
    (QueryError, 400, None, False),
    (DecodeError, 406, "the pixel data cannot be decoded here", False),
    (ObjectFormatError, 500, "a stored object failed its integrity check", True),
)


def failure(exc: Exception, log: logging.Logger, what: str,
            rules: tuple[Rule, ...] = RULES) -> Failure:
    """The answer to ``exc`` (``what`` names the request in the log: "QIDO-RS",
    "WADO-RS frames"). Serious failures are logged, never with a value from the data."""
    for kind, status, message, serious in rules:
        if isinstance(exc, kind):
            if isinstance(exc, ObjectFormatError):
                log.error("%s: a stored object failed authentication", what)
            own = exc.status if isinstance(exc, DicomWebError) else 500
            return Failure(status if status is not None else own,
                           message if message is not None else str(exc), serious)
    log.error("%s failed (%s) at\n%s", what, type(exc).__name__,
              "".join(traceback.format_tb(exc.__traceback__)))
    return Failure(500, INTERNAL_ERROR, True)


def response(status: int, message: str) -> Response:
    """The body of every DICOMweb error answer."""
    return JSONResponse({"error": message}, status_code=status)
