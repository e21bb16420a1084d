"""Where a stored instance lives, as the index knows it.

Why here: the query engine (``index/query``) returns these and the archive
(``storage/archive``) reads them back; the index is the lower of the two layers, so the
record lives here and ``storage.archive`` re-exports it.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass


@dataclass(frozen=True)
class StoredInstance:
    """Where an instance lives; enough to read it back without another query."""

    sop_uid: str
    study_uid: str
    series_uid: str
    object_id: str
    key_id: uuid.UUID
    size: int
