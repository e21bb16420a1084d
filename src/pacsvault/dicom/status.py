"""DICOM statuses, and the one table that turns a failure into one.

Why one table: the same failure must get the same status wherever it happens. C-STORE
(``dicom/server``) and STOW-RS (``web/stow``, whose FailureReason is a PS3.4 C-STORE
status too) both call ``Archive.store``; C-FIND/C-MOVE/C-GET (``dicom/qr``) share the
resource and identifier statuses. Before this module each wrote its own ``except`` chain,
and the two store chains had drifted (STOW answered 0110 where C-STORE answered A700).
pynetdicom's own style: a handler returns a status code (``_on_store``) or yields one
(``qr``), and the code comes from here.

Each rule is (exception class, status, comment). The first rule whose class matches wins,
as in an ``except`` chain, so a subclass comes before its base (``ObjectTooLarge`` before
``UnreadableObject``). A comment is short and never quotes a value from the data: it goes
into the audit record (and could go into an Error Comment, LO, 64 characters).
``{exc}`` is the exception's own message, written by our parser and storage code to be safe
(no dataset value); ``{type}`` is the exception's class name, all an unexpected error gets
(its message may quote a value from the dataset).
"""

from __future__ import annotations

import logging
import traceback
from dataclasses import dataclass

from sqlalchemy.exc import OperationalError

from pacsvault.audit import AuditUnavailable
from pacsvault.dicomfile.parse import InvalidObject, ObjectTooLarge, UnreadableObject
from pacsvault.index.query import QueryBudgetExceeded, QueryError
from pacsvault.storage.objects import DiskFullError

# --- status codes (PS3.4 Annex B.2.3 C-STORE, C.4 Q/R; PS3.7 Annex C) -----------------------

SUCCESS = 0x0000
PENDING = 0xFF00
CANCEL = 0xFE00
NOT_AUTHORIZED = 0x0124  # "Refused: Not Authorized" (PS3.7 C.5.14)
PROCESSING_FAILURE = 0x0110  # "Processing Failure" (PS3.7 C.4.3)
DUPLICATE_SOP = 0x0111  # "Duplicate SOP Instance" (PS3.7 C.4.2): STOW's conflict reason
OUT_OF_RESOURCES = 0xA700  # C-STORE and C-FIND "Refused: Out of Resources"
# C-MOVE/C-GET "Refused: Out of Resources - Unable to calculate number of matches"
OUT_OF_RESOURCES_MATCHES = 0xA701
# C-MOVE/C-GET "Refused: Out of Resources - Unable to perform sub-operations"
OUT_OF_RESOURCES_SUBOPERATIONS = 0xA702
MOVE_DESTINATION_UNKNOWN = 0xA801  # answered by pynetdicom when a handler yields no peer
DOES_NOT_MATCH = 0xA900  # C-STORE "Data Set does not match SOP Class"; Q/R identifier
CANNOT_UNDERSTAND = 0xC000  # C-STORE "Cannot understand"; Q/R "Unable to process"
WARNING_DISCARDED = 0xB006  # C-STORE "Elements Discarded": the first object was kept

# Sealed mode (the master key is not here: no index to read). PS3.4 Annex C.4 status
# tables: C-FIND "A700 Refused: Out of Resources"; C-MOVE/C-GET "A701 Refused: Out of
# Resources - Unable to calculate number of matches" (the index cannot even be searched),
# each with this Error Comment (LO, <= 64 characters).
SEALED_FIND = OUT_OF_RESOURCES
SEALED_RETRIEVE = OUT_OF_RESOURCES_MATCHES
SEALED_COMMENT = "archive sealed: an administrator must unlock it"

# A different object under a SOP Instance UID already stored (the first one is kept):
# C-STORE answers a warning, STOW-RS lists the part as failed (PS3.18 10.5.3).
STORE_CONFLICT = WARNING_DISCARDED
STOW_CONFLICT = DUPLICATE_SOP

Rule = tuple[type[BaseException], int, str]

# ``Archive.store`` failures, for C-STORE and for each STOW-RS part.
STORE_FAILURES: tuple[Rule, ...] = (
    # The batch's record could not be made durable: nothing was committed, and a success
    # would be an image stored with no record naming it.
    (AuditUnavailable, OUT_OF_RESOURCES, "the audit trail cannot be written"),
    # A deflate bomb (``max_inflated_mb``): PS3.4 "refused: out of resources".
    (ObjectTooLarge, OUT_OF_RESOURCES, "refused: {exc}"),
    (UnreadableObject, CANNOT_UNDERSTAND, "unreadable: {exc}"),
    (InvalidObject, DOES_NOT_MATCH, "invalid: {exc}"),
    (DiskFullError, OUT_OF_RESOURCES, "{exc}"),
    (OSError, OUT_OF_RESOURCES, "storage error {type}"),
    # The index cannot be reached or is busy (PostgreSQL restarting, SQLite locked past
    # its timeout): nothing was committed; a refusal the modality retries, not a failure
    # of the object. The message is not repeated (it may quote the statement).
    (OperationalError, OUT_OF_RESOURCES, "the index is unavailable ({type})"),
    (Exception, PROCESSING_FAILURE, "{type}"),
)

# C-FIND failures (``qr.on_find``). No record can be written for the first one (the
# recorder has raised the alert); the others are recorded with the comment.
FIND_FAILURES: tuple[Rule, ...] = (
    (AuditUnavailable, OUT_OF_RESOURCES, "the audit trail cannot be written"),
    # PS3.4 C.4.1.1.4: the query ran past ``[query] time_budget_seconds``.
    (QueryBudgetExceeded, OUT_OF_RESOURCES, "{exc}"),
    (QueryError, DOES_NOT_MATCH, "{exc}"),
    (Exception, CANNOT_UNDERSTAND, "{type}"),  # decoding errors etc.: never the message
)


@dataclass(frozen=True)
class Failure:
    """The status a failure is answered with, and what the record says about it."""

    status: int
    comment: str
    unexpected: bool  # matched only by the catch-all rule: a bug or an unforeseen case

    @property
    def hex(self) -> str:
        return f"{self.status:04X}"


def failure(rules: tuple[Rule, ...], exc: BaseException) -> Failure:
    """The first rule matching ``exc``."""
    for kind, status, comment in rules:
        if isinstance(exc, kind):
            return Failure(status, comment.format(exc=exc, type=type(exc).__name__),
                           unexpected=kind is Exception)
    raise exc  # not an Exception (KeyboardInterrupt, SystemExit): not ours to answer


def store_failure(exc: BaseException, log: logging.Logger) -> Failure:
    """How C-STORE and STOW-RS answer an ``Archive.store`` failure. An unexpected error is
    logged to ``log`` by its frames only (its message may quote a value from the dataset)."""
    found = failure(STORE_FAILURES, exc)
    if found.unexpected:
        log.error("unexpected error while storing (%s) at\n%s", type(exc).__name__,
                  "".join(traceback.format_tb(exc.__traceback__)))
    return found
