"""Sink that keeps events in the encrypted index (object references included)."""

from __future__ import annotations

import json

from sqlalchemy.orm import Session, sessionmaker

from pacsvault.audit.events import AuditEvent
from pacsvault.index.models import Event


class IndexSink:
    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions

    def write(self, event: AuditEvent) -> None:
        detail = dict(event.detail)
        with self._sessions.begin() as session:
            session.add(
                Event(
                    time=event.time,
                    action=event.action,
                    outcome=event.outcome.name.lower(),
                    event_code=event.code.value,
                    actor_ae=event.actor_ae,
                    actor_address=event.actor_address,
                    actor_user=event.actor_user,
                    detail_json=json.dumps(
                        {
                            "message": event.message,
                            "study_uids": list(event.study_uids),
                            "sop_uids": list(event.sop_uids),
                            **detail,
                        }
                    ),
                )
            )
