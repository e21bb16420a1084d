"""Counts of what the index holds, for ``status`` and the health page.

A plain index query: kept apart from ``storage.archive`` (which brings pydicom and
numpy) so that ``pacsvault status`` starts fast (issue 12, defect 7).
"""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from pacsvault.index.models import Instance, Patient, Series, Study


def counts(sessions: sessionmaker[Session]) -> dict[str, int]:
    """Patients, studies, series, instances (quarantined included) and received bytes."""
    with sessions() as session:
        return {
            "patients": session.scalar(select(func.count()).select_from(Patient)) or 0,
            "studies": session.scalar(select(func.count()).select_from(Study)) or 0,
            "series": session.scalar(select(func.count()).select_from(Series)) or 0,
            "instances": session.scalar(select(func.count()).select_from(Instance)) or 0,
            "bytes": session.scalar(select(func.coalesce(func.sum(Instance.size), 0))) or 0,
        }
