"""The one event path every part of pacsvault reports through.

Producers build an ``AuditEvent`` and call ``Recorder.emit``; sinks decide where it goes
(plain log without patient data, the encrypted index, later the hash-chained trail and the
syslog exporter). Adding a sink never changes a producer.
"""

from pacsvault.audit.events import (
    AuditEvent,
    AuditUnavailable,
    EventCode,
    Outcome,
    Recorder,
    Sink,
)

__all__ = ["AuditEvent", "AuditUnavailable", "EventCode", "Outcome", "Recorder", "Sink"]
